"""`miles rm-check`: score a JSONL of responses with a reward function before spending a run on it.

Takes the same reward flags as `miles train` (``--rm-type``, ``--custom-rm-path``, ``--reward-key``,
``--group-rm``, the reward plugins' own flags, even ``--config`` of the run), scores every row with the
run's own `RewardRunner`, prints a table and a summary, and with ``--output`` writes the scores as JSONL.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
from pathlib import Path
from typing import Any

from miles_core.types import Sample, Status, UsageError


def build_parser(pm: Any) -> argparse.ArgumentParser:
    """The `miles train` parser (so a reward sees the namespace it sees in a run) plus rm-check's flags."""
    from miles_core.args import build_parser as build_train_parser

    parser = build_train_parser(pm)
    parser.prog = "miles rm-check"
    parser.description = "Score a JSONL of {response, label} rows with a reward function."
    g = parser.add_argument_group("rm-check")
    g.add_argument("--data", default=None, help="JSONL (or Parquet) file of rows to score.")
    g.add_argument("--output", default=None, help="Write the rows with their `score` here (JSONL).")
    g.add_argument("--response-key", default="response", help="Row key of the response to score.")
    g.add_argument("--show", type=int, default=50, help="Rows printed in the table (0: all).")
    parser.set_defaults(label_key="label")
    return parser


def parse_args(argv: list[str], pm: Any) -> argparse.Namespace:
    """Parse rm-check flags (``--config`` files give defaults, as for `miles train`)."""
    from miles_core.flags import config_defaults

    parser = build_parser(pm)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**config_defaults(parser, pre.config))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [o for a in parser._actions for o in a.option_strings]
        close = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"unknown flag {unknown[0]}{hint}; see miles rm-check --help for the flags.")
    if not args.data:
        raise UsageError("--data is required: pass a JSONL file of {response, label} rows to score.")
    if bool(args.rm_type) == bool(args.custom_rm_path):
        raise UsageError(
            "pass one of --rm-type NAME or --custom-rm-path file.py (not both) to choose the reward."
        )
    return args


# -------------------------------------------------------------------------------------------------
# rows -> samples


def _field(where: str, row: dict, key: str, flag: str) -> Any:
    if key not in row:
        raise UsageError(f"{where}: row has no key {key!r} (its keys: {sorted(row)}); pass the right {flag}.")
    return row[key]


def _metadata(where: str, row: dict, key: str) -> dict:
    value = row.get(key)
    if isinstance(value, str):  # some datasets store metadata as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(
            f"{where}: {key!r} must be an object (or a JSON string of one), got {type(value).__name__}; "
            "fix the row or choose another --metadata-key."
        )
    return dict(value)


def load_samples(args: argparse.Namespace) -> tuple[list[dict], list[Sample]]:
    """The rows of ``--data`` and a finished `Sample` per row; a bad row is a UsageError naming file:line."""
    from miles_core.data.source import _iter_rows

    path = Path(args.data)
    if not path.is_file():
        raise UsageError(f"--data {path} does not exist; pass a JSONL file of {{response, label}} rows.")
    rows, samples = [], []
    for where, row in _iter_rows(path):
        response = _field(where, row, args.response_key, "--response-key")
        if not isinstance(response, str):
            raise UsageError(
                f"{where}: {args.response_key!r} is a {type(response).__name__}, not a string; "
                "store the response text (or pass the right --response-key)."
            )
        label = _field(where, row, args.label_key, "--label-key")
        if isinstance(label, (int, float)) and not isinstance(label, bool):
            label = str(label)  # as PromptDataset does for a run
        n = len(samples)
        samples.append(
            Sample(
                group_index=n // max(1, args.n_samples_per_prompt),
                index=n,
                prompt=row.get(args.input_key if args.input_key in row else "prompt", ""),
                response=response,
                label=label,
                metadata=_metadata(where, row, args.metadata_key),
                status=Status.COMPLETED,
            )
        )
        rows.append(row)
    if not rows:
        raise UsageError(f"--data {path} has no rows; write one {{response, label}} JSON object per line.")
    return rows, samples


# -------------------------------------------------------------------------------------------------
# scoring


def score_samples(args: argparse.Namespace, samples: list[Sample]) -> None:
    """Set each sample's ``reward`` with the run's `RewardRunner` (failures mark the sample FAILED)."""
    from miles_core.rollout.reward import RewardRunner

    runner = RewardRunner(args)
    n = max(1, args.n_samples_per_prompt)
    if args.group_rm and len(samples) % n:
        raise UsageError(
            f"--group-rm scores groups of --n-samples-per-prompt {n} consecutive rows, but --data has "
            f"{len(samples)} rows; give a multiple of {n} rows."
        )

    async def _all() -> None:
        if args.group_rm:
            await asyncio.gather(*(runner.score_group(samples[i : i + n]) for i in range(0, len(samples), n)))
        else:
            await asyncio.gather(*(runner.score(s) for s in samples))

    asyncio.run(_all())


def scalar_score(args: argparse.Namespace, sample: Sample) -> float | None:
    """The trained score of a sample (``--reward-key`` of a dict reward); ``None`` if it failed."""
    if sample.status == Status.FAILED:
        return None
    if isinstance(sample.reward, dict):
        key = args.reward_key
        if not key or key not in sample.reward:
            raise UsageError(
                f"the reward returns a dict with entries {sorted(sample.reward)}; pass --reward-key to pick "
                "the one that trains, e.g. --reward-key score."
            )
        return float(sample.reward[key])
    return float(sample.reward if sample.reward is not None else 0.0)


def _excerpt(value: Any, width: int, tail: bool) -> str:
    text = " ".join(str(value).split())
    if len(text) <= width:
        return text
    return "..." + text[-(width - 3) :] if tail else text[: width - 3] + "..."


def format_report(scores: list[float | None], samples: list[Sample], show: int) -> str:
    """The score table (row, score, label, end of the response) and a one-line summary."""
    lines = [f"{'ROW':>5}  {'SCORE':>8}  {'LABEL':<20}  RESPONSE (end)"]
    shown = len(samples) if show <= 0 else min(show, len(samples))
    for i in range(shown):
        s, score = samples[i], scores[i]
        text = "FAILED" if score is None else f"{score:.4g}"
        detail = s.metadata.get("reward_error", "") if score is None else ""
        lines.append(
            f"{i:>5}  {text:>8}  {_excerpt(s.label, 20, False):<20}  {_excerpt(s.response, 60, True)}"
            + (f"  [{detail}]" if detail else "")
        )
    if shown < len(samples):
        lines.append(f"  ... {len(samples) - shown} more rows (raise --show, or read --output)")
    ok = [x for x in scores if x is not None]
    failed = len(scores) - len(ok)
    mean = f"{sum(ok) / len(ok):.4f}" if ok else "n/a"
    lines.append(f"mean score {mean} over {len(ok)} scored rows of {len(scores)} ({failed} failed)")
    return "\n".join(lines)


def write_output(path: str, rows: list[dict], samples: list[Sample], scores: list[float | None]) -> None:
    """One JSON line per input row: the row, its ``score``, a dict reward in full, any reward error."""
    from miles_core.atomic import atomic_write_text

    out = []
    for row, s, score in zip(rows, samples, scores):
        extra: dict[str, Any] = {"score": score}
        if isinstance(s.reward, dict):
            extra["reward"] = s.reward
        if score is None:
            extra["reward_error"] = s.metadata.get("reward_error", "failed")
        out.append(json.dumps({**row, **extra}, ensure_ascii=False, default=str))
    atomic_write_text(path, "".join(line + "\n" for line in out))


def main(argv: list[str]) -> int:
    """``miles rm-check``: exit status 0 when every row was scored, 1 when some reward call failed."""
    from miles_core.plugins import configure_plugins, disabled_from_argv, get_plugin_manager

    pm = get_plugin_manager(disable=disabled_from_argv(argv))
    args = parse_args(argv, pm)
    configure_plugins(pm, args)
    rows, samples = load_samples(args)
    score_samples(args, samples)
    scores = [scalar_score(args, s) for s in samples]
    print(format_report(scores, samples, args.show))
    if args.output:
        write_output(args.output, rows, samples, scores)
        print(f"wrote {len(rows)} scored rows to {args.output}")
    return 1 if any(x is None for x in scores) else 0
