"""Running a Triton kernel check under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU.

The interpreter must be switched on before triton is imported, so each check runs in a fresh Python
with the repository and ``tests/`` importable and must print ``ok`` last.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def interpreter_usable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import numpy

    # Triton 3.6's interpreter turns 1-element arrays into ints, which numpy >= 2.3 refuses.
    return tuple(int(p) for p in numpy.__version__.split(".")[:2]) < (2, 3)


needs_interpreter = pytest.mark.skipif(
    not interpreter_usable(), reason="needs triton (and numpy < 2.3 for its interpreter)"
)


def run_interpreted(code: str, timeout: int = 600) -> None:
    """Run `code` in a fresh interpreter-mode Python; it must exit 0 and print ``ok`` last."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    cmd = [sys.executable, "-c", code]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
