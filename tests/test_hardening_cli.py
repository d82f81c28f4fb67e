"""`miles train` refuses bad numbers, damaged files, changed flags and unusable run dirs in one sentence.

`CASES` is the table: each row is a command (tiny runs on the demo checkpoint), its exit status and
a fragment of the one sentence it must print (once). Rows marked ``early`` must fail before any model
loads (``load_model`` is replaced by a tripwire). No row may print a traceback. Below the table: a
real ``miles train`` killed by SIGKILL in the middle of a checkpoint write, and the flag-parser checks
(help text, --no-FLAG, YAML values, one-line argparse errors, a torch-free ``miles --help``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from miles_core.cli import main
from miles_core.testing import one_torch_thread  # noqa: F401  (an autouse fixture)

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "arith" / "checkpoint"
TRAIN = REPO / "examples" / "arith" / "data" / "train.jsonl"


def tiny(run_dir: Path, *extra: str) -> list[str]:
    """A one-rollout run on the demo checkpoint, with ``extra`` flags appended (the last flag wins)."""
    return [
        "train",
        "--hf-checkpoint", str(DEMO),
        "--prompt-data", str(TRAIN),
        "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
        "--rm-type", "math",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--num-rollout", "1",
        "--rollout-max-response-len", "4",
        "--run-dir", str(run_dir),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Checkpoints iter_0000001 and iter_0000002 of a two-rollout run with the flags of `tiny`."""
    root = tmp_path_factory.mktemp("saved")
    argv = tiny(root / "run", "--num-rollout", "2", "--save", str(root / "ck"), "--save-interval", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test one_torch_thread
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "ck"


# ---------------------------------------------------------------------------------------------------
# setups: each gets the case's folder (with ``ck/``, a copy of `saved`, when the command names {ck})


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def hf_copy(tmp: Path, damage: Callable[[Path], None]) -> None:
    shutil.copytree(DEMO, tmp / "hf")
    damage(tmp / "hf")


def metrics_of_another_run(tmp: Path) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.jsonl").write_text('{"step": 1, "old/marker": 1.0}\n')


def config(text: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / "c.yaml").write_text(textwrap.dedent(text))


def unwritable(tmp: Path) -> None:
    (tmp / "ro").mkdir()
    os.chmod(tmp / "ro", 0o555)


def leftovers(tmp: Path) -> None:
    (tmp / "ck" / ".iter_0000003.k2j4.tmp" / "model").mkdir(parents=True)
    (tmp / "ck" / ".latest_checkpointed_iteration.txt.a1b2.tmp").write_text("3")


# Root writes through a read-only mode bit; a folder under /sys is refused even to root.
RO_DIR = "/sys/miles-run" if hasattr(os, "geteuid") and os.geteuid() == 0 else "{tmp}/ro/run"


@dataclass
class Case:
    id: str
    extra: list[str]  # appended to `tiny`; {tmp} is the case's folder, {ck} its copy of `saved`
    code: int
    fragment: str  # printed exactly once (for errors: in the one `miles: error:` line)
    setup: Callable[[Path], None] | None = None
    early: bool = False  # must fail before any model loads
    absent: str | None = None  # must not appear in the output
    check: Callable[[Path], None] | None = None  # a further check of the folder afterwards
    argv: list[str] | None = field(default=None)  # the whole command instead of `tiny` + extra


CASES = [
    # --- numbers
    Case("n-samples-0", ["--n-samples-per-prompt", "0"], 2,
         "--n-samples-per-prompt must be at least 1, got 0", early=True),
    Case("global-batch-0", ["--global-batch-size", "0"], 2, "--global-batch-size must be at least 1, got 0",
         early=True),
    Case("micro-batch-0", ["--micro-batch-size", "0"], 2, "--micro-batch-size must be at least 1, got 0",
         early=True),
    Case("micro-batch-negative", ["--micro-batch-size", "-2"], 2,
         "--micro-batch-size must be at least 1, got -2", early=True),
    Case("temperature-negative", ["--rollout-temperature", "-1"], 2,
         "--rollout-temperature must be 0 (greedy) or more, got -1.0", early=True),
    Case("top-p-0", ["--rollout-top-p", "0"], 2, "--rollout-top-p must be in (0, 1]", early=True),
    Case("response-len-0", ["--rollout-max-response-len", "0"], 2,
         "--rollout-max-response-len must be at least 1, got 0", early=True),
    Case("batch-above-dataset", ["--rollout-batch-size", "5000"], 2,
         "--rollout-batch-size 5000 is larger than the 4000 usable prompts", early=True),
    Case("grpo-one-sample", ["--n-samples-per-prompt", "1"], 0,
         "--advantage-estimator grpo with --n-samples-per-prompt 1 compares each sample only with itself"),
    # --- damaged files
    Case("truncated-safetensors", ["--hf-checkpoint", "{tmp}/hf"], 2,
         "model.safetensors is truncated or not a safetensors file",
         setup=lambda t: hf_copy(t, lambda d: truncate(d / "model.safetensors"))),
    Case("garbage-safetensors", ["--hf-checkpoint", "{tmp}/hf"], 2,
         "model.safetensors is truncated or not a safetensors file",
         setup=lambda t: hf_copy(t, lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)))),
    Case("malformed-config", ["--hf-checkpoint", "{tmp}/hf"], 2, "config.json is not valid JSON",
         setup=lambda t: hf_copy(t, lambda d: truncate(d / "config.json"))),
    *[
        Case(f"truncated-{name}", ["--load", "{ck}"], 0,
             f"iter_0000002 is unusable: {name} is truncated or corrupt",
             setup=lambda t, name=name: truncate(t / "ck" / "iter_0000002" / name))
        for name in ("trainer.pt", "rng.json", "loop_state.json", "args.json")
    ],
    Case("truncated-model", ["--load", "{ck}"], 0,
         "iter_0000002 is unusable: model/model.safetensors is truncated or corrupt",
         setup=lambda t: truncate(t / "ck" / "iter_0000002" / "model" / "model.safetensors")),
    Case("fallback-names-the-one-used", ["--load", "{ck}"], 0, "iter_0000001 instead",
         setup=lambda t: truncate(t / "ck" / "iter_0000002" / "trainer.pt")),
    Case("all-checkpoints-damaged", ["--load", "{ck}"], 2, "no usable checkpoint in", early=True,
         setup=lambda t: [truncate(t / "ck" / f"iter_000000{i}" / "trainer.pt") for i in (1, 2)]),
    Case("load-missing", ["--load", "{tmp}/nope"], 2, "--load {tmp}/nope does not exist", early=True),
    Case("load-empty", ["--load", "{tmp}"], 2, "holds no checkpoint", early=True),
    Case("load-is-save-starts", ["--load", "{tmp}/new", "--save", "{tmp}/new"], 0,
         "no checkpoint in {tmp}/new yet (--load is --save): starting from",
         check=lambda t: (t / "new" / "iter_0000001" / "args.json").is_file() or pytest.fail("no args.json")),
    Case("load-is-save-resumes", ["--load", "{ck}", "--save", "{ck}"], 0,
         "resumed from {tmp}/ck/iter_0000002", setup=metrics_of_another_run),
    Case("leftovers-cleaned", ["--load", "{ck}", "--save", "{ck}"], 0,
         "removed leftovers of an interrupted checkpoint write",
         setup=leftovers, check=lambda t: not list((t / "ck").glob(".*tmp")) or pytest.fail("leftover")),
    Case("keep-last-n", ["--save", "{tmp}/keep", "--num-rollout", "3", "--save-interval", "1",
                         "--keep-last-n-checkpoints", "2"], 0, "done in",
         check=lambda t: sorted(p.name for p in (t / "keep").iterdir()) == [
             "iter_0000002", "iter_0000003", "latest_checkpointed_iteration.txt"] or pytest.fail("kept")),
    # --- resuming with changed flags
    Case("changed-lr-and-samples", ["--load", "{ck}", "--lr", "2e-4", "--n-samples-per-prompt", "4"], 2,
         "--lr 1e-06 -> 0.0002, --n-samples-per-prompt 2 -> 4); resume with the saved values", early=True),
    Case("changed-plugin-flag", ["--load", "{ck}", "--use-rollout-routing-replay"], 2,
         "--use-rollout-routing-replay false -> true", early=True),
    Case("changed-allowed", ["--load", "{ck}", "--lr", "2e-4", "--allow-changed-args"], 0,
         "with changed flags (--allow-changed-args): --lr 1e-06 -> 0.0002"),
    Case("neutral-flags-may-change", ["--load", "{ck}", "--micro-batch-size", "2", "--eval-interval", "5",
                                      "--num-rollout", "3", "--save", "{tmp}/more"], 0,
         "resumed from {tmp}/ck/iter_0000002 at rollout 2"),
    # --- run dir
    Case("run-dir-is-file", ["--run-dir", "{tmp}/f"], 2, "--run-dir {tmp}/f cannot be a folder because",
         setup=lambda t: (t / "f").write_text("x"), early=True),
    Case("run-dir-under-file", ["--run-dir", "{tmp}/f/run"], 2, "because {tmp}/f is a file",
         setup=lambda t: (t / "f").write_text("x"), early=True),
    Case("run-dir-unwritable", ["--run-dir", RO_DIR], 2, "is not writable", setup=unwritable, early=True),
    Case("save-is-file", ["--save", "{tmp}/f"], 2, "--save {tmp}/f cannot be a folder because",
         setup=lambda t: (t / "f").write_text("x"), early=True),
    Case("run-dir-of-another-run", [], 2, "already holds another run's metrics; pass --overwrite",
         setup=metrics_of_another_run, early=True),
    Case("overwrite", ["--overwrite"], 0, "--overwrite: removed the previous run's metrics",
         setup=metrics_of_another_run,
         check=lambda t: "old/" not in (t / "run" / "metrics.jsonl").read_text() or pytest.fail("kept")),
    # --- flags
    Case("argparse-type-error", ["--rollout-batch-size", "x"], 2,
         "argument --rollout-batch-size: invalid int value: 'x'; see miles train --help.", early=True,
         absent="usage:"),
    Case("yaml-bool-word", ["--config", "{tmp}/c.yaml"], 2,
         "apply-chat-template must be true or false, got 'maybe'",
         setup=config("apply-chat-template: maybe\n"), early=True),
    Case("yaml-fractional-int", ["--config", "{tmp}/c.yaml"], 2,
         "rollout-batch-size must be an integer, got 8.5",
         setup=config("rollout-batch-size: 8.5\n"), early=True),
    Case("yaml-choice", ["--config", "{tmp}/c.yaml"], 2, "kl-loss-type is 'k9'; choose one of k1, k2, k3",
         setup=config("kl-loss-type: k9\n"), early=True),
    Case("yaml-disable-plugins", ["--config", "{tmp}/c.yaml"], 2,
         "--disable-plugins is read before the config file; pass it on the command line",
         setup=config("disable-plugins: [r3]\n"), early=True),
    Case("eval-data-flag-named", ["--eval-prompt-data", "toy", "{tmp}/nope.jsonl"], 2,
         "pass an existing .jsonl or .parquet to --eval-prompt-data.", early=True),
    Case("parallel-not-launched", ["--tensor-model-parallel-size", "2"], 2,
         "needs one trainer process per model-parallel rank, which no train backend launches yet", early=True,
         absent="usage:"),
    Case("no-reward", ["--rm-type", ""], 2, "no reward: pass --rm-type NAME (installed: ", early=True),
    Case("unknown-backend", ["--rollout-backend", "vllm"], 2,
         "unknown --rollout-backend 'vllm'; installed: http, sglang, torch", early=True),
]  # fmt: skip


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{ck}", str(tmp / "ck"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, saved, tmp_path, capsys, monkeypatch):
    if any("{ck}" in a for a in case.extra):
        shutil.copytree(saved, tmp_path / "ck")
    if case.setup is not None:
        case.setup(tmp_path)
    if case.early:

        def tripwire(*args, **kwargs):
            raise AssertionError(f"{case.id}: a model was loaded before the error")

        monkeypatch.setattr("miles_core.loop.load_model", tripwire)
    argv = tiny(tmp_path / "run", *(_fill(a, tmp_path) for a in case.extra))
    code = main(argv)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text, text
    assert code == case.code, text
    fragment = _fill(case.fragment, tmp_path)
    if case.code == 2:
        errors = [line for line in out.err.splitlines() if line.startswith("miles: error: ")]
        assert len(errors) == 1 and fragment in errors[0], text
    assert text.count(fragment) == 1, text
    if case.absent is not None:
        assert case.absent not in text, text
    if case.check is not None:
        case.check(tmp_path)


# ---------------------------------------------------------------------------------------------------
# kill -9 in the middle of a checkpoint write

# Runs `miles train` with torch.save stalling once it has written trainer.pt into the temporary folder
# of checkpoint 2: it touches the marker file and sleeps until the test kills it.
STALLING_MILES = """
import sys, time
from pathlib import Path
import torch
from miles_core.cli import main

real_save = torch.save

def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if Path(f).parent.name.startswith(".iter_0000002."):
        Path(sys.argv[1]).write_text(str(f))
        time.sleep(600)

torch.save = save
sys.exit(main(sys.argv[2:]))
"""


def test_kill_mid_checkpoint_then_resume_and_fall_back(tmp_path, capsys):
    ck, run = tmp_path / "ck", tmp_path / "run"
    argv = tiny(run, "--num-rollout", "3", "--save-interval", "1", "--save", str(ck), "--load", str(ck))
    (tmp_path / "stalling.py").write_text(STALLING_MILES)
    marker = tmp_path / "writing"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path]),
        "MILES_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
    }
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "stalling.py"), str(marker), *argv], stderr=log, stdout=log, env=env
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "the checkpoint write never started"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert list(ck.glob(".iter_0000002.*.tmp")) and (ck / "iter_0000001").is_dir()
    assert not (ck / "iter_0000002").exists()

    capsys.readouterr()
    assert main(argv) == 0  # the next start: cleans the leftover, resumes from checkpoint 1
    err = capsys.readouterr().err
    assert "removed leftovers of an interrupted checkpoint write" in err
    assert f"resumed from {ck / 'iter_0000001'} at rollout 1" in err
    assert not [p for p in ck.iterdir() if p.name.endswith(".tmp")]
    assert {p.name for p in ck.glob("iter_*")} == {"iter_0000001", "iter_0000002", "iter_0000003"}

    truncate(ck / "iter_0000003" / "trainer.pt")
    assert main(argv) == 0  # a damaged newest checkpoint: resume from the one before it, say so once
    lines = [x for x in capsys.readouterr().err.splitlines() if "is unusable" in x]
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"[miles] checkpoint {ck / 'iter_0000003'} is unusable: trainer.pt is truncated or corrupt ("
    ) and lines[0].endswith(f"; resuming from {ck / 'iter_0000002'} instead."), lines
    torch.load(ck / "iter_0000003" / "trainer.pt", weights_only=True)  # rewritten whole


def test_checkpoint_files_share_one_mode(tmp_path):
    """Every file of a checkpoint (tokenizer copies included) takes the umask, like any other file."""
    from miles_core.model import load_model, save_model
    from miles_core.train.checkpoint import save_checkpoint

    model = load_model(DEMO)

    class Trainer:
        def save_model(self, out, tokenizer_src):
            save_model(model, out, tokenizer_src)

        def state_dict(self):
            return {"step": torch.tensor(1)}

    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "ck", 1, Trainer(), {"next_rollout": 1}, str(DEMO), run_args={"lr": 1.0})
    finally:
        os.umask(old)
    files = {p.stat().st_mode & 0o777 for p in (tmp_path / "ck").rglob("*") if p.is_file()}
    folders = {p.stat().st_mode & 0o777 for p in (tmp_path / "ck").rglob("*") if p.is_dir()}
    assert files == {0o640} and folders == {0o750}


# ---------------------------------------------------------------------------------------------------
# flags


def test_every_flag_has_help_that_shows_its_default():
    from miles_core.args import build_parser
    from miles_core.plugins import get_plugin_manager

    parser = build_parser(get_plugin_manager())
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help"
        assert "default" in formatter._get_help_string(action).lower(), action.option_strings


def parsed(tmp_path, yaml_text: str, *argv: str):
    from miles_core.args import parse_args
    from miles_core.plugins import get_plugin_manager

    (tmp_path / "c.yaml").write_text(textwrap.dedent(yaml_text))
    return parse_args(["--config", str(tmp_path / "c.yaml"), *argv], get_plugin_manager())


@pytest.mark.parametrize(
    "yaml_text,argv,dest,want",
    [
        ("apply-chat-template: true\n", ["--no-apply-chat-template"], "apply_chat_template", False),
        ("rollout-shuffle: 'false'\n", [], "rollout_shuffle", False),
        ("rollout-shuffle: 'True'\n", [], "rollout_shuffle", True),
        ("use-rollout-routing-replay: true\n", ["--no-use-rollout-routing-replay"],
         "use_rollout_routing_replay", False),
        ("rollout-batch-size: 8.0\n", [], "rollout_batch_size", 8),
        ("rollout-batch-size: '8'\n", [], "rollout_batch_size", 8),
        ("lr: 1\n", [], "lr", 1.0),
        ("rollout-stop: '</s>'\n", [], "rollout_stop", ["</s>"]),
        ("rollout-batch-size: 8\n", ["--rollout-batch-size", "4"], "rollout_batch_size", 4),
    ],
)  # fmt: skip
def test_yaml_values_read_like_the_command_line(tmp_path, yaml_text, argv, dest, want):
    value = vars(parsed(tmp_path, yaml_text, *argv))[dest]
    assert value == want and type(value) is type(want)


def test_miles_help_does_not_import_torch():
    code = "import sys; from miles_core.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and "usage: miles COMMAND" in out.stdout, out.stderr
    assert out.stdout.strip().endswith("False")
