"""Command-line arguments of `miles train`, in slime/miles names and defaults.

The core owns only the families every run needs (checkpoint, data, rollout, algorithm, optimizer,
reward, eval, cluster layout). Each plugin adds its own group through the `add_arguments` hook.
An unknown flag is an error (an `--sglang-*` one too, unless `--rollout-backend sglang` passes it on to
SGLang). `--config file.yaml` supplies flags from a file; the command line wins. Names chosen from
installed implementations (`--advantage-estimator`, `--rm-type`, backends) come from their entry-point
groups. On/off flags take ``--no-FLAG`` too. The checks of the parsed values are in `miles_core.validate`.
"""

from __future__ import annotations

import argparse
import difflib
from typing import Any

from miles_core import drivers
from miles_core.args_agentic import add_agentic as _add_agentic
from miles_core.args_algo import add_algo_arguments
from miles_core.args_megatron import add_megatron as _add_megatron
from miles_core.args_ops import add_ops as _add_ops
from miles_core.args_ppo import add_ppo as _add_ppo
from miles_core.args_service import add_async as _add_async
from miles_core.args_service import add_serving as _add_serving
from miles_core.args_service import collect_sglang_flags
from miles_core.errors import UsageError
from miles_core.flags import ArgumentParser, HelpFormatter, config_defaults
from miles_core.plugins import add_plugin_arguments
from miles_core.validate import check_run_args, validate

__all__ = ["build_parser", "check_run_args", "parse_args", "validate"]

ON_OFF = argparse.BooleanOptionalAction


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoint")
    g.add_argument("--hf-checkpoint", type=str, default=None, help="HF model folder to start from.")
    g.add_argument("--model-name", type=str, default=None, help="Name recorded in logs and checkpoints.")
    g.add_argument(
        "--load",
        type=str,
        default=None,
        help="Folder of checkpoints to resume from (its newest usable one); it must exist and hold one, "
        "unless it is also --save (resume if a checkpoint is there, else start).",
    )
    g.add_argument("--save", type=str, default=None, help="Folder for resumable checkpoints.")
    g.add_argument("--save-interval", type=int, default=None, help="Save every N rollouts (and at the end).")
    g.add_argument(
        "--keep-last-n-checkpoints",
        type=int,
        default=None,
        help="Keep only the newest N checkpoints under --save (default: keep all).",
    )
    g.add_argument(
        "--allow-changed-args",
        action=ON_OFF,
        default=False,
        help="Resume even though flags that alter the run differ from the checkpoint's args.json.",
    )
    g.add_argument(
        "--save-hf", type=str, default=None, help="Write the final policy as an HF checkpoint here."
    )
    g.add_argument("--run-dir", type=str, default="runs/latest", help="Metrics, TensorBoard, plots, summary.")
    g.add_argument(
        "--overwrite",
        action=ON_OFF,
        default=False,
        help="Replace another run's metrics in --run-dir (without it, such a run dir is refused unless "
        "the run resumes).",
    )


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--prompt-data", type=str, default=None, help="JSONL/Parquet file of training prompts.")
    g.add_argument("--input-key", type=str, default="input", help="Row key of the prompt (text or messages).")
    g.add_argument("--label-key", type=str, default=None, help="Row key of the label the reward compares to.")
    g.add_argument("--metadata-key", type=str, default="metadata", help="Row key of per-row metadata.")
    g.add_argument(
        "--apply-chat-template", action=ON_OFF, default=False, help="Render prompts with the chat template."
    )
    g.add_argument("--system-prompt", type=str, default=None, help="System message for the chat template.")
    g.add_argument("--rollout-shuffle", action=ON_OFF, default=False, help="Shuffle the prompts each epoch.")
    g.add_argument("--rollout-max-prompt-len", type=int, default=None, help="Drop longer prompts (tokens).")


def _add_rollout(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rollout")
    g.add_argument("--rollout-backend", type=str, default="torch", help="miles.rollout_backends name.")
    g.add_argument("--rollout-batch-size", type=int, default=None, help="Prompts per rollout.")
    g.add_argument("--n-samples-per-prompt", type=int, default=1, help="Responses sampled per prompt.")
    g.add_argument("--num-rollout", type=int, default=None, help="Number of rollouts (training iterations).")
    g.add_argument("--rollout-max-response-len", type=int, default=1024, help="Response token limit.")
    g.add_argument("--rollout-temperature", type=float, default=1.0, help="Sampling temperature (0: greedy).")
    g.add_argument("--rollout-top-p", type=float, default=1.0, help="Nucleus sampling mass, in (0, 1].")
    g.add_argument("--rollout-top-k", type=int, default=-1, help="Sample from the k likeliest (-1: all).")
    g.add_argument("--rollout-stop", type=str, nargs="+", default=None, help="Stop strings.")
    g.add_argument("--rollout-stop-token-ids", type=int, nargs="+", default=None, help="Stop token ids.")
    g.add_argument("--rollout-seed", type=int, default=42, help="Seed of the rollout sampling and shuffle.")
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
        action=ON_OFF,
        default=True,
        help="Decode through CUDA graphs on CUDA (one per batch-size bucket); --no-rollout-cuda-graph "
        "keeps every step eager.",
    )
    g.add_argument(
        "--rollout-compile",
        action=ON_OFF,
        default=False,
        help="Compile the static decode step with torch.compile (fuses norms, rope, router and sampler; "
        "one compile per batch/key-length bucket on first use). With CUDA graphs on CUDA; on CPU it also "
        "switches decoding to the static-shape step.",
    )
    g.add_argument(
        "--rollout-fused-moe",
        action=ON_OFF,
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
        action=ON_OFF,
        default=False,
        help="Rollout and training log-probs bitwise equal (train/train_rollout_logprob_abs_diff == 0): both "
        "sides run batch-invariant ops in the trainer's dtype. Holds on CPU in fp32 with the built-in engine "
        "in the training process; GPU is not bitwise yet. README: 'True on-policy mode'.",
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
        action=ON_OFF,
        default=False,
        help="Use raw rewards: no group mean subtracted (nor std divided) before the advantages.",
    )
    g.add_argument(
        "--disable-grpo-std-normalization",
        action=ON_OFF,
        default=False,
        help="Subtract the group mean but do not divide by the group std (Dr. GRPO).",
    )
    g.add_argument(
        "--normalize-advantages", action=ON_OFF, default=False, help="Whiten advantages over the batch."
    )
    g.add_argument("--gamma", type=float, default=1.0, help="Discount of reinforce++ returns and PPO's GAE.")
    g.add_argument("--kl-coef", type=float, default=0.0, help="KL reward shaping (reinforce++).")
    g.add_argument("--eps-clip", type=float, default=0.2, help="PPO clip range (lower, and upper if unset).")
    g.add_argument("--eps-clip-high", type=float, default=None, help="Upper PPO clip (default: --eps-clip).")
    g.add_argument("--eps-clip-c", type=float, default=None, help="Dual-clip bound (> 1).")
    g.add_argument("--use-kl-loss", action=ON_OFF, default=False, help="Add a KL-to-reference loss term.")
    g.add_argument("--kl-loss-coef", type=float, default=0.0, help="Weight of the KL loss.")
    g.add_argument(
        "--kl-loss-type",
        choices=["k1", "k2", "k3", "low_var_kl"],
        default="k1",
        help="KL estimator of the KL loss and reward shaping.",
    )
    g.add_argument("--entropy-coef", type=float, default=0.0, help="Weight of the entropy bonus.")
    g.add_argument(
        "--calculate-per-token-loss",
        action=ON_OFF,
        default=False,
        help="Average the loss over tokens of the global batch instead of over samples.",
    )
    g.add_argument(
        "--use-tis", action=ON_OFF, default=False, help="Truncated importance sampling (rollout/train)."
    )
    g.add_argument("--tis-clip", type=float, default=2.0, help="Upper clip of the TIS weight.")
    g.add_argument("--tis-clip-low", type=float, default=0.0, help="Lower clip of the TIS weight.")
    g.add_argument(
        "--use-icepop", action=ON_OFF, default=False, help="IcePop: drop tokens with extreme ratios."
    )
    g.add_argument("--icepop-low", type=float, default=0.5, help="Lower bound of IcePop's ratio window.")
    g.add_argument("--icepop-high", type=float, default=5.0, help="Upper bound of IcePop's ratio window.")


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--train-backend", type=str, default="torch", help="miles.train_backends name.")
    g.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="Samples per optimizer step (default: a rollout's samples / --num-steps-per-rollout).",
    )
    g.add_argument(
        "--num-steps-per-rollout", type=int, default=None, help="Optimizer steps per rollout (default: 1)."
    )
    g.add_argument("--micro-batch-size", type=int, default=1, help="Samples per forward/backward pass.")
    g.add_argument("--lr", type=float, default=1e-6, help="Learning rate.")
    g.add_argument("--min-lr", type=float, default=0.0, help="Floor of the decayed learning rate.")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="Optimizer steps of linear warmup.")
    g.add_argument(
        "--lr-decay-style",
        choices=["constant", "linear", "cosine"],
        default="constant",
        help="Learning-rate schedule after warmup.",
    )
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay.")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam-beta2", type=float, default=0.98, help="AdamW beta2.")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon.")
    g.add_argument("--clip-grad", type=float, default=1.0, help="Gradient-norm clip (0: none).")
    g.add_argument("--seed", type=int, default=1234, help="Seed of initialisation and training.")
    g.add_argument(
        "--bf16", action=ON_OFF, default=False,
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
        action=ON_OFF,
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
        action=ON_OFF,
        default=False,
        help="Shorthand for --recompute-granularity selective (as in Megatron).",
    )
    g.add_argument(
        "--train-compile",
        action=ON_OFF,
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
    g.add_argument(
        "--eval-reward-key", type=str, default=None, help="Entry of a dict reward for eval (--reward-key)."
    )
    g.add_argument("--group-rm", action=ON_OFF, default=False, help="Reward whole groups at once.")
    g.add_argument("--rm-concurrency", type=int, default=64, help="Reward calls in flight at once.")
    g.add_argument("--rm-timeout", type=float, default=None, help="Seconds before a reward call is cut off.")


def _add_eval(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("eval")
    g.add_argument(
        "--eval-interval", type=int, default=None, help="Evaluate every N rollouts (and at the end)."
    )
    g.add_argument("--eval-prompt-data", type=str, nargs="+", default=None, help="NAME PATH [NAME PATH ...]")
    g.add_argument("--n-samples-per-eval-prompt", type=int, default=1, help="Responses per eval prompt.")
    g.add_argument(
        "--eval-max-response-len", type=int, default=None, help="Default: --rollout-max-response-len."
    )
    g.add_argument("--eval-temperature", type=float, default=None, help="Default: --rollout-temperature.")
    g.add_argument("--eval-top-p", type=float, default=None, help="Default: --rollout-top-p.")
    g.add_argument("--eval-top-k", type=int, default=None, help="Default: --rollout-top-k.")


_LAYOUT_HELP = {
    "--actor-num-nodes": "Training nodes.",
    "--actor-num-gpus-per-node": "Training GPUs per node.",
    "--rollout-num-gpus-per-engine": "GPUs per rollout engine.",
    "--tensor-model-parallel-size": "Tensor parallel size.",
    "--pipeline-model-parallel-size": "Pipeline parallel size.",
    "--expert-model-parallel-size": "Expert parallel size.",
    "--context-parallel-size": "Context parallel size.",
}


LAYOUTS = """\
The single-process default runs the trainer and one engine in this process. --use-ray (implied by more
than one trainer rank or engine, or --colocate) runs them as Ray actors; on CPU the flags count processes.
  disaggregated: --actor-num-gpus-per-node 2 --rollout-num-gpus 2
    dev0 [trainer rank 0]  dev1 [trainer rank 1]  dev2 [engine 0]  dev3 [engine 1]
    rank 0 gathers the sharded weights and broadcasts them to the engines in buckets
  colocated: --actor-num-gpus-per-node 2 --colocate
    dev0 [trainer rank 0 | engine 0]  dev1 [trainer rank 1 | engine 1]
    they take turns: the engines release their memory while the trainer trains, the trainer offloads its
    optimizer state while the engines generate, and each rank hands its engine the weights in place
"""


def _add_cluster(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (the single-process default runs 1 of each)", LAYOUTS)
    for flag, text in _LAYOUT_HELP.items():
        g.add_argument(flag, type=int, default=1, help=text)
    g.add_argument("--rollout-num-gpus", type=int, default=None, help="GPUs for rollout engines.")
    g.add_argument(
        "--colocate", action=ON_OFF, default=False, help="Share GPUs between rollout and training."
    )
    g.add_argument(
        "--use-ray",
        action=ON_OFF,
        default=False,
        help="Run the trainer ranks and engines as Ray actors (implied by a layout of several processes).",
    )
    g.add_argument(
        "--ray-address",
        type=str,
        default=None,
        help="Join this running Ray cluster (ray.init address); default: start one on 127.0.0.1 for the run.",
    )
    g.add_argument(
        "--update-weight-buffer-size",
        type=int,
        default=512 << 20,
        help="Bytes of weights gathered and sent per bucket when the trainer ranks update the engines.",
    )


def _add_plugins(p: argparse.ArgumentParser) -> None:
    add_plugin_arguments(p)
    p.add_argument("--config", type=str, default=None, help="YAML file of flags (the command line wins).")


def build_parser(pm: Any = None, prog: str = "miles train") -> argparse.ArgumentParser:
    """The `miles train` parser: the core's groups, then each plugin's (`add_arguments` hook)."""
    p = ArgumentParser(
        prog=prog,
        description="GRPO-style RL post-training of (MoE) language models.",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    for add in (
        _add_checkpoint,
        _add_data,
        _add_rollout,
        _add_async,
        _add_serving,
        _add_algorithm,
        add_algo_arguments,
        _add_ppo,
        _add_training,
        _add_reward,
        _add_eval,
        _add_cluster,
        _add_megatron,
        _add_ops,
        _add_agentic,
        _add_plugins,
    ):
        add(p)
    if pm is not None:
        pm.hook.add_arguments(parser=p)
    return p


def parse_args(
    argv: list[str], pm: Any = None, extra: Any = None, prog: str = "miles train"
) -> argparse.Namespace:
    """Parse `miles train` flags (plus `--config`) and check the core's flag combinations. ``extra(parser)``
    adds a command's own flags (``miles serve``: host and port)."""
    parser = build_parser(pm, prog)
    if extra is not None:
        extra(parser)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**config_defaults(parser, pre.config))
    args, unknown = parser.parse_known_args(argv)
    unknown = collect_sglang_flags(args, unknown)
    if unknown:
        refuse_unknown(unknown[0], parser)
    validate(args)
    return args


def refuse_unknown(flag: str, parser: argparse.ArgumentParser) -> None:
    """Raise the `UsageError` for an unknown flag, suggesting the closest known one."""
    name = flag.split("=")[0]
    if name.startswith("--sglang-"):
        raise UsageError(
            f"{name} is read only by --rollout-backend sglang (the other backends take --rollout-* "
            "flags); drop it or use that backend."
        )
    known = [o for a in parser._actions for o in a.option_strings]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UsageError(f"unknown flag {flag}{hint}; see {parser.prog} --help for the flags.")
