"""miles-specrl hook implementations: MTP heads on the models, speculative rollout, online MTP training,
and ``miles convert --add-mtp-layers``.

Only hookimpls live here; heavy modules are imported lazily. An active run registers its own `SpecRun`,
which holds the run's speculator, MTP trainer and separate draft model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from miles_core import RolloutOptions, Sample, TrainBatch, UsageError, hookimpl

ALGORITHMS = ("EAGLE", "NEXTN", "STANDALONE")


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
        action=argparse.BooleanOptionalAction,
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
def configure(args: argparse.Namespace, pm: Any) -> bool:
    active = _check(args)
    if active:
        pm.register(SpecRun(args), name="specrl.run")
    return active


def _check(args: argparse.Namespace) -> bool:
    """Validate the flags (filling in the speculative defaults); whether the plugin is on."""
    if args.mtp_num_layers < 0:
        raise UsageError(f"--mtp-num-layers must be >= 0, got {args.mtp_num_layers}.")
    if args.enable_mtp_training and not args.mtp_num_layers:
        raise UsageError("--enable-mtp-training needs MTP heads; pass --mtp-num-layers N (N >= 1).")
    if args.enable_mtp_training and getattr(args, "use_ray", False):
        raise UsageError(
            "--enable-mtp-training parks and clips the MTP heads' gradients on unsharded parameters, which "
            "the FSDP2 trainer ranks of --use-ray do not have yet; train the heads in a single-process run "
            "or drop --enable-mtp-training (speculative rollout with fixed heads works)."
        )
    if args.mtp_train_chain < 0:
        raise UsageError(f"--mtp-train-chain must be >= 0, got {args.mtp_train_chain}.")
    if args.mtp_train_chain and not args.enable_mtp_training:
        raise UsageError("--mtp-train-chain applies to online MTP training; add --enable-mtp-training.")
    if not args.sglang_speculative_algorithm:
        return bool(args.mtp_num_layers)
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
    if not args.sglang_speculative_draft_model_path and not args.mtp_num_layers:
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
    if args.rollout_backend != "torch":
        raise UsageError(
            f"miles-specrl speculates in the built-in engine only, not in --rollout-backend "
            f"{args.rollout_backend}; use --rollout-backend torch."
        )
    return True


class SpecRun:
    """The hooks of one run with MTP heads or speculative rollout on."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.speculator: Any = None
        self.mtp_trainer: Any = None
        self.draft_model: Any = None

    @hookimpl
    def configure_model(self, model: Any, role: str) -> None:
        args, n = self.args, self.args.mtp_num_layers
        if role == "ref":
            return
        if n:
            from miles_core.api import start_weights
            from miles_specrl.mtp import attach_mtp, load_mtp_weights

            heads = attach_mtp(model, n)
            load_mtp_weights(heads, start_weights(args))
            train = role == "train" and args.enable_mtp_training
            heads.requires_grad_(train)
            if train:
                from miles_specrl.training import MTPTrainer

                self.mtp_trainer = MTPTrainer(
                    args.mtp_loss_scaling_factor, args.clip_grad, args.mtp_train_chain
                )
                self.mtp_trainer.install(heads)
        if (
            role == "rollout"
            and args.sglang_speculative_algorithm
            and args.sglang_speculative_draft_model_path
        ):
            from miles_core.api import load_model

            p = next(model.parameters())
            draft = load_model(args.sglang_speculative_draft_model_path, dtype=p.dtype, device=p.device)
            self.draft_model = draft.requires_grad_(False)

    @hookimpl
    def pre_rollout(self, engine: Any) -> RolloutOptions | None:
        if not self.args.sglang_speculative_algorithm:
            return None
        if getattr(engine, "model", None) is None:
            # A served rollout backend (--rollout-backend http): each `miles serve` runs its own speculator
            # from the same flags; the statistics come back with every sample (rollout_metrics).
            return None
        if self.speculator is None:
            from miles_specrl.drafters import ModelDrafter, MTPDrafter
            from miles_specrl.speculator import Speculator

            drafter = ModelDrafter(self.draft_model) if self.draft_model is not None else MTPDrafter()
            self.speculator = Speculator(drafter, self.args.sglang_speculative_num_steps)
        self.speculator.prepare(engine)
        return RolloutOptions(decode_strategy=self.speculator)

    @hookimpl
    def rollout_metrics(self, samples: list[Sample]) -> dict | None:
        if self.speculator is None:
            return _served_metrics(samples) if self.args.sglang_speculative_algorithm else None
        t = self.speculator.totals  # every sequence's steps (a multi-turn sample's earlier turns too)
        return {
            "spec_accept_length": t.emitted / t.steps if t.steps else 0.0,
            "spec_accept_rate": t.accepted / t.drafted if t.drafted else 0.0,
            "spec_verify_steps": float(t.steps),
        }

    @hookimpl
    def pre_forward(self, batch: TrainBatch, stage: str) -> None:
        if stage == "train" and self.mtp_trainer is not None:
            self.mtp_trainer.count_step(batch, self.args.mtp_num_layers)

    @hookimpl
    def auxiliary_loss(self, model: Any, inputs: Any, outputs: Any) -> Any:
        if self.mtp_trainer is None or getattr(model, "mtp", None) is None or outputs.hidden is None:
            return None
        return self.mtp_trainer.loss(model, inputs, outputs)

    @hookimpl
    def post_step(self, metrics: dict) -> None:
        if self.mtp_trainer is not None:
            metrics["mtp_grad_norm"] = self.mtp_trainer.last_grad_norm


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
    if not args.add_mtp_layers:
        return None
    from miles_specrl.mtp import add_mtp_layers

    add_mtp_layers(input_dir, output_dir, args.add_mtp_layers, seed=args.mtp_init_seed)
    return True


def _served_metrics(samples: list[Sample]) -> dict[str, float]:
    """The rollout's speculation statistics from the per-sample ``spec_info`` the servers returned."""
    steps = drafted = accepted = emitted = 0.0
    for s in samples:
        info = s.spec_info or {}
        n, d = float(info.get("spec_verify_steps", 0.0)), float(info.get("spec_draft_tokens", 0.0))
        steps, drafted = steps + n, drafted + d
        accepted += float(info.get("spec_accept_rate", 0.0)) * d
        emitted += float(info.get("spec_accept_length", 0.0)) * n
    return {
        "spec_accept_length": emitted / steps if steps else 0.0,
        "spec_accept_rate": accepted / drafted if drafted else 0.0,
        "spec_verify_steps": steps,
    }
