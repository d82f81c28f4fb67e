"""A fresh venv that sees the repo's miles distributions only through what pip installs into it.

Used by the slow tests that install miles like a user would (test_third_party_plugin.py, test_wheels.py).
Third-party dependencies (torch and friends) are borrowed read-only from the running interpreter, so no
network and no minute-long installs are needed; every miles distribution the venv sees is one pip put there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path


def copy_source(src: Path, dst: Path, keep: tuple[str, ...] | None = None) -> Path:
    """Copy a project (or only its entries ``keep``) so build/ and egg-info land outside the repo."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        if keep is not None and entry.name not in keep or ignore(str(src), [entry.name]):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name, ignore=ignore)
        else:
            shutil.copy2(entry, dst / entry.name)
    return dst


def pip_install(*args: str, python: str | None = None, deps: bool = False) -> None:
    """Offline install with the running pip (``--python`` targets another interpreter).

    Without ``deps`` nothing but the named projects is installed; with it pip resolves their requirements
    against what the target interpreter already sees (the borrowed dependencies) and ``--find-links``.
    """
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    cmd += ["--python", python] if python else []
    cmd += ["install", "--no-build-isolation", "--no-index", *([] if deps else ["--no-deps"]), *args]
    run(cmd, cwd=Path.cwd())


def borrowed_dependencies(dest: Path) -> Path:
    """Symlink every third-party package of this interpreter into ``dest``, leaving out all of miles.

    The fresh venv reads them through a .pth line: torch and friends need no network or minute-long
    install, while every miles distribution (and its entry points) the venv sees is one pip put there.
    """
    dest.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        name = entry.name.lower()
        if "miles" in name or name.endswith(".pth") or name.startswith("__editable__"):
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


def fresh_venv(tmp_path: Path) -> Path:
    """A venv in ``tmp_path/venv`` without pip and without any miles, with the borrowed dependencies."""
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    probe = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = run_in(venv, str(venv / "bin" / "python"), "-c", probe, cwd=tmp_path).stdout
    deps = borrowed_dependencies(tmp_path / "deps")
    Path(purelib.strip(), "_borrowed_deps.pth").write_text(f"{deps}\n")
    return venv


def run(cmd: list[str], *, cwd: Path, env: dict | None = None, rc: int = 0, timeout: float = 300):
    """Run ``cmd`` in its own session and assert its exit status is ``rc``; a ``CompletedProcess``.

    On a timeout (or an interrupt) the command's whole process group is killed, so nothing it started
    (a build backend, a worker) outlives the test.
    """
    kw = dict(cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with subprocess.Popen(cmd, **kw, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{cmd} ran past {timeout}s:\n{out}\n{err}") from None
        finally:
            if proc.poll() is None:  # interrupted: don't leave it running
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == rc, f"{cmd} exited {proc.returncode}, not {rc}:\n{out}\n{err}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_in(venv: Path, *cmd: str, cwd: Path, rc: int = 0, timeout: float = 300):
    """``run`` with ``venv`` first on PATH and none of this process's PYTHON*/VIRTUAL_ENV/MILES_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "MILES_"))}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return run(list(cmd), cwd=cwd, env=env, rc=rc, timeout=timeout)


def installed_miles(venv: Path, module: str, cwd: Path) -> tuple[list[str], str, str]:
    """In ``venv``: the sorted names of installed miles distributions, and where ``miles_core`` and
    ``module`` are imported from (to check they come from the venv, not from the repository)."""
    probe = (
        f"import importlib.metadata as m, json, miles_core, {module} as p; "
        "names = (d.metadata['Name'] for d in m.distributions()); "
        "print(json.dumps(sorted(n for n in names if 'miles' in n.lower()))); "
        "print(miles_core.__file__); print(p.__file__)"
    )
    python = str(venv / "bin" / "python")
    names, core_file, module_file = run_in(venv, python, "-c", probe, cwd=cwd).stdout.splitlines()
    return json.loads(names), core_file, module_file
