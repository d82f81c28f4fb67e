"""Command-line arguments of `miles train`, in slime/miles names and defaults.

The core owns only the families every run needs (checkpoint, data, rollout, algorithm, optimizer,
reward, eval, cluster layout). Each plugin adds its own group through the `add_arguments` hook.
An unknown flag is an error (an `--sglang-*` one too, until a backend reads it). `--config file.yaml`
supplies flags from a file; the command line wins. Names chosen from installed implementations
(`--advantage-estimator`, `--rm-type`, backends) come from their entry-point groups.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any

import yaml

from miles_core import drivers
from miles_core.plugins import add_plugin_arguments
from miles_core.train.losses import check_loss_args
from miles_core.types import UsageError


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoint")
    g.add_argument("--hf-checkpoint", type=str, default=None, help="HF model folder to start from.")
    g.add_argument("--model-name", type=str, default=None, help="Name recorded in logs and checkpoints.")
    g.add_argument("--load", type=str, default=None, help="Checkpoint folder to resume from (if it has one).")
    g.add_argument("--save", type=str, default=None, help="Folder for resumable checkpoints.")
    g.add_argument("--save-interval", type=int, default=None, help="Save every N rollouts (and at the end).")
    g.add_argument(
        "--save-hf", type=str, default=None, help="Write the final policy as an HF checkpoint here."
    )
    g.add_argument("--run-dir", type=str, default="runs/latest", help="Metrics, TensorBoard, plots, summary.")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--prompt-data", type=str, default=None, help="JSONL/Parquet file of training prompts.")
    g.add_argument("--input-key", type=str, default="input")
    g.add_argument("--label-key", type=str, default=None)
    g.add_argument("--metadata-key", type=str, default="metadata")
    g.add_argument("--apply-chat-template", action="store_true", default=False)
    g.add_argument("--system-prompt", type=str, default=None)
    g.add_argument("--rollout-shuffle", action="store_true", default=False)
    g.add_argument("--rollout-max-prompt-len", type=int, default=None, help="Drop longer prompts.")


def _add_rollout(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rollout")
    g.add_argument("--rollout-backend", type=str, default="torch", help="miles.rollout_backends name.")
    g.add_argument("--rollout-batch-size", type=int, default=None, help="Prompts per rollout.")
    g.add_argument("--n-samples-per-prompt", type=int, default=1)
    g.add_argument("--num-rollout", type=int, default=None, help="Number of rollouts (training iterations).")
    g.add_argument("--rollout-max-response-len", type=int, default=1024)
    g.add_argument("--rollout-temperature", type=float, default=1.0)
    g.add_argument("--rollout-top-p", type=float, default=1.0)
    g.add_argument("--rollout-top-k", type=int, default=-1)
    g.add_argument("--rollout-stop", type=str, nargs="+", default=None, help="Stop strings.")
    g.add_argument("--rollout-stop-token-ids", type=int, nargs="+", default=None)
    g.add_argument("--rollout-seed", type=int, default=42)
    g.add_argument(
        "--rollout-dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="Engine weight dtype (default: bfloat16 on GPU, float32 on CPU).",
    )
    g.add_argument(
        "--rollout-max-batch-size",
        type=int,
        default=None,
        help="Sequences decoded at once (default: all samples of a rollout).",
    )
    g.add_argument(
        "--rollout-cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Decode through CUDA graphs on CUDA (one per batch-size bucket); --no-rollout-cuda-graph "
        "keeps every step eager.",
    )
    g.add_argument(
        "--rollout-compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Compile the static decode step with torch.compile (fuses norms, rope, router and sampler; "
        "one compile per batch/key-length bucket on first use). With CUDA graphs on CUDA; on CPU it also "
        "switches decoding to the static-shape step.",
    )
    g.add_argument(
        "--rollout-fused-moe",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Decode-sized MoE batches (up to ~16 token copies an expert) run on Triton expert kernels "
        "(miles_core.model.fused_moe) instead of grouped GEMMs. Default: on where triton and CUDA are; "
        "--rollout-fused-moe insists (an error without them), --no-rollout-fused-moe turns it off.",
    )
    g.add_argument(
        "--custom-generate-function-path",
        type=str,
        default=None,
        help="file.py[:func], pkg.mod:func, pkg.mod.func, or a miles.generate name.",
    )
    g.add_argument(
        "--true-on-policy-mode",
        action="store_true",
        default=False,
        help="Train in the rollout dtype (fp32 on CPU, bf16 with --bf16) so rollout and training log-probs "
        "come from the same weights and dtype; they agree closely, not bitwise (see "
        "train/train_rollout_logprob_abs_diff).",
    )


def _add_algorithm(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("algorithm")
    g.add_argument(
        "--advantage-estimator",
        default="grpo",
        choices=drivers.available(drivers.ADVANTAGES),
        help="A miles.advantages name (a plugin may add one).",
    )
    g.add_argument(
        "--disable-rewards-normalization",
        action="store_true",
        default=False,
        help="Use raw rewards: no group mean subtracted (nor std divided) before the advantages.",
    )
    g.add_argument("--disable-grpo-std-normalization", action="store_true", default=False)
    g.add_argument("--normalize-advantages", action="store_true", default=False)
    g.add_argument("--gamma", type=float, default=1.0)
    g.add_argument("--kl-coef", type=float, default=0.0, help="KL reward shaping (reinforce++).")
    g.add_argument("--eps-clip", type=float, default=0.2)
    g.add_argument("--eps-clip-high", type=float, default=None)
    g.add_argument("--eps-clip-c", type=float, default=None, help="Dual-clip bound (> 1).")
    g.add_argument("--use-kl-loss", action="store_true", default=False)
    g.add_argument("--kl-loss-coef", type=float, default=0.0)
    g.add_argument("--kl-loss-type", choices=["k1", "k2", "k3", "low_var_kl"], default="k1")
    g.add_argument("--entropy-coef", type=float, default=0.0)
    g.add_argument("--calculate-per-token-loss", action="store_true", default=False)
    g.add_argument("--use-tis", action="store_true", default=False)
    g.add_argument("--tis-clip", type=float, default=2.0)
    g.add_argument("--tis-clip-low", type=float, default=0.0)
    g.add_argument("--use-icepop", action="store_true", default=False)
    g.add_argument("--icepop-low", type=float, default=0.5)
    g.add_argument("--icepop-high", type=float, default=5.0)


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--train-backend", type=str, default="torch", help="miles.train_backends name.")
    g.add_argument("--global-batch-size", type=int, default=None, help="Samples per optimizer step.")
    g.add_argument("--num-steps-per-rollout", type=int, default=None)
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="constant")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.98)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument(
        "--bf16", action="store_true", default=False,
        help="bf16 weights and compute; fp32 master weights, gradients and moments in the optimizer.",
    )  # fmt: skip
    g.add_argument(
        "--max-tokens-per-gpu",
        type=int,
        default=None,
        help="Token budget of one packed micro-batch (with --use-dynamic-batch-size).",
    )
    g.add_argument(
        "--use-dynamic-batch-size",
        action="store_true",
        default=False,
        help="Pack samples unpadded into micro-batches of at most --max-tokens-per-gpu tokens "
        "(replaces --micro-batch-size).",
    )
    g.add_argument(
        "--recompute-granularity",
        choices=["full", "selective"],
        default=None,
        help="Activation checkpointing: 'full' recomputes each decoder layer in backward, 'selective' "
        "only each layer's MLP/MoE block.",
    )
    g.add_argument(
        "--recompute-activations",
        action="store_true",
        default=False,
        help="Shorthand for --recompute-granularity selective (as in Megatron).",
    )
    g.add_argument(
        "--train-compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Compile each decoder layer of the policy with torch.compile (dynamic shapes; the Triton and "
        "flash packed attention run inside it, only the SDPA fallback stays eager): fuses norms, rope, "
        "casts and the MoE routing, forward and backward.",
    )
    g.add_argument(
        "--packed-attention",
        choices=["auto", "triton", "flash", "sdpa"],
        default="auto",
        help="Kernel of the packed training attention on CUDA (--use-dynamic-batch-size): auto takes the "
        "Triton kernels, else torch's flash varlen, else SDPA per run of equal lengths.",
    )
    g.add_argument("--device", type=str, default=None, help="cpu or cuda (default: cuda if available).")


def _add_reward(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reward")
    g.add_argument(
        "--rm-type",
        type=str,
        default=None,
        help=f"A miles.rewards name (installed: {', '.join(drivers.available(drivers.REWARDS)) or 'none'}); "
        "boxed_NAME grades the last \\boxed{}.",
    )
    g.add_argument(
        "--custom-rm-path", type=str, default=None, help="file.py[:func], pkg.mod:func or pkg.mod.func."
    )
    g.add_argument("--reward-key", type=str, default=None, help="Entry of a dict reward that trains.")
    g.add_argument("--eval-reward-key", type=str, default=None)
    g.add_argument("--group-rm", action="store_true", default=False, help="Reward whole groups at once.")
    g.add_argument("--rm-concurrency", type=int, default=64, help="Reward calls in flight at once.")
    g.add_argument("--rm-timeout", type=float, default=None, help="Seconds before a reward call is cut off.")


def _add_eval(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("eval")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-prompt-data", type=str, nargs="+", default=None, help="NAME PATH [NAME PATH ...]")
    g.add_argument("--n-samples-per-eval-prompt", type=int, default=1)
    g.add_argument("--eval-max-response-len", type=int, default=None)
    g.add_argument("--eval-temperature", type=float, default=None)
    g.add_argument("--eval-top-p", type=float, default=None)
    g.add_argument("--eval-top-k", type=int, default=None)


def _add_cluster(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (the single-process default runs 1 of each)")
    for flag in (
        "--actor-num-nodes",
        "--actor-num-gpus-per-node",
        "--rollout-num-gpus-per-engine",
        "--tensor-model-parallel-size",
        "--pipeline-model-parallel-size",
        "--expert-model-parallel-size",
        "--context-parallel-size",
    ):
        g.add_argument(flag, type=int, default=1)
    g.add_argument("--rollout-num-gpus", type=int, default=None)
    g.add_argument("--colocate", action="store_true", default=False)
    g.add_argument("--use-ray", action="store_true", default=False)


def _add_plugins(p: argparse.ArgumentParser) -> None:
    add_plugin_arguments(p)
    p.add_argument("--config", type=str, default=None, help="YAML file of flags (the command line wins).")


def build_parser(pm: Any = None) -> argparse.ArgumentParser:
    """The `miles train` parser: the core's groups, then each plugin's (`add_arguments` hook)."""
    p = argparse.ArgumentParser(
        prog="miles train",
        description="GRPO-style RL post-training of (MoE) language models.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for add in (
        _add_checkpoint,
        _add_data,
        _add_rollout,
        _add_algorithm,
        _add_training,
        _add_reward,
        _add_eval,
        _add_cluster,
        _add_plugins,
    ):
        add(p)
    if pm is not None:
        pm.hook.add_arguments(parser=p)
    return p


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: no such file; pass the path of a YAML file of flags.")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not valid YAML ({e}); fix the file.") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must be a mapping of flag names to values.")
    dests = {a.dest for a in parser._actions}
    out = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in dests:
            close = difflib.get_close_matches(dest, sorted(dests), n=1)
            hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
            raise UsageError(f"--config {path}: unknown flag '{key}'{hint}; see miles train --help.")
        out[dest] = value
    return out


def parse_args(argv: list[str], pm: Any = None) -> argparse.Namespace:
    """Parse `miles train` flags (plus `--config`) and check the core's flag combinations."""
    parser = build_parser(pm)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_config_defaults(parser, pre.config))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _refuse_unknown(unknown[0], parser)
    validate(args)
    return args


def _refuse_unknown(flag: str, parser: argparse.ArgumentParser) -> None:
    name = flag.split("=")[0]
    if name.startswith("--sglang-"):
        raise UsageError(
            f"{name} is not read by any installed rollout backend (the built-in engine takes its own "
            "--rollout-* flags); drop it."
        )
    known = [o for a in parser._actions for o in a.option_strings]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UsageError(f"unknown flag {flag}{hint}; see miles train --help for the flags.")


def validate(args: argparse.Namespace) -> None:
    """Refuse what the core cannot run, each with one sentence naming the flag and the fix."""
    if (
        args.use_ray
        or args.colocate
        or args.actor_num_nodes > 1
        or args.actor_num_gpus_per_node > 1
        or (args.rollout_num_gpus not in (None, 0, 1))
    ):
        raise UsageError(
            "this layout needs several GPUs or Ray actors, which the single-process default cannot run; "
            "drop --use-ray/--colocate and set --actor-num-nodes 1 --actor-num-gpus-per-node 1."
        )
    for flag in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "expert_model_parallel_size",
        "context_parallel_size",
        "rollout_num_gpus_per_engine",
    ):
        if vars(args)[flag] != 1:
            raise UsageError(
                f"--{flag.replace('_', '-')} {vars(args)[flag]} needs model parallelism, which the "
                "built-in "
                "torch backends do not implement; use 1 (or --train-backend megatron once installed)."
            )
    if args.eval_prompt_data is not None and len(args.eval_prompt_data) % 2:
        raise UsageError(
            "--eval-prompt-data takes NAME PATH pairs, e.g. --eval-prompt-data gsm8k test.jsonl."
        )
    check_loss_args(args)
    if args.eps_clip_high is None:
        args.eps_clip_high = args.eps_clip
    if args.rm_type and args.custom_rm_path:
        raise UsageError("pass either --rm-type or --custom-rm-path, not both.")


def check_run_args(args: argparse.Namespace) -> None:
    """Checks that only a training run needs (not `--help` or `miles plugins`)."""
    for flag in ("hf_checkpoint", "prompt_data", "rollout_batch_size", "num_rollout"):
        if vars(args)[flag] in (None, ""):
            raise UsageError(
                f"--{flag.replace('_', '-')} is required for miles train; see miles train --help."
            )
    if not args.rm_type and not args.custom_rm_path:
        raise UsageError("no reward: pass --rm-type NAME (e.g. math) or --custom-rm-path file.py.")
    n = args.rollout_batch_size * args.n_samples_per_prompt
    if args.global_batch_size is None:
        steps = args.num_steps_per_rollout or 1
        if n % steps:
            raise UsageError(f"--num-steps-per-rollout {steps} must divide the {n} samples of a rollout.")
        args.global_batch_size = n // steps
    if n % args.global_batch_size:
        raise UsageError(
            f"--global-batch-size {args.global_batch_size} must divide rollout-batch-size x "
            f"n-samples-per-prompt = {n}."
        )
    steps = n // args.global_batch_size
    if args.num_steps_per_rollout not in (None, steps):
        raise UsageError(
            f"--num-steps-per-rollout {args.num_steps_per_rollout} disagrees with --global-batch-size "
            f"{args.global_batch_size} ({steps} steps per rollout); pass only one of them."
        )
    args.num_steps_per_rollout = steps
    if args.global_batch_size % args.micro_batch_size:
        raise UsageError(
            f"--micro-batch-size {args.micro_batch_size} must divide "
            f"--global-batch-size {args.global_batch_size}."
        )
