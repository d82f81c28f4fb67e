"""One GRPO step end to end (generate, reward, log-probs, update, weight sync): miles vs TRL's GRPOTrainer.

Both start from the same checkpoint (bench/rollout.py's random Qwen3-MoE, saved by miles and loaded into
transformers for TRL), the same prompts, group size, completion length and reward. miles runs its
engine (bf16 and CUDA graphs on a GPU) and trainer (packed micro-batches; on a GPU `--bf16`: bf16
weights, fp32 masters in the optimizer); TRL runs its defaults (transformers `generate`, no vLLM). Each
side's second step is timed. TRL is an optional dependency: `pip install trl` (it travels to the GPU
machine as wheels). Prints one JSON line.

Gradient checkpointing: TRL's trainer configs default to `gradient_checkpointing=True` (TRL 1.16,
`trl/trainer/base_config.py`), so its training forward runs twice; miles recomputes nothing unless
`--recompute-granularity` asks. `--trl-gradient-checkpointing` sets TRL's side explicitly (default `on`,
TRL's default) and the JSON line records it (`trl_gradient_checkpointing`). Generation is unaffected
either way: transformers (5.25 checked) keeps the KV cache when generating under `torch.no_grad()`.

    python bench/grpo_vs_trl.py --preset cpu-small [--trl-gradient-checkpointing on|off]
    python bench/grpo_vs_trl.py --preset gpu-0.7b
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from rollout import PRESETS, make_model, sync

from miles_core.args import parse_args
from miles_core.engine import Engine
from miles_core.loop import make_train_batch
from miles_core.model import load_model, save_model
from miles_core.plugins import get_plugin_manager
from miles_core.train.trainer import Trainer
from miles_core.types import Sample, Status

SHAPES = {
    "gpu-0.7b": dict(prompts=8, group=8, prompt_len=64, completion=128),
    "cpu-small": dict(prompts=2, group=4, prompt_len=8, completion=16),
}


def reward_ids(ids: list[int]) -> float:
    """A cheap stand-in task: the share of even token ids in the completion."""
    return sum(1 for t in ids if t % 2 == 0) / max(1, len(ids))


def miles_step_time(folder: str, prompts: list[list[int]], shape: dict, device: str) -> float:
    p, g = shape["prompts"], shape["group"]
    flags = ["--lr", "1e-6", "--rollout-batch-size", str(p), "--n-samples-per-prompt", str(g),
             "--global-batch-size", str(p * g), "--num-rollout", "2", "--advantage-estimator", "grpo",
             "--use-dynamic-batch-size", "--max-tokens-per-gpu", "16384"]  # fmt: skip
    if device == "cuda":
        flags.append("--bf16")
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    args = parse_args(flags, pm)
    rollout_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    engine = Engine(load_model(folder, dtype=rollout_dtype, device=device).requires_grad_(False), None,
                    max_batch_size=p * g, seed=0)  # fmt: skip
    trainer = Trainer(args, pm, load_model(folder, dtype=torch.float32, device=device))
    params = {"temperature": 1.0, "max_new_tokens": shape["completion"]}
    times = []
    for step in range(2):
        sync(device)
        t0 = time.perf_counter()
        outs = engine.generate_batch([q for q in prompts for _ in range(g)], params)
        samples = []
        for i, o in enumerate(outs):
            prompt = prompts[i // g]
            samples.append(Sample(
                group_index=i // g, index=i, tokens=prompt + o.output_ids, response_length=len(o.output_ids),
                rollout_log_probs=o.log_probs, loss_mask=[1] * len(o.output_ids),
                reward=reward_ids(o.output_ids), status=Status.COMPLETED,
            ))  # fmt: skip
        trainer.train(step, make_train_batch(samples, args))
        engine.update_weights(trainer.named_weights(), step + 1)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[-1]


def word_tokenizer(vocab: int):
    """A whitespace word-level tokenizer whose token i is the word "w{i}": text <-> ids one to one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w1", unk_token="w0")
    fast.padding_side = "left"
    return fast


def trl_step_time(
    folder: str, prompts: list[list[int]], shape: dict, device: str, checkpointing: bool
) -> float:
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    p, g = shape["prompts"], shape["group"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tok = word_tokenizer(model.config.vocab_size)
    texts = [" ".join(f"w{t}" for t in q) for q in prompts]
    # A fixed fingerprint: datasets would otherwise hash the table with dill (slow, and fragile across
    # pyarrow versions).
    data = Dataset(InMemoryTable.from_pydict({"prompt": texts * 2}), fingerprint="grpo-vs-trl")

    def reward(completions, **kw):
        return [reward_ids([int(w[1:]) for w in c.split() if w[1:].isdigit()]) for c in completions]

    class Clock(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, *a, **kw):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            sync(device)
            self.times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=p * g, gradient_accumulation_steps=1,
            num_generations=g, max_completion_length=shape["completion"], temperature=1.0,
            learning_rate=1e-6, beta=0.0, max_steps=2, logging_steps=1, report_to="none",
            save_strategy="no", bf16=device == "cuda", use_cpu=device == "cpu", disable_tqdm=True,
            seed=0, shuffle_dataset=False, gradient_checkpointing=checkpointing,
        )  # fmt: skip
        clock = Clock()
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=data,
                              processing_class=tok, callbacks=[clock])  # fmt: skip
        trainer.train()
    return clock.times[-1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(SHAPES), default="gpu-0.7b")
    ap.add_argument(
        "--trl-gradient-checkpointing",
        choices=["on", "off"],
        default="on",
        help="TRL's gradient_checkpointing (default on: TRL's own default; miles recomputes nothing)",
    )
    a = ap.parse_args(argv)
    preset, shape = PRESETS[a.preset], SHAPES[a.preset]
    device = preset["device"]
    g = torch.Generator().manual_seed(2)
    model = make_model(preset)
    vocab = model.config.vocab_size
    prompts = torch.randint(2, vocab, (shape["prompts"], shape["prompt_len"]), generator=g).tolist()
    n = shape["prompts"] * shape["group"]
    with tempfile.TemporaryDirectory() as folder:
        save_model(model.float(), folder)
        del model
        t_miles = miles_step_time(folder, prompts, shape, device)
        if device == "cuda":
            torch.cuda.empty_cache()
        t_trl = trl_step_time(folder, prompts, shape, device, a.trl_gradient_checkpointing == "on")
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "preset": a.preset,
        "miles_samples_s": round(n / t_miles, 2), "trl_samples_s": round(n / t_trl, 2),
        "ratio": round(t_trl / t_miles, 2), "samples_per_step": n, "group": shape["group"],
        "completion": shape["completion"], "miles_step_s": round(t_miles, 3), "trl_step_s": round(t_trl, 3),
        "trl_gradient_checkpointing": a.trl_gradient_checkpointing, "miles_recompute": "none",
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
