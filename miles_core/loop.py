"""The training loop of `miles train`: generate, reward, train, sync weights, log, save, eval.

`build_run` wires the parts together from the parsed flags; `run` / `_train` are the loop itself, short
enough to read in one sitting. Each part is reached only through its interface (engine.generate /
update_weights, trainer.train / named_weights / state_dict), so another backend can replace it. Rollouts
come from `miles_core.rollout.async_loop`: generated when the loop asks, or ahead of it with ``--async``.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from miles_core import drivers
from miles_core.args import build_parser
from miles_core.atomic import atomic_write_json
from miles_core.data import PromptDataset, RolloutDataSource, Tokenizer
from miles_core.logging import MetricsLogger, get_logger, plot_curves, progress
from miles_core.model import load_model
from miles_core.protocols import RolloutBackend, TrainBackend
from miles_core.rollout.async_loop import SyncRollouts, open_rollouts
from miles_core.rollout.dumps import ReplayedRollouts, save_rollout
from miles_core.rollout.eval_sets import build_eval_sets
from miles_core.rollout.manager import RolloutManager
from miles_core.run_dir import check_output_dirs
from miles_core.train.advantages import group_sizes
from miles_core.train.checkpoint import load_checkpoint, save_checkpoint
from miles_core.train.models import load_train_models
from miles_core.train.resume import resolve_resume
from miles_core.types import EXCLUDED, Sample, TrainBatch, UsageError
from miles_core.wandb_sink import open_wandb

log = get_logger(__name__)


@dataclass
class Run:
    args: argparse.Namespace
    pm: Any
    tokenizer: Tokenizer
    engine: RolloutBackend | None  # None with --debug-train-only
    trainer: TrainBackend | None  # None with --debug-rollout-only
    rollouts: RolloutManager | None  # None with --debug-train-only (rollouts come from saved files)
    source: RolloutDataSource | None
    logger: MetricsLogger
    start_rollout: int
    state: dict  # loop state saved with checkpoints (accuracy_before, ...)


def pick_device(args: argparse.Namespace) -> torch.device:
    if args.device:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(
                f"--device {args.device} was asked for but no CUDA device is visible; use --device cpu."
            )
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rollout_dtype(args: argparse.Namespace, device: torch.device) -> str:
    """The engine's weight dtype: ``--rollout-dtype``, else bf16 on GPU and fp32 on CPU; with
    ``--true-on-policy-mode`` the trainer's (bf16 with ``--bf16``, else fp32). `miles serve` uses it too."""
    if args.true_on_policy_mode:
        return "bfloat16" if args.bf16 else "float32"
    return args.rollout_dtype or ("bfloat16" if device.type == "cuda" else "float32")


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_run(args: argparse.Namespace, pm: Any) -> Run:
    """Load data, models, engine and trainer; resume from ``--load`` when it holds a checkpoint.

    Output folders, the checkpoint to resume from and its flags are checked before any model loads.
    """
    resume = resolve_resume(args, build_parser(pm))
    check_output_dirs(args, resuming=resume is not None)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = pick_device(args)
    tokenizer = Tokenizer.from_pretrained(args.hf_checkpoint, args.chat_template_path)
    common = dict(
        tokenizer=tokenizer,
        input_key=args.input_key,
        label_key=args.label_key,
        metadata_key=args.metadata_key,
        apply_chat_template=args.apply_chat_template,
        system_prompt=args.system_prompt,
        max_prompt_len=args.rollout_max_prompt_len,
        chat_template_kwargs=args.apply_chat_template_kwargs,
    )
    source = None if args.debug_train_only else _data_source(args, common)
    if args.start_rollout_id is not None and args.start_rollout_id >= args.num_rollout:
        raise UsageError(
            f"--start-rollout-id {args.start_rollout_id} leaves no rollout below --num-rollout "
            f"{args.num_rollout}; lower it or raise --num-rollout."
        )
    eval_sets = {} if args.debug_train_only else build_eval_sets(args, common)

    weights = str(resume / "model") if resume else args.hf_checkpoint
    trainer: TrainBackend | None = None
    if args.use_ray:  # trainer ranks and engines as Ray actors (miles_core.distributed)
        from miles_core.distributed.build import build_scaled_out

        engine, trainer = build_scaled_out(args, weights)
    else:
        engine, policy, ref = _single_process(args, pm, weights, device, tokenizer)
    try:
        if trainer is None and not args.debug_rollout_only:
            trainer = drivers.get_train_backend(args.train_backend)(args, pm, policy, ref)
        state: dict = {"next_rollout": 0}
        if resume:
            trainer_state, state = load_checkpoint(resume)
            if "sharded" in trainer_state and not args.use_ray:
                raise UsageError(
                    f"the checkpoint {resume} holds optimizer state sharded by the trainer ranks of a "
                    "--use-ray run; resume it with --use-ray (any number of ranks)."
                )
            trainer.load_state_dict(trainer_state)
            if source is not None and state.get("data") is not None:
                source.load_state_dict(state["data"])
            log.info("resumed from %s at rollout %d", resume, state["next_rollout"])
        start = state["next_rollout"] if args.start_rollout_id is None else args.start_rollout_id
        if engine is not None:
            engine.weight_version = start
        logger = MetricsLogger(
            args.run_dir,
            resume_from_step=state["next_rollout"] + 1 if resume else None,
            sinks=open_wandb(args),
        )
        rollouts = None if engine is None else RolloutManager(args, pm, engine, tokenizer, source, eval_sets)
    except BaseException:
        if engine is not None:
            engine.close()  # a backend's server processes must not outlive a run that failed to start
        _close_trainer(trainer)
        raise
    return Run(args, pm, tokenizer, engine, trainer, rollouts, source, logger, start, state)


def _data_source(args: argparse.Namespace, common: dict) -> RolloutDataSource:
    prompts = PromptDataset(args.prompt_data, **common)
    if args.rollout_batch_size > len(prompts):
        raise UsageError(
            f"--rollout-batch-size {args.rollout_batch_size} is larger than the {len(prompts)} usable "
            f"prompts of {args.prompt_data}; lower it to at most {len(prompts)} or add prompts."
        )
    if args.num_epoch is not None:  # slime: num_rollout = num_epoch * dataset_size // rollout_batch_size
        args.num_rollout = args.num_epoch * len(prompts) // args.rollout_batch_size
    return RolloutDataSource(
        prompts, args.rollout_batch_size, shuffle=args.rollout_shuffle, seed=args.rollout_seed
    )


def _single_process(
    args: argparse.Namespace, pm: Any, weights: str, device: torch.device, tokenizer: Tokenizer
) -> tuple[RolloutBackend | None, Any, Any]:
    """The engine (the rollout backend's), the policy and the reference model of a single-process run;
    ``--debug-train-only`` builds no engine, ``--debug-rollout-only`` no policy or reference."""
    policy, ref = (None, None) if args.debug_rollout_only else load_train_models(args, pm, weights, device)
    if args.debug_train_only:
        return None, policy, ref
    engine_dtype = rollout_dtype(args, device)
    # Backends are named implementations (entry points), so another one plugs in without loop changes.
    backend = drivers.get_rollout_backend(args.rollout_backend)
    engine_model = None
    if backend.in_process:  # a served backend's engines load their own weights
        engine_model = load_model(weights, dtype=_dtype(engine_dtype), device=device).requires_grad_(False)
        pm.hook.configure_model(args=args, model=engine_model, role="rollout")
    return backend.from_args(args, engine_model, tokenizer), policy, ref


def _close_trainer(trainer: Any) -> None:
    """A train backend's optional ``close`` (trainer ranks stop their processes there)."""
    close = getattr(trainer, "close", None)
    if close is not None:
        close()


def make_train_batch(samples: list[Sample], args: argparse.Namespace) -> TrainBatch:
    """Tensors for training; FAILED and ABORTED samples stay in their group with an all-zero loss mask.
    Every sample has at least one response token (the rollout manager checks generated samples and gives
    a failed one a filler token)."""
    rewards = []
    for s in samples:
        rewards.append(s.get_reward_value(args.reward_key) if s.status not in EXCLUDED else float("nan"))
    r = torch.tensor(rewards, dtype=torch.float32)
    batch = TrainBatch(samples=samples, rewards=r, tokens=[], loss_masks=[])
    for chunk in r.split(group_sizes(batch, args.n_samples_per_prompt)):
        ok = ~torch.isnan(chunk)  # a failed sample takes its group's mean: no advantage signal
        chunk[~ok] = chunk[ok].mean() if ok.any() else 0.0
    for s in samples:
        m = torch.tensor(
            s.loss_mask if s.loss_mask is not None else [1] * s.response_length, dtype=torch.float32
        )
        batch.loss_masks.append(m * 0 if s.status in EXCLUDED else m)
        batch.tokens.append(torch.tensor(s.tokens, dtype=torch.long))
    if all(s.rollout_log_probs is not None for s in samples):
        batch.rollout_log_probs = [
            torch.tensor(s.rollout_log_probs or [0.0] * s.response_length, dtype=torch.float32)
            for s in samples
        ]
    # Greedy samples (temperature <= 0) carry untempered log-probs: the trainer uses temperature 1.
    temps = [float(s.sampling_params.get("temperature", 1.0)) for s in samples]
    batch.temperatures = torch.tensor([t if t > 0 else 1.0 for t in temps], dtype=torch.float32)
    return batch


def _eval(run: Run, rollouts: SyncRollouts, rollout_id: int) -> dict[str, float]:
    metrics = rollouts.evaluate(rollout_id)
    run.logger.log(rollout_id, metrics)
    return metrics


def _first_accuracy(metrics: dict[str, float]) -> float | None:
    keys = [k for k in metrics if k.startswith("eval/") and k.endswith("/accuracy")]
    return metrics[keys[0]] if keys else None


def run(args: argparse.Namespace, pm: Any) -> dict[str, Any]:
    """Run the whole job; returns the summary written to ``<run-dir>/summary.json``."""
    t0 = time.perf_counter()
    r = build_run(args, pm)
    try:
        try:
            opened = (
                ReplayedRollouts(args)
                if r.rollouts is None
                else open_rollouts(args, r.rollouts, r.engine, r.start_rollout)
            )
            with opened as rollouts:
                last_eval = _train(r, rollouts)
        finally:
            if r.engine is not None:
                r.engine.close()
        return _finish(r, last_eval, time.perf_counter() - t0)
    finally:
        rewards = getattr(r.rollouts, "rewards", None)
        if rewards is not None:  # its worker threads' event loops
            rewards.close()
        _close_trainer(r.trainer)  # after _finish: trainer ranks write the final model


def _train(r: Run, rollouts: SyncRollouts) -> dict[str, float]:
    """The loop: take a rollout, train on it, sync the weights, log, evaluate, save. With ``--async`` the
    next rollouts are generated meanwhile (`miles_core.rollout.async_loop`). Returns the last eval."""
    args = r.args
    evaluating = r.rollouts is not None and bool(r.rollouts.eval_sets)
    if evaluating and r.start_rollout == 0:
        r.state["accuracy_before"] = _first_accuracy(_eval(r, rollouts, 0))
        log.info("held-out accuracy before training: %.3f", r.state["accuracy_before"] or 0.0)
    last_eval: dict[str, float] = {}
    bar = progress(args.num_rollout, "GRPO", disable=None)
    bar.update(r.start_rollout)
    for rollout_id in range(r.start_rollout, args.num_rollout):
        t_step = time.perf_counter()
        samples, metrics = rollouts.take(rollout_id)
        if args.save_debug_rollout_data:
            save_rollout(args.save_debug_rollout_data, rollout_id, samples)
        if r.trainer is not None:
            metrics.update(_train_step(r, rollouts, rollout_id, samples))
        metrics["perf/step_time"] = time.perf_counter() - t_step  # eval and saving come after it
        r.logger.log(rollout_id + 1, metrics)
        bar.set_postfix(reward=f"{metrics['rollout/reward_mean']:.3f}")
        bar.update(1)
        done = rollout_id + 1
        if evaluating and args.eval_interval and done % args.eval_interval == 0:
            last_eval = _eval(r, rollouts, done)
        if args.save and (
            (args.save_interval and done % args.save_interval == 0) or done == args.num_rollout
        ):
            r.state.update(next_rollout=done, data=rollouts.data_state(done))
            save_checkpoint(
                args.save,
                done,
                r.trainer,
                r.state,
                args.hf_checkpoint,
                run_args=vars(args),
                keep_last=args.keep_last_n_checkpoints,
            )
    bar.close()
    if evaluating and not (
        args.eval_interval
        and args.num_rollout % args.eval_interval == 0
        and r.start_rollout < args.num_rollout
    ):
        last_eval = _eval(r, rollouts, args.num_rollout)
    return last_eval


def _train_step(r: Run, rollouts: SyncRollouts, rollout_id: int, samples: list[Sample]) -> dict[str, float]:
    """Train on one rollout and hand the engine the new weights; returns the train and perf metrics."""
    t_train = time.perf_counter()
    steps = r.trainer.train(rollout_id, make_train_batch(samples, r.args))
    t_sync = time.perf_counter()
    rollouts.update_weights(r.trainer.named_weights(), version=rollout_id + 1)
    perf = {"perf/train_time": t_sync - t_train, "perf/update_weights_time": time.perf_counter() - t_sync}
    return {**{f"train/{k}": float(np.mean([s[k] for s in steps if k in s])) for k in steps[-1]}, **perf}


def _finish(r: Run, last_eval: dict[str, float], wall_s: float) -> dict[str, Any]:
    args = r.args
    run_dir = Path(args.run_dir)
    hf_out = Path(args.save_hf) if args.save_hf else run_dir / "final_hf"
    if r.trainer is not None:
        r.trainer.save_model(hf_out, args.hf_checkpoint)
    r.logger.close()
    names = list(r.rollouts.eval_sets) if r.rollouts else []
    plot_curves(
        run_dir / "metrics.jsonl",
        run_dir / "curves.png",
        keys=("rollout/reward_mean", *(f"eval/{n}/accuracy" for n in names)),
    )
    summary = {
        "accuracy_before": r.state.get("accuracy_before"),
        "accuracy_after": _first_accuracy(last_eval),
        "num_eval_problems": len(r.rollouts.eval_sets[names[0]]) if names else 0,
        "num_rollout": args.num_rollout,
        "wall_s": round(wall_s, 2),
        "final_checkpoint": str(hf_out) if r.trainer is not None else None,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
