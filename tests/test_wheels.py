"""`pip install miles-core miles-r3`, literally: every distribution builds as a wheel, and a deployment
installs only the plugins it names.

The slow test builds wheels of the core and of every plugin (``python -m build --wheel --no-isolation``,
each from a copy of its source) into one wheelhouse, checks what each wheel holds, installs
``miles-core miles-r3`` by name from it into a fresh venv (third-party dependencies borrowed read-only, see
venv_helpers.py) and runs the installed ``miles`` there: r3 is the only plugin, a short R3 job trains and
logs the routing mismatch, and ``--rm-type math`` is refused in one line (no reward is installed).
"""

from __future__ import annotations

import configparser
import json
import sys
import zipfile
from pathlib import Path

import pytest
from venv_helpers import copy_source, fresh_venv, installed_miles, pip_install, run, run_in

REPO = Path(__file__).resolve().parents[1]
ARITH = REPO / "examples" / "arith"
# The core's copy holds tests/ and bench/ too, so the wheel is seen to leave them out.
CORE_SOURCE = ("pyproject.toml", "README.md", "MANIFEST.in", "miles_core", "tests", "bench")
OTHER_PLUGINS = ("rewards", "fp8", "int4qat", "specrl")

REWARD = "async def reward(args, sample):\n    return float(len(sample.response) % 2)\n"


def projects() -> dict[str, Path]:
    """Each distribution's package name and source folder: the core and every plugin."""
    found = {"miles_core": REPO, **{p.name: p for p in sorted(REPO.glob("plugins/miles_*"))}}
    assert len(found) == 6, found
    return found


def declared_entry_points(project: Path) -> dict[str, dict[str, str]]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    groups = dict(meta.get("entry-points", {}))
    if "scripts" in meta:
        groups["console_scripts"] = meta["scripts"]
    return groups


def check_wheel(wheel: Path, package: str, project: Path) -> None:
    """The wheel holds its own package and its metadata only, with the entry points its pyproject declares."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = f"{package}-0.1.0.dist-info"
        assert {n.split("/")[0] for n in names} == {package, dist_info}, sorted(names)
        entry_points = configparser.ConfigParser(delimiters=("=",))
        entry_points.optionxform = str
        entry_points.read_string(zf.read(f"{dist_info}/entry_points.txt").decode())
    in_wheel = {g: dict(entry_points[g]) for g in entry_points.sections()}
    assert in_wheel == declared_entry_points(project)
    sources = {p.relative_to(project).as_posix() for p in (project / package).rglob("*.py")}
    assert sources <= set(names), sources - set(names)


def train_argv(run_dir: Path) -> list[str]:
    argv = [
        "train",
        "--hf-checkpoint",
        str(ARITH / "checkpoint"),
        "--prompt-data",
        str(ARITH / "data/train.jsonl"),
    ]
    argv += ["--input-key", "prompt", "--label-key", "label", "--apply-chat-template", "--device", "cpu"]
    argv += ["--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--num-rollout", "2"]
    return argv + ["--rollout-max-response-len", "8", "--micro-batch-size", "4", "--run-dir", str(run_dir)]


@pytest.mark.slow
def test_build_all_wheels_and_install_only_core_and_r3(tmp_path):
    wheelhouse = tmp_path / "wheelhouse"
    for package, source in projects().items():
        copy = copy_source(source, tmp_path / "src" / package, keep=CORE_SOURCE if source == REPO else None)
        build = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(wheelhouse), "."]
        run(build, cwd=copy)
        (wheel,) = wheelhouse.glob(f"{package}-0.1.0-py3-none-any.whl")
        check_wheel(wheel, package, source)

    venv = fresh_venv(tmp_path)
    python = str(venv / "bin" / "python")
    pip_install("--find-links", str(wheelhouse), "miles-core", "miles-r3", python=python, deps=True)
    names, core_file, r3_file = installed_miles(venv, "miles_r3", tmp_path)
    assert names == ["miles-core", "miles-r3"]  # of the six wheels on offer, the two asked for
    assert core_file.startswith(str(venv)) and r3_file.startswith(str(venv))
    miles = str(venv / "bin" / "miles")  # the console script pip wrote into the venv

    listing = run_in(venv, miles, "plugins", cwd=tmp_path).stdout
    rows = {line.split()[0]: line.split()[1] for line in listing.splitlines()[1:] if line.strip()}
    assert rows.get("r3") == "miles-r3", listing
    assert not set(OTHER_PLUGINS) & set(rows), listing

    (tmp_path / "reward.py").write_text(REWARD)  # miles-rewards is not installed: a reward of our own
    run_dir = tmp_path / "run"
    argv = [*train_argv(run_dir), "--use-rollout-routing-replay", "--custom-rm-path", "reward.py"]
    run_in(venv, miles, *argv, cwd=tmp_path)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mismatch = [r["train/routing_mismatch_frac"] for r in rows if "train/routing_mismatch_frac" in r]
    assert len(mismatch) == 2 and all(0 <= x <= 1 for x in mismatch), rows

    failed = run_in(venv, miles, *train_argv(tmp_path / "run_math"), "--rm-type", "math", cwd=tmp_path, rc=2)
    error = failed.stderr.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    assert error == "miles: error: unknown --rm-type 'math'; installed: none.", error
