"""miles-specrl hook implementations: MTP heads on the models, speculative rollout, online MTP training,
and ``miles convert --add-mtp-layers``.

Only hookimpls live here; heavy modules are imported lazily. Runtime state (the speculator, the MTP trainer,
a separate draft model) lives on the module-level `_State`, replaced by each `configure`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from miles_core import Sample, TrainBatch, UsageError, hookimpl

ALGORITHMS = ("EAGLE", "NEXTN", "STANDALONE")


class _State:
    def __init__(self) -> None:
        self.speculator: Any = None
        self.mtp_trainer: Any = None
        self.draft_model: Any = None


_state = _State()


def state() -> _State:
    return _state


def _spec_on(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "sglang_speculative_algorithm", None))


def _mtp_layers(args: argparse.Namespace) -> int:
    return int(getattr(args, "mtp_num_layers", 0) or 0)


@hookimpl
def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "specrl", "Speculative rollout with MTP draft heads trained online (miles-specrl)."
    )
    g.add_argument(
        "--mtp-num-layers",
        type=int,
        default=0,
        help="Number of MTP depths on the policy (loaded from the checkpoint's "
        "model.layers.{L+d}.*; add them with `miles convert --add-mtp-layers N`).",
    )
    g.add_argument(
        "--enable-mtp-training",
        action="store_true",
        default=False,
        help="Train the MTP heads on each rollout (hidden states detached: the policy's "
        "gradients are unchanged) and sync them to the rollout draft.",
    )
    g.add_argument(
        "--mtp-loss-scaling-factor",
        type=float,
        default=0.2,
        help="Weight of the MTP loss (mean over depths) added to the training loss.",
    )
    g.add_argument(
        "--mtp-train-chain",
        type=int,
        default=0,
        help="Train MTP depth 1 chained N times, fed its own output state, the way EAGLE drafting reuses "
        "it for N draft tokens (set it to --sglang-speculative-num-steps); 0: DeepSeek-V3's loss per depth.",
    )
    g.add_argument(
        "--sglang-speculative-algorithm",
        type=str,
        default=None,
        help="EAGLE or NEXTN: draft with the MTP heads (or with the draft model, if given); "
        "STANDALONE: draft with --sglang-speculative-draft-model-path.",
    )
    g.add_argument(
        "--sglang-speculative-num-steps",
        type=int,
        default=None,
        help="Draft tokens proposed per decode step (default 3).",
    )
    g.add_argument(
        "--sglang-speculative-eagle-topk",
        type=int,
        default=None,
        help="Branching factor of the draft tree; only 1 (a chain) is supported.",
    )
    g.add_argument(
        "--sglang-speculative-num-draft-tokens",
        type=int,
        default=None,
        help="Tokens verified per step; with topk 1 it must be num-steps + 1 (the default).",
    )
    g.add_argument("--sglang-speculative-draft-model-path", type=str, default=None,
                   help="HF checkpoint of a small draft model sharing the target's tokenizer.")  # fmt: skip


@hookimpl
def configure(args: argparse.Namespace) -> bool:
    global _state
    if _state.mtp_trainer is not None:  # a previous run in this process: drop its gradient hooks
        _state.mtp_trainer.remove()
    _state = _State()
    if _mtp_layers(args) < 0:
        raise UsageError(f"--mtp-num-layers must be >= 0, got {args.mtp_num_layers}.")
    if args.enable_mtp_training and not _mtp_layers(args):
        raise UsageError("--enable-mtp-training needs MTP heads; pass --mtp-num-layers N (N >= 1).")
    if args.mtp_train_chain < 0:
        raise UsageError(f"--mtp-train-chain must be >= 0, got {args.mtp_train_chain}.")
    if args.mtp_train_chain and not args.enable_mtp_training:
        raise UsageError("--mtp-train-chain applies to online MTP training; add --enable-mtp-training.")
    if not _spec_on(args):
        return bool(_mtp_layers(args))
    algo = args.sglang_speculative_algorithm.upper()
    if algo not in ALGORITHMS:
        raise UsageError(
            f"--sglang-speculative-algorithm {args.sglang_speculative_algorithm} is not supported by the "
            f"built-in engine; use one of {list(ALGORITHMS)}."
        )
    args.sglang_speculative_algorithm = algo
    if algo == "STANDALONE" and not args.sglang_speculative_draft_model_path:
        raise UsageError(
            "--sglang-speculative-algorithm STANDALONE needs --sglang-speculative-draft-model-path."
        )
    if not args.sglang_speculative_draft_model_path and not _mtp_layers(args):
        raise UsageError(
            f"--sglang-speculative-algorithm {algo} drafts with the MTP heads; pass --mtp-num-layers N "
            "or --sglang-speculative-draft-model-path."
        )
    if (
        args.sglang_speculative_draft_model_path
        and not Path(args.sglang_speculative_draft_model_path).is_dir()
    ):
        raise UsageError(
            f"--sglang-speculative-draft-model-path {args.sglang_speculative_draft_model_path} does not "
            "exist; pass an HF checkpoint folder."
        )
    steps = args.sglang_speculative_num_steps
    steps = args.sglang_speculative_num_steps = 3 if steps is None else steps
    if steps < 1:
        raise UsageError(f"--sglang-speculative-num-steps must be >= 1, got {steps}.")
    topk = args.sglang_speculative_eagle_topk
    if topk not in (None, 1):
        raise UsageError(
            f"--sglang-speculative-eagle-topk {topk} (tree drafts) is not supported by the built-in engine; "
            "use 1."
        )
    args.sglang_speculative_eagle_topk = 1
    ndraft = args.sglang_speculative_num_draft_tokens
    if ndraft not in (None, steps + 1):
        raise UsageError(
            f"--sglang-speculative-num-draft-tokens {ndraft} does not fit a chain of {steps} steps; "
            f"with --sglang-speculative-eagle-topk 1 use {steps + 1} (or leave it unset)."
        )
    args.sglang_speculative_num_draft_tokens = steps + 1
    if getattr(args, "rollout_backend", "torch") != "torch":
        raise UsageError(
            "miles-specrl speculates in the built-in engine only; use --rollout-backend torch (pass "
            "SGLang's own speculative flags through --sglang-* for the sglang backend)."
        )
    return True


def _weights_path(args: argparse.Namespace) -> str:
    from miles_core.train.checkpoint import latest_checkpoint

    resume = latest_checkpoint(getattr(args, "load", None))
    return str(resume / "model") if resume else args.hf_checkpoint


@hookimpl
def configure_model(args: argparse.Namespace, model: Any, role: str) -> None:
    n = _mtp_layers(args)
    if role == "ref":
        return
    if n:
        from miles_specrl.mtp import attach_mtp, load_mtp_weights

        heads = attach_mtp(model, n)
        load_mtp_weights(heads, _weights_path(args))
        train = role == "train" and args.enable_mtp_training
        heads.requires_grad_(train)
        if train:
            from miles_specrl.training import MTPTrainer

            _state.mtp_trainer = MTPTrainer(
                args.mtp_loss_scaling_factor, args.clip_grad, args.mtp_train_chain
            )
            _state.mtp_trainer.install(heads)
    if role == "rollout" and _spec_on(args) and args.sglang_speculative_draft_model_path:
        from miles_core.model import load_model

        p = next(model.parameters())
        draft = load_model(args.sglang_speculative_draft_model_path, dtype=p.dtype, device=p.device)
        _state.draft_model = draft.requires_grad_(False)


@hookimpl
def pre_rollout(args: argparse.Namespace, rollout_id: int, engine: Any) -> None:
    if not _spec_on(args):
        return
    if _state.speculator is None:
        from miles_specrl.drafters import ModelDrafter, MTPDrafter
        from miles_specrl.speculator import Speculator

        drafter = ModelDrafter(_state.draft_model) if _state.draft_model is not None else MTPDrafter()
        _state.speculator = Speculator(drafter, args.sglang_speculative_num_steps)
    _state.speculator.attach(engine)
    _state.speculator.reset()


@hookimpl
def rollout_metrics(args: argparse.Namespace, rollout_id: int, samples: list[Sample]) -> dict | None:
    spec = _state.speculator
    if spec is None:
        return None
    t = spec.totals  # per-sample spec_info came with each EngineOutput (copied by generate_into)
    return {
        "spec_accept_length": t.emitted / t.steps if t.steps else 0.0,
        "spec_accept_rate": t.accepted / t.drafted if t.drafted else 0.0,
        "spec_verify_steps": float(t.steps),
    }


@hookimpl
def pre_forward(args: argparse.Namespace, model: Any, batch: TrainBatch, stage: str) -> None:
    if stage == "train" and _state.mtp_trainer is not None:
        _state.mtp_trainer.count_step(batch, _mtp_layers(args))


@hookimpl
def auxiliary_loss(args: argparse.Namespace, model: Any, inputs: Any, outputs: Any) -> Any:
    if _state.mtp_trainer is None or getattr(model, "mtp", None) is None or outputs.hidden is None:
        return None
    return _state.mtp_trainer.loss(model, inputs, outputs)


@hookimpl
def post_step(args: argparse.Namespace, step: int, model: Any, metrics: dict) -> None:
    if _state.mtp_trainer is not None:
        metrics["mtp_grad_norm"] = _state.mtp_trainer.last_grad_norm


@hookimpl
def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("specrl", "MTP heads (miles-specrl).")
    g.add_argument(
        "--add-mtp-layers",
        type=int,
        default=0,
        help="Add N freshly initialised DeepSeek-V3-style MTP depths to a checkpoint without.",
    )
    g.add_argument("--mtp-init-seed", type=int, default=0, help="Seed of the MTP initialisation.")


@hookimpl
def convert_checkpoint(args: argparse.Namespace, input_dir: str, output_dir: str) -> bool | None:
    if not getattr(args, "add_mtp_layers", 0):
        return None
    from miles_specrl.mtp import add_mtp_layers

    add_mtp_layers(input_dir, output_dir, args.add_mtp_layers, seed=args.mtp_init_seed)
    return True
