"""Run outputs: metrics.jsonl and TensorBoard scalars, learning-curve plots, progress bars, and the logger.

Every run directory gets `metrics.jsonl` (one JSON object per logged step, the source of truth; strict
JSON, so a NaN or infinite value is left out and counted) and `tb/` (the same scalars for TensorBoard);
`plot_curves` draws a PNG from the JSONL for a quick look.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging as _logging
import math
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from miles_core.atomic import atomic_write_bytes, atomic_write_text

# ---------------------------------------------------------------------------------------------------
# logger


class _StderrHandler(_logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time, so redirected or captured stderr is honoured."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; always follow sys.stderr
        pass


def get_logger(name: str = "miles") -> _logging.Logger:
    """A logger under the "miles" hierarchy printing "[miles] message" to stderr (configured once).

    The level comes from ``MILES_LOG_LEVEL`` (default INFO). Names outside the hierarchy, like a module's
    ``__name__``, are placed under it so one handler serves them all.
    """
    root = _logging.getLogger("miles")
    if not getattr(root, "_miles_configured", False):
        handler = _StderrHandler()
        handler.setFormatter(_logging.Formatter("[miles] %(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("MILES_LOG_LEVEL", "INFO").upper())
        root.propagate = False  # avoid printing twice when the host program configures the root logger
        root._miles_configured = True  # type: ignore[attr-defined]
    if name == "miles" or name.startswith("miles."):
        return _logging.getLogger(name)
    return _logging.getLogger(f"miles.{name}")


# ---------------------------------------------------------------------------------------------------
# progress bars


def progress(total: int, desc: str, disable: bool | None = None) -> Any:
    """A tqdm bar; by default on in a terminal and off otherwise. ``MILES_PROGRESS=1``/``0`` forces it."""
    from tqdm.auto import tqdm

    if disable is None:
        env = os.environ.get("MILES_PROGRESS")
        if env == "0":
            disable = True
        elif env == "1":
            disable = False
        else:
            disable = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=False)


# ---------------------------------------------------------------------------------------------------
# metrics


def _scalar(value: Any) -> float | None:
    """A plain float from a Python number, numpy scalar or one-element tensor; None for anything else."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            return float(item())
    return None


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a half-written last line (killed run) is ignored."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


NONFINITE_KEY = "metrics/nonfinite_dropped"


class MetricsLogger:
    """Append each step's metrics to `run_dir/metrics.jsonl` and to TensorBoard under `run_dir/tb`.

    A value that is NaN or infinite has no JSON spelling: it is left out of the row, the row gets
    ``metrics/nonfinite_dropped`` (how many were left out) and the first drop of each key is logged.

    Each row also goes to every sink in ``sinks`` (`miles_core.wandb_sink.WandbSink`).

    With `resume_from_step`, rows logged at that step or later by the interrupted run are removed first
    (from the JSONL, and via TensorBoard's `purge_step`), so the resumed run does not duplicate them.
    """

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = True,
        resume_from_step: int | None = None,
        sinks: Iterable[Any] = (),
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_from_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] < resume_from_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        self._warned: set[str] = set()
        self.sinks = list(sinks)  # more destinations of each row (`log(row)`, `close()`), e.g. W&B
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_from_step)

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict:
        """Record `metrics` at `step`; keys get `prefix` ("rollout/" etc.). Returns the row written."""
        row: dict[str, Any] = {"step": int(step)}
        dropped = []
        for key, value in metrics.items():
            scalar = _scalar(value)
            if scalar is not None and math.isfinite(scalar):
                row[f"{prefix}{key}"] = scalar
            elif scalar is not None:
                dropped.append((f"{prefix}{key}", scalar))
        if dropped:
            row[NONFINITE_KEY] = float(len(dropped))
            for key, value in dropped:
                if key not in self._warned:
                    self._warned.add(key)
                    get_logger(__name__).warning(
                        "metric %s is %s at step %d; left out of metrics.jsonl (rows count such values "
                        "in %s).",
                        key,
                        value,
                        step,
                        NONFINITE_KEY,
                    )
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()  # so a crash loses at most the step being written
        if self._tb is not None:
            for key, value in row.items():
                if key != "step":
                    self._tb.add_scalar(key, value, global_step=row["step"])
            self._tb.flush()
        for sink in self.sinks:
            sink.log(row)
        return row

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------
# plots


def plot_curves(
    metrics_path: str | Path,
    out_png: str | Path,
    keys: Iterable[str] = ("rollout/reward_mean", "eval/accuracy"),
) -> Path:
    """Draw one subplot per key found in `metrics_path` (x = step) into `out_png`, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's first import
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    series = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        points = [(s, v) for s, v in points if math.isfinite(v)]
        if points:
            series[key] = points
    fig, axes = plt.subplots(max(len(series), 1), 1, figsize=(6, 2.6 * max(len(series), 1)), squeeze=False)
    try:
        if not series:
            axes[0][0].text(0.5, 0.5, "no data", ha="center", va="center", fontsize=14)
            axes[0][0].set_axis_off()
        for ax, (key, points) in zip(axes[:, 0], series.items(), strict=False):  # one spare axis when empty
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return atomic_write_bytes(Path(out_png), buf.getvalue())
