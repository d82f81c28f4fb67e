"""Running a Triton kernel check under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU.

The interpreter must be switched on before triton is imported, so each check runs in a fresh Python
with the repository and ``tests/`` importable and must print ``ok`` last. triton comes with the ``dev``
extra (its Linux wheel runs the interpreter on a CPU-only machine).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _version(dist: str) -> tuple[int, ...]:
    return tuple(int(p) for p in importlib.metadata.version(dist).split("+")[0].split(".")[:2])


def interpreter_usable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    # Triton 3.6's interpreter turns 1-element arrays into ints, which numpy >= 2.3 refuses (3.7 is fine).
    # Read from the metadata: importing triton here would fix its mode before a check could set it.
    return _version("triton") >= (3, 7) or _version("numpy") < (2, 3)


needs_interpreter = pytest.mark.skipif(
    not interpreter_usable(), reason="needs triton >= 3.7 (or numpy < 2.3 for an older one's interpreter)"
)


def run_interpreted(code: str, timeout: int = 600) -> None:
    """Run `code` in a fresh interpreter-mode Python; it must exit 0 and print ``ok`` last."""
    path = [str(ROOT), str(ROOT / "tests"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    cmd = [sys.executable, "-c", code]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def device_script(body: str, dev: str, dtype: str) -> str:
    """``body`` as a script with ``dev`` (a device name) and ``dtype`` (a torch dtype) bound, printing ``ok``
    at the end: what `run_interpreted` runs on CPU and a GPU test executes in-process on CUDA."""
    return f"import torch\ndev, dtype = {dev!r}, torch.{dtype}\n" + body + "\nprint('ok')\n"
