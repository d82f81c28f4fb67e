"""Data, template, context, epoch, reference and eval-config flags end to end on the demo checkpoint (the
saved debug rollouts show what each run generated)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_debug_modes import DEMO, demo_argv, error_of, rows

from miles_core.args import parse_args
from miles_core.cli import main
from miles_core.data import PromptDataset, Tokenizer
from miles_core.rollout.dumps import load_rollout
from miles_core.rollout.eval_sets import pass_at_k, pass_at_k_metrics
from miles_core.types import Status

THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture
def reward(tmp_path) -> Path:
    path = tmp_path / "reward.py"
    path.write_text("async def reward(args, sample):\n    return float(sample.label in sample.response)\n")
    return path


@pytest.fixture
def small_data(tmp_path) -> Path:
    """The first 6 rows of the demo's training data."""
    lines = (DEMO / "data" / "train.jsonl").read_text().splitlines()[:6]
    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def one_rollout(tmp_path: Path, name: str, reward: Path, data: Path, *extra: str) -> list:
    """The samples of one rollout (no training: --debug-rollout-only)."""
    dumps = str(tmp_path / name / "d{rollout_id}.pt")
    argv = demo_argv(tmp_path / name / "run", reward, n_rollout=1, data=False) + ["--debug-rollout-only"]
    assert main(argv + ["--prompt-data", str(data), "--save-debug-rollout-data", dumps, *extra]) == 0
    return load_rollout(dumps, 0)


def test_chat_template_path_and_kwargs(tmp_path, reward, small_data):
    template = tmp_path / "think.jinja"
    template.write_text(THINK_TEMPLATE)
    off = one_rollout(tmp_path, "off", reward, small_data, "--chat-template-path", str(template),
                      "--apply-chat-template-kwargs", '{"enable_thinking": false}')  # fmt: skip
    on = one_rollout(tmp_path, "on", reward, small_data, "--chat-template-path", str(template))
    assert all(s.prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for s in off)
    assert all(s.prompt.endswith("<|im_start|>assistant\n") for s in on)
    tok = Tokenizer.from_pretrained(DEMO / "checkpoint")
    s = off[0]
    assert s.tokens[: s.prompt_length] == tok.encode(s.prompt)


def test_chat_template_kwargs_from_a_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("apply-chat-template: true\napply-chat-template-kwargs: {enable_thinking: false}\n")
    assert parse_args(["--config", str(cfg)]).apply_chat_template_kwargs == {"enable_thinking": False}


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--apply-chat-template-kwargs", "[1]"], "is not a JSON object"),
        (["--apply-chat-template-kwargs", "{x"], "not JSON"),
        (["--no-apply-chat-template", "--chat-template-path", "t.jinja"], "read only with --apply"),
        (["--chat-template-path", "nope.jinja"], "nope.jinja does not exist"),
        (["--rollout-max-context-len", "10", "--rollout-max-prompt-len", "10"], "lower it to at most 9"),
        (["--num-epoch", "2"], "pass one of them"),
        (["--ref-load", "x"], "no KL term is on"),
        (["--use-kl-loss", "--ref-load", "nowhere"], "neither an HF checkpoint"),
        (["--start-rollout-id", "2"], "leaves no rollout below --num-rollout 2"),
    ],
)  # fmt: skip
def test_refused(capsys, tmp_path, reward, extra, needle):
    assert needle in error_of(capsys, demo_argv(tmp_path / "r", reward) + extra)


def test_rollout_max_context_len(tmp_path, reward, small_data):
    tok = Tokenizer.from_pretrained(DEMO / "checkpoint")
    prompts = PromptDataset(small_data, tok, input_key="prompt", label_key="label", apply_chat_template=True)
    limit = max(len(p.prompt_ids) for p in prompts) + 3  # the demo model answers in about 7 tokens
    samples = one_rollout(tmp_path, "ctx", reward, small_data, "--rollout-max-context-len", str(limit))
    assert max(len(s.tokens) for s in samples) == limit
    assert all(s.status == Status.TRUNCATED for s in samples if len(s.tokens) == limit)
    assert all(s.response_length <= limit - s.prompt_length for s in samples)


def test_num_epoch_counts_rollouts_from_the_data(tmp_path, reward, small_data):
    """4 prompts, 2 a rollout, 2 epochs: 4 rollouts, each prompt drawn once an epoch."""
    four = tmp_path / "four.jsonl"
    four.write_text("\n".join(small_data.read_text().splitlines()[:4]) + "\n")
    dumps = str(tmp_path / "d{rollout_id}.pt")
    argv = demo_argv(tmp_path / "run", reward, data=False)
    i = argv.index("--num-rollout")
    del argv[i : i + 2]
    argv += ["--prompt-data", str(four), "--num-epoch", "2", "--save-debug-rollout-data", dumps]
    assert main(argv + ["--debug-rollout-only"]) == 0
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4]
    seen = [s.prompt for r in range(4) for s in load_rollout(dumps, r)[::4]]
    assert len(set(seen[:4])) == 4 and sorted(seen[:4]) == sorted(seen[4:])


def test_start_rollout_id(tmp_path, reward):
    dumps = str(tmp_path / "d{rollout_id}.pt")
    assert (
        main(demo_argv(tmp_path / "a", reward) + ["--save-debug-rollout-data", dumps, "--debug-rollout-only"])
        == 0
    )
    Path(dumps.format(rollout_id=0)).unlink()  # the replay from rollout 1 on never reads it
    b = tmp_path / "b"
    assert (
        main(demo_argv(b, None, data=False) + ["--load-debug-rollout-data", dumps, "--start-rollout-id", "1"])
        == 0
    )
    assert [r["step"] for r in rows(b)] == [2]
    c = tmp_path / "c"
    assert main(demo_argv(c, reward, n_rollout=3) + ["--start-rollout-id", "2", "--debug-rollout-only"]) == 0
    assert [r["step"] for r in rows(c)] == [3] and rows(c)[0]["rollout/oldest_weight_version"] == 2


def test_ref_load(tmp_path):
    """The KL term's reference is --ref-load's weights (the policy starts at --hf-checkpoint's, so without
    it the first step's KL is 0): an HF folder, or a --save folder's newest checkpoint (the same weights
    as that run's final HF folder, so the same first-step KL)."""
    reward = tmp_path / "reward.py"  # the index term keeps advantages nonzero, so the saving run trains
    reward.write_text("async def reward(args, sample):\n    return 0.5 * (sample.index % 2)\n")
    other = tmp_path / "other"
    shutil.copytree(DEMO / "checkpoint", other)
    weights = load_file(other / "model.safetensors")
    torch.manual_seed(0)
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in weights.items()}, other / "model.safetensors")
    kl = ["--use-kl-loss", "--kl-loss-coef", "0.1", "--kl-loss-type", "low_var_kl"]

    def first_kl(name, *extra):
        assert main(demo_argv(tmp_path / name, reward, n_rollout=1) + kl + list(extra)) == 0
        return rows(tmp_path / name)[0]["train/kl_loss"]

    hf = first_kl("hf", "--ref-load", str(other))
    assert hf > 1e-4
    ckpts = tmp_path / "ckpts"
    first_kl("saver", "--save", str(ckpts))
    from_save = first_kl("from_save", "--ref-load", str(ckpts))
    from_its_hf = first_kl("from_hf", "--ref-load", str(tmp_path / "saver" / "final_hf"))
    assert from_save == from_its_hf > 0


def test_parquet_prompt_data(tmp_path, reward, small_data):
    pa = pytest.importorskip("pyarrow", reason="pip install 'miles-core[parquet]'")
    import pyarrow.parquet as pq

    parquet = tmp_path / "small.parquet"
    pq.write_table(
        pa.Table.from_pylist([json.loads(x) for x in small_data.read_text().splitlines()]), parquet
    )
    from_parquet = one_rollout(tmp_path, "pq", reward, parquet)
    from_jsonl = one_rollout(tmp_path, "jl", reward, small_data)
    assert [s.tokens for s in from_parquet] == [s.tokens for s in from_jsonl]


def test_pass_at_k_by_hand():
    counts = [(4, 1), (4, 0), (4, 4)]
    # prompt 1: 1 - C(3,k)/C(4,k); prompt 2: 0; prompt 3: 1
    assert pass_at_k(counts, 1) == pytest.approx((0.25 + 0 + 1) / 3)
    assert pass_at_k(counts, 2) == pytest.approx((1 - 3 / 6 + 0 + 1) / 3)
    assert pass_at_k(counts, 4) == pytest.approx((1 + 0 + 1) / 3)
    assert set(pass_at_k_metrics(counts, "eval/x")) == {"eval/x/pass@1", "eval/x/pass@2", "eval/x/pass@4"}
    assert set(pass_at_k_metrics([(3, 1), (8, 2)], "e")) == {"e/pass@1", "e/pass@2"}
    assert pass_at_k_metrics([(1, 1)], "e") == {}


def test_eval_config(tmp_path, reward, small_data):
    """Two eval datasets with their own keys, samples per prompt, temperature and length: the hot one
    truncates at 3 tokens and has pass@k, the greedy one (other keys) has identical samples per prompt."""
    other = tmp_path / "qa.jsonl"
    rows_ = [json.loads(x) for x in small_data.read_text().splitlines()]
    other.write_text(
        "".join(json.dumps({"question": r["prompt"], "answer": r["label"]}) + "\n" for r in rows_)
    )
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"""
eval:
  defaults:
    n_samples_per_eval_prompt: 4
  datasets:
    - name: hot
      path: {small_data}
      temperature: 3.0
      max_response_len: 3
    - name: greedy
      path: {other}
      input_key: question
      label_key: answer
      temperature: 0.0
""")
    run = tmp_path / "run"
    unread = ["--eval-prompt-data", "unread", "nope.jsonl"]  # the config wins, as in slime
    argv = demo_argv(run, reward, n_rollout=1) + ["--eval-config", str(cfg), "--eval-interval", "1"]
    assert main(argv + unread) == 0
    last = [r for r in rows(run) if "eval/hot/accuracy" in r][-1]
    assert last["eval/hot/num_samples"] == 24 and last["eval/greedy/num_samples"] == 24
    assert last["eval/hot/response_len_mean"] <= 3 and last["eval/hot/truncated_frac"] > 0
    assert last["eval/greedy/response_len_mean"] > 3
    assert last["eval/hot/pass@1"] == pytest.approx(last["eval/hot/accuracy"])
    assert last["eval/greedy/pass@1"] == pytest.approx(last["eval/greedy/accuracy"])
    g = [last[f"eval/greedy/pass@{k}"] for k in (1, 2, 4)]
    assert g[0] == g[1] == g[2] > 0  # greedy: a prompt's 4 samples are all right or all wrong
    assert not any(k.startswith("eval/unread") for k in last)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_eval_problems"] == 6


@pytest.mark.parametrize(
    "text, needle",
    [
        ("eval:\n  datasets: []\n", "defines no datasets"),
        ("eval:\n  datasets:\n    - name: a\n", "needs a name and a path"),
        ("eval:\n  datasets:\n    - {name: a, path: PATH, temprature: 1}\n", "unknown keys ['temprature']"),
        ("eval:\n  defaults: {n_samples_per_eval_prompt: 0}\n  datasets:\n    - {name: a, path: PATH}\n",
         "n_samples_per_eval_prompt must be an integer of at least 1"),
        ("eval:\n  datasets:\n    - {name: a, path: PATH, rm_type: math}\n", "would be ignored"),
        ("datasets:\n  a: {path: PATH}\n  b: {path: nope.jsonl}\n", "nope.jsonl does not exist"),
        ("eval:\n  datasets:\n    - {name: a, path: PATH, top_k: 0}\n", "top_k must be -1"),
    ],
)  # fmt: skip
def test_eval_config_mistakes(capsys, tmp_path, reward, small_data, text, needle):
    cfg = tmp_path / "e.yaml"
    cfg.write_text(text.replace("PATH", str(small_data)))
    argv = demo_argv(tmp_path / "r", reward, n_rollout=1) + ["--eval-config", str(cfg)]
    assert needle in error_of(capsys, argv)


def test_eval_input_and_label_keys(tmp_path, reward, small_data):
    """--eval-prompt-data files with other keys than the training data's, named by --eval-input-key and
    --eval-label-key; the label reaches the reward (the demo model gets some right)."""
    qa = tmp_path / "qa.jsonl"
    lines = [json.loads(x) for x in small_data.read_text().splitlines()]
    qa.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["label"]}) + "\n" for r in lines))
    run = tmp_path / "run"
    argv = demo_argv(run, reward, n_rollout=1) + ["--debug-rollout-only", "--eval-prompt-data", "qa", str(qa)]
    argv += ["--eval-input-key", "question", "--eval-label-key", "answer", "--eval-temperature", "0"]
    dumps = str(tmp_path / "d{rollout_id}.pt")
    assert main(argv + ["--save-debug-rollout-data", dumps]) == 0
    evals = [r for r in rows(run) if "eval/qa/accuracy" in r]
    assert len(evals) == 2 and evals[0]["eval/qa/num_samples"] == 6 and evals[0]["eval/qa/accuracy"] > 0
    before, after = load_rollout(str(tmp_path / "deval_{rollout_id}.pt"), 0), load_rollout(dumps, "eval_1")
    assert [s.label for s in before] == [r["label"] for r in lines] and len(after) == 6
    assert [s.prompt for s in before] == [s.prompt for s in after]
