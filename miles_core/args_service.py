"""The `miles train` flag families of rollout as a service: async/partial rollout and served engines
(`--rollout-backend http|sglang`), and the collection of SGLang server flags. Part of `miles_core.args`."""

from __future__ import annotations

import argparse

ON_OFF = argparse.BooleanOptionalAction


def add_async(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("async and partial rollout")
    g.add_argument(
        "--async",
        dest="async_rollout",
        action=ON_OFF,
        default=False,
        help="Generate the next rollouts on a background thread while the trainer trains on this one "
        "(one-step off-policy with --max-weight-staleness 1, slime's train_async.py).",
    )
    g.add_argument(
        "--max-weight-staleness",
        type=int,
        default=1,
        help="With --async: how many weight versions the policy that trains on a sample may be ahead of "
        "the oldest policy that sampled one of its tokens; rollout k starts once the engine serves "
        "version k-N (0: as sync).",
    )
    g.add_argument(
        "--update-weights-pause-mode",
        choices=["in_place", "abort"],
        default=None,
        help="With --async, what a weight update does to requests in flight: in_place pauses them and "
        "they go on under the new weights; abort ends them and they are sent again (default: abort with "
        "--partial-rollout, else in_place).",
    )
    g.add_argument(
        "--partial-rollout",
        action=ON_OFF,
        default=False,
        help="With --async: a request aborted by a weight update continues under the new weights from "
        "its partial response (prompt + partial response as input, the rest of the token budget) "
        "instead of starting over.",
    )
    g.add_argument(
        "--rollout-timeout",
        type=float,
        default=None,
        help="Seconds a sample's generation may take; after it the request is aborted and the sample "
        "marked ABORTED (kept in its group, unrewarded, zero loss mask). Default: no limit.",
    )


def add_serving(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rollout engines over HTTP (--rollout-backend http or sglang)")
    g.add_argument(
        "--rollout-num-engines", type=int, default=1, help="Local engine servers to start for the run."
    )
    g.add_argument(
        "--rollout-engine-urls",
        type=str,
        nargs="+",
        default=None,
        help="Use these running engines (http://HOST:PORT ...) instead of starting any.",
    )
    g.add_argument("--sglang-router-ip", type=str, default=None, help="Send requests to this running router.")
    g.add_argument("--sglang-router-port", type=int, default=None, help="Port of --sglang-router-ip.")
    g.add_argument(
        "--update-weights-mode",
        choices=["tensor", "disk", "distributed"],
        default=None,
        help="How new weights reach the engines: distributed (a Gloo broadcast from this process), tensor "
        "(safetensors over HTTP), disk (an HF folder under --run-dir). Default: distributed for http, "
        "disk for sglang.",
    )
    g.add_argument(
        "--rollout-health-check-interval",
        type=float,
        default=2.0,
        help="Seconds between checks that every engine is alive (a dead one is restarted and re-synced).",
    )
    # --sglang-* flags no parser knows, kept raw for SGLang's own (with --rollout-backend sglang).
    p.set_defaults(sglang_server_args=[])


def collect_sglang_flags(args: argparse.Namespace, unknown: list[str]) -> list[str]:
    """With ``--rollout-backend sglang``, move the unknown ``--sglang-*`` flags (and the values after
    each) from ``unknown`` into ``args.sglang_server_args``; returns what is left unknown."""
    if args.rollout_backend != "sglang":
        return unknown
    rest: list[str] = []
    passed: list[str] = []
    taking = False
    for token in unknown:
        if token.startswith("--"):
            taking = token.startswith("--sglang-")
        (passed if taking else rest).append(token)
    args.sglang_server_args = passed
    return rest
