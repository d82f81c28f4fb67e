"""The run's output folders, checked before any model loads.

``--run-dir``, ``--save`` and the parent of ``--save-hf`` must be folders this process can write (a
file in the way, or a read-only place, fails in one sentence instead of after the training). A run dir
that holds another run's metrics is refused, unless this run resumes that one or ``--overwrite`` says
to replace them.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from miles_core.errors import UsageError
from miles_core.logging import get_logger

log = get_logger(__name__)

# What a run writes into --run-dir besides final_hf/ (which is replaced atomically at the end).
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "curves.png")


def _file_in_the_way(path: Path) -> Path:
    """The nearest existing ancestor of ``path`` (itself included): the file that shadows a folder."""
    for p in [path, *path.parents]:
        if p.exists():
            return p
    return path


def check_writable_folder(flag: str, path: str | Path) -> None:
    """Create ``path`` if needed and check that a file can be written in it, or raise `UsageError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".miles-write-probe-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise UsageError(
            f"{flag} {path} cannot be a folder because {_file_in_the_way(path)} is a file; pass another path."
        ) from None
    except OSError as err:
        raise UsageError(
            f"{flag} {path} is not writable ({err.strerror or err}); pass a folder you can write to."
        ) from None


def check_output_dirs(args: argparse.Namespace, resuming: bool) -> None:
    """Check every output folder of the run, and claim ``--run-dir`` (see the module docstring)."""
    check_writable_folder("--run-dir", args.run_dir)
    if args.save:
        check_writable_folder("--save", args.save)
    if args.save_hf:
        if Path(args.save_hf).is_file():
            raise UsageError(f"--save-hf {args.save_hf} is a file; pass a folder path for the HF checkpoint.")
        check_writable_folder("--save-hf", Path(args.save_hf).parent)
    run_dir = Path(args.run_dir)
    metrics = run_dir / "metrics.jsonl"
    if resuming or not metrics.is_file() or metrics.stat().st_size == 0:
        return
    if not args.overwrite:
        raise UsageError(
            f"--run-dir {run_dir} already holds another run's metrics; pass --overwrite to replace them, "
            "another --run-dir, or --load with that run's checkpoints to resume it."
        )
    for name in RUN_OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)
    log.info("--overwrite: removed the previous run's metrics from %s", run_dir)
