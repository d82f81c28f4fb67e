"""Flags of the loss variants beside plain PPO/GRPO, in slime's / miles' names and defaults: the loss
type (policy, SFT, custom), mismatch corrections beyond ``--use-tis`` (MIS, rejection sampling, OPSM,
custom TIS functions), the KL and pg-loss reducer options, and on-policy distillation (OPD).

`add_algo_arguments` registers them; `check_algo_args` refuses combinations that would not do what they
say, each in one sentence naming the flag and the fix.
"""

from __future__ import annotations

import argparse

from miles_core.errors import UsageError

ON_OFF = argparse.BooleanOptionalAction
LOSS_TYPES = ("policy_loss", "sft_loss", "custom_loss")
IS_LEVELS = ("token", "sequence", "geometric")
TIS_MODES = ("truncate", "clip", "mask")
# MIS flags that only mean something with --tis-mode (their defaults are None: "not given").
_MIS_FLAGS = ("tis_lower_bound", "tis_upper_bound")
_RS_FLAGS = ("rs_lower_bound", "rs_upper_bound", "rs_veto_threshold")


def add_algo_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("algorithm: loss types, mismatch corrections, distillation")
    g.add_argument(
        "--loss-type",
        choices=LOSS_TYPES,
        default="policy_loss",
        help="policy_loss (PPO/GRPO family), sft_loss (NLL of the response tokens of prompt/response "
        "rows; no generation, no reward), custom_loss (--custom-loss-function-path).",
    )
    g.add_argument(
        "--custom-loss-function-path",
        type=str,
        default=None,
        help="With --loss-type custom_loss: def loss(args, batch, logits, sum_of_sample_mean) -> "
        "(loss, metrics) (protocols.CustomLossFn).",
    )
    g.add_argument(
        "--use-rollout-logprobs",
        action=ON_OFF,
        default=False,
        help="Use the rollout's log-probs as the old policy's in the PPO ratio (and advantages' KL) "
        "instead of the trainer's recomputed ones.",
    )
    g.add_argument(
        "--use-unbiased-kl",
        action=ON_OFF,
        default=False,
        help="Weight the KL loss per token by pi/pi_old (DeepSeek-V3.2's unbiased estimate).",
    )
    g.add_argument(
        "--custom-tis-function-path",
        type=str,
        default=None,
        help="With --use-tis: the TIS/RS function that replaces the built-in one "
        "(protocols.TISFunction; e.g. miles_core.train.mis:compute_mis_weights).",
    )
    g.add_argument(
        "--custom-pg-loss-reducer-function-path",
        type=str,
        default=None,
        help="Reducer factory for pg_loss only (protocols.PgLossReducerFactory); Dr.GRPO's: "
        "miles_core.train.reducers:get_pg_loss_reducer.",
    )
    # MIS (miles' examples/.../mis.py keys, as flags): level and mode of the IS weights, rejection sampling.
    g.add_argument(
        "--tis-mode",
        choices=TIS_MODES,
        default=None,
        help="With --use-tis: bound the IS weight by truncating it (<= upper), clipping it to [lower, "
        "upper], or masking tokens outside [lower, upper] (MIS). Unset: --tis-clip-low/--tis-clip clamp.",
    )
    g.add_argument(
        "--tis-level", choices=IS_LEVELS, default="token",
        help="IS weight per token, per sequence (product), or geometric (mean log-ratio per sequence).",
    )  # fmt: skip
    g.add_argument("--tis-lower-bound", type=float, default=None, help="Default: 1 / --tis-upper-bound.")
    g.add_argument("--tis-upper-bound", type=float, default=None, help="Upper IS bound (default: 2.0).")
    g.add_argument(
        "--tis-batch-normalize",
        action=ON_OFF,
        default=False,
        help="Rescale the IS weights of each micro-batch to mean 1 (over tokens, or sequences).",
    )
    g.add_argument(
        "--use-rs",
        action=ON_OFF,
        default=False,
        help="Rejection sampling: drop tokens (or sequences, by --rs-level) whose train/rollout ratio is "
        "outside [--rs-lower-bound, --rs-upper-bound].",
    )
    g.add_argument("--rs-level", choices=IS_LEVELS, default="token", help="Level of the RS ratio.")
    g.add_argument("--rs-lower-bound", type=float, default=None, help="Default: the TIS lower bound.")
    g.add_argument("--rs-upper-bound", type=float, default=None, help="Default: the TIS upper bound.")
    g.add_argument(
        "--rs-veto-threshold",
        type=float,
        default=None,
        help="With --use-rs: drop a whole sequence if any token's ratio is below this (e.g. 1e-4).",
    )
    g.add_argument(
        "--use-opsm",
        action=ON_OFF,
        default=False,
        help="Off-policy sequence masking: drop sequences with negative advantage whose mean "
        "log(pi_old / pi) exceeds --opsm-delta.",
    )
    g.add_argument("--opsm-delta", type=float, default=1e-4, help="OPSM threshold.")
    g.add_argument(
        "--use-opd",
        action=ON_OFF,
        default=False,
        help="On-policy distillation: add --opd-kl-coef x (log p_teacher - log p_student) to each token's "
        "advantage.",
    )
    g.add_argument(
        "--opd-type",
        choices=["megatron", "sglang"],
        default=None,
        help="Where teacher log-probs come from: megatron = a checkpoint (--opd-teacher-load) that the "
        "trainer runs (any train backend; slime's name); sglang = an SGLang-compatible /generate server "
        "(--opd-teacher-urls; SGLang or miles serve) that returns input_token_logprobs.",
    )
    g.add_argument("--opd-kl-coef", type=float, default=1.0, help="Weight of the OPD reverse KL.")
    g.add_argument("--opd-teacher-load", type=str, default=None, help="HF folder of the OPD teacher.")
    g.add_argument(
        "--opd-teacher-urls",
        type=str,
        nargs="+",
        default=None,
        metavar="NAME=URL",
        help="With --opd-type sglang: teacher /generate URLs; a sample goes to the one its metadata's "
        "--opd-teacher-key names, else to 'default' (a bare URL is the default).",
    )
    g.add_argument(
        "--opd-teacher-key", type=str, default="opd_teacher", help="Metadata key naming a sample's teacher."
    )


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_algo_args(args: argparse.Namespace) -> None:
    """Refuse flags that would be accepted but do nothing, or do something else than they say."""
    v = vars(args)
    if args.loss_type == "custom_loss" and not args.custom_loss_function_path:
        raise UsageError("--loss-type custom_loss needs --custom-loss-function-path file.py:func.")
    if args.custom_loss_function_path and args.loss_type != "custom_loss":
        raise UsageError("--custom-loss-function-path is used only with --loss-type custom_loss; add it.")
    if args.loss_type != "policy_loss":
        policy_only = ("use_tis", "use_icepop", "use_rs", "use_opsm", "use_opd", "use_kl_loss",
                       "use_rollout_logprobs", "custom_pg_loss_reducer_function_path")  # fmt: skip
        for dest in policy_only:
            if v[dest]:
                raise UsageError(
                    f"{_flag(dest)} acts on the policy loss, which --loss-type {args.loss_type} replaces; "
                    "drop one of them."
                )
        if args.kl_coef or args.entropy_coef:
            raise UsageError(
                f"--kl-coef/--entropy-coef act on the policy loss, which --loss-type {args.loss_type} "
                "replaces; set them to 0."
            )
    if args.loss_type == "sft_loss" and args.n_samples_per_prompt != 1:
        raise UsageError("--loss-type sft_loss trains on one response per row; use --n-samples-per-prompt 1.")
    if args.loss_type == "sft_loss" and args.async_rollout:
        raise UsageError("--loss-type sft_loss generates nothing for --async to overlap; drop --async.")
    _check_tis(args, v)
    if args.advantage_estimator == "cispo" and args.eps_clip_c is not None:
        raise UsageError("--eps-clip-c is PPO's dual clip, which CISPO does not use; drop it.")
    if args.use_unbiased_kl and not args.use_kl_loss:
        raise UsageError("--use-unbiased-kl weights the KL loss; add --use-kl-loss or drop it.")
    if args.opsm_delta < 0:
        raise UsageError(f"--opsm-delta must be 0 or more, got {args.opsm_delta}.")
    _check_opd(args)


def _check_tis(args: argparse.Namespace, v: dict) -> None:
    if args.custom_tis_function_path and not args.use_tis:
        raise UsageError("--custom-tis-function-path runs only with --use-tis; add it.")
    if args.tis_mode is None:
        given = [d for d in (*_MIS_FLAGS, "tis_batch_normalize") if v[d]]
        if given or args.tis_level != "token":
            flag = _flag(given[0]) if given else "--tis-level"
            raise UsageError(f"{flag} shapes MIS weights; add --use-tis --tis-mode truncate|clip|mask.")
    elif not args.use_tis:
        raise UsageError("--tis-mode bounds the weights of --use-tis; add --use-tis.")
    if args.tis_mode is not None and args.custom_tis_function_path:
        raise UsageError("pass --tis-mode (built-in MIS) or --custom-tis-function-path, not both.")
    if not args.use_rs:
        given = [d for d in _RS_FLAGS if v[d] is not None]
        if given or args.rs_level != "token":
            flag = _flag(given[0]) if given else "--rs-level"
            raise UsageError(f"{flag} shapes rejection sampling; add --use-rs.")
    elif args.custom_tis_function_path:
        raise UsageError("--use-rs is part of the built-in MIS, which --custom-tis-function-path replaces.")
    if (args.tis_mode or args.use_rs) and args.use_icepop:
        raise UsageError("--use-icepop and MIS (--tis-mode/--use-rs) both reweight tokens; pass one of them.")
    if args.tis_mode is not None:
        args.tis_upper_bound = 2.0 if args.tis_upper_bound is None else args.tis_upper_bound
        if args.tis_lower_bound is None:
            args.tis_lower_bound = 1.0 / args.tis_upper_bound
        if not 0 <= args.tis_lower_bound < args.tis_upper_bound:
            raise UsageError("--tis-lower-bound must be 0 or more and below --tis-upper-bound.")
    if args.use_rs:
        low = args.tis_lower_bound if args.tis_lower_bound is not None else 0.5
        high = args.tis_upper_bound if args.tis_upper_bound is not None else 2.0
        args.rs_lower_bound = low if args.rs_lower_bound is None else args.rs_lower_bound
        args.rs_upper_bound = high if args.rs_upper_bound is None else args.rs_upper_bound
        if not 0 <= args.rs_lower_bound < args.rs_upper_bound:
            raise UsageError("--rs-lower-bound must be 0 or more and below --rs-upper-bound.")
        if args.rs_veto_threshold is not None and args.rs_veto_threshold <= 0:
            raise UsageError(f"--rs-veto-threshold must be positive, got {args.rs_veto_threshold}.")


def teacher_urls(values: list[str] | dict[str, str] | None) -> dict[str, str]:
    """``--opd-teacher-urls`` as ``{name: url}``: ``NAME=URL`` pairs, a bare URL being ``default``."""
    if isinstance(values, dict):
        return values
    if not values:
        raise UsageError("--opd-type sglang asks a server for teacher log-probs; add --opd-teacher-urls.")
    out: dict[str, str] = {}
    for v in values:
        name, sep, url = v.partition("=")
        name, url = (name, url) if sep and not name.startswith(("http://", "https://")) else ("default", v)
        if not url.startswith(("http://", "https://")) or name in out:
            raise UsageError(
                f"--opd-teacher-urls {v!r} is not NAME=http://host:port/generate or repeats a name; fix it."
            )
        out[name] = url
    return out


def _check_opd(args: argparse.Namespace) -> None:
    if not args.use_opd:
        if args.opd_type or args.opd_teacher_load or args.opd_teacher_urls:
            raise UsageError("--opd-type/--opd-teacher-load/--opd-teacher-urls configure --use-opd; add it.")
        return
    if args.opd_type is None:
        raise UsageError("--use-opd needs --opd-type megatron (a teacher checkpoint) or sglang (a server).")
    if args.opd_type == "megatron" and not args.opd_teacher_load:
        raise UsageError("--opd-type megatron loads the teacher from --opd-teacher-load DIR; pass it.")
    if args.opd_type == "megatron" and args.opd_teacher_urls:
        raise UsageError("--opd-teacher-urls is for --opd-type sglang; drop it or switch the type.")
    if args.opd_type == "sglang":
        if args.opd_teacher_load:
            raise UsageError("--opd-teacher-load is for --opd-type megatron; drop it or switch the type.")
        args.opd_teacher_urls = teacher_urls(args.opd_teacher_urls)
    if args.use_ray:
        raise UsageError("--use-opd runs in the single-process trainer only; drop --use-ray or --use-opd.")
