"""User functions checked at the boundary (issue #17, point 1): a table of `miles train` runs on the demo
checkpoint, each with a custom reward or generate function that misbehaves, the exit status it must give
and the sentence it must print, without a traceback.

Most cases run in-process through `miles_core.cli.main` (a second each); the ones marked ``subprocess``
run `python -m miles_core.cli` for real, where "no traceback" and "the process exits" are the real thing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miles_core.cli import main
from miles_core.testing import one_torch_thread  # noqa: F401  (an autouse fixture: tiny models, busy CPU)

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--hf-checkpoint", str(REPO / "examples/arith/checkpoint")]
DATA = ["--prompt-data", str(REPO / "examples/arith/data/train.jsonl"), "--input-key", "prompt"]
TINY = [
    *("--label-key", "label", "--apply-chat-template", "--rollout-batch-size", "2"),
    *("--n-samples-per-prompt", "2", "--num-rollout", "1", "--rollout-max-response-len", "4"),
]
RM_TIMEOUT = 2.0

# Files the cases write into tmp_path: name -> source.
FILES = {
    "ok.py": "def reward(args, sample):\n    return 1.0\n",
    "string.py": "def reward(args, sample):\n    return 'yes'\n",
    "none.py": "async def reward(args, sample):\n    return None\n",
    "nan.py": "async def reward(args, sample):\n    return float('nan')\n",
    "inf.py": "def reward(args, sample):\n    return float('-inf')\n",
    "dict.py": "def reward(args, sample):\n    return {'score': 1.0, 'acc': True}\n",
    "dict_nan.py": "def reward(args, sample):\n    return {'score': float('nan')}\n",
    "raises.py": "async def reward(args, sample):\n    raise ValueError('boom')\n",
    "half_raises.py": (
        "async def reward(args, sample):\n"
        "    if sample.index % 2:\n        raise ValueError('odd one out')\n    return 1.0\n"
    ),
    "sleep_sync.py": "import time\n\ndef reward(args, sample):\n    time.sleep(60)\n    return 1.0\n",
    # time.sleep inside `async def` blocks whatever event loop runs it
    "sleep_async.py": "import time\n\nasync def reward(args, sample):\n    time.sleep(60)\n    return 1.0\n",
    "group_short.py": "async def reward(args, samples):\n    return [1.0] * (len(samples) + 1)\n",
    "group_none.py": "async def reward(args, samples):\n    return None\n",
}
TURN = "    s = await single_turn(args, sample, params)\n"
GEN = "from miles_core.rollout.generate import single_turn\n\n\nasync def generate(args, sample, params):\n"
for name, body in {
    "gen_none.py": "    await single_turn(args, sample, params)\n    return None\n",
    "gen_empty.py": "    return []\n",
    "gen_dict.py": "    return {'tokens': sample.tokens}\n",
    "gen_raises.py": "    raise RuntimeError('engine is down')\n",
    "gen_logprobs.py": f"{TURN}    s.rollout_log_probs += [0.0]\n    return s\n",
    "gen_nan_logprobs.py": (
        f"{TURN}    s.rollout_log_probs = [float('nan')] * s.response_length\n    return s\n"
    ),
    "gen_mask.py": f"{TURN}    s.loss_mask = [1] * (s.response_length + 2)\n    return s\n",
    "gen_tokens.py": (f"{TURN}    s.tokens = [str(t) for t in s.tokens]\n    return s\n"),
    "gen_length.py": (f"{TURN}    s.response_length = len(s.tokens)\n    return s\n"),
    "gen_no_response.py": (
        "    prompt = list(sample.tokens)\n"
        f"{TURN}    s.tokens, s.response_length, s.rollout_log_probs, s.loss_mask = prompt, 0, [], []\n"
        "    return s\n"
    ),
    "gen_failed.py": f"{TURN}    s.status = s.status.FAILED\n    return s\n",
    "gen_half.py": (
        f"{TURN}"
        "    if sample.index % 2:\n"
        "        s.loss_mask, s.rollout_log_probs = None, s.rollout_log_probs[1:]\n"
        "    return s\n"
    ),
}.items():
    FILES[name] = GEN + body

RM = "--custom-rm-path"
GENFN = "--custom-generate-function-path"
EVERY = "every sample of rollout 0 failed (4 of 4), most often (4) because the "
NOT_NUMBER = "not a finite number"
NOT_SAMPLE = "not a Sample or a non-empty list of Samples"
WHOSE = "returned a sample whose"
# (id, flags ({tmp} is the folder of FILES), exit status, sentence fragment, run as a subprocess)
CASES = [
    ("reward-str", [RM, "{tmp}/string.py"], 2, f"returned 'yes' (a str), {NOT_NUMBER} or a dict", True),
    ("reward-none", [RM, "{tmp}/none.py"], 2, f"returned None (a NoneType), {NOT_NUMBER}", False),
    ("reward-nan", [RM, "{tmp}/nan.py"], 2, f"nan.py returned nan (a float), {NOT_NUMBER}", False),
    ("reward-inf", [RM, "{tmp}/inf.py"], 2, f"returned -inf (a float), {NOT_NUMBER}", False),
    ("reward-dict-no-key", [RM, "{tmp}/dict.py"], 2,
     "returned a dict with entries ['acc', 'score']; pass --reward-key", False),
    ("reward-dict-key-missing", [RM, "{tmp}/dict.py", "--reward-key", "pass"], 2,
     "returned a dict without the --reward-key entry 'pass'", False),
    ("reward-dict-nan", [RM, "{tmp}/dict_nan.py", "--reward-key", "score"], 2,
     f"returned 'score': nan, {NOT_NUMBER}", False),
    ("reward-raises", [RM, "{tmp}/raises.py"], 2,
     EVERY + "reward {RM} {tmp}/raises.py raised ValueError: boom", False),
    ("reward-half-raises", [RM, "{tmp}/half_raises.py"], 0,
     "FAILED: reward {RM} {tmp}/half_raises.py raised ValueError: odd one out", False),
    ("reward-sleep-sync", [RM, "{tmp}/sleep_sync.py", "--rm-timeout", "2"], 2,
     EVERY + "reward {RM} {tmp}/sleep_sync.py did not return within --rm-timeout 2 s", True),
    ("reward-sleep-async", [RM, "{tmp}/sleep_async.py", "--rm-timeout", "2"], 2,
     EVERY + "reward {RM} {tmp}/sleep_async.py did not return within --rm-timeout 2 s", True),
    ("group-rm-count", [RM, "{tmp}/group_short.py", "--group-rm"], 2,
     "returned 3 rewards for a group of 2", False),
    ("group-rm-none", [RM, "{tmp}/group_none.py", "--group-rm"], 2,
     "returned None (a NoneType), not a list of one reward per sample", False),
    ("gen-none", [GENFN, "{tmp}/gen_none.py"], 2,
     EVERY + "generate function {GENFN} {tmp}/gen_none.py returned None (a NoneType), " + NOT_SAMPLE, True),
    ("gen-empty", [GENFN, "{tmp}/gen_empty.py"], 2,
     "gen_empty.py returned an empty list, " + NOT_SAMPLE, False),
    ("gen-dict", [GENFN, "{tmp}/gen_dict.py"], 2, "gen_dict.py returned {{'tokens': [", False),
    ("gen-raises", [GENFN, "{tmp}/gen_raises.py"], 2,
     EVERY + "generate function {GENFN} {tmp}/gen_raises.py raised RuntimeError: engine is down", False),
    ("gen-logprobs", [GENFN, "{tmp}/gen_logprobs.py"], 2, f"{WHOSE} rollout_log_probs has", False),
    ("gen-nan-logprobs", [GENFN, "{tmp}/gen_nan_logprobs.py"], 2,
     f"{WHOSE} rollout_log_probs hold a non-finite", False),
    ("gen-mask", [GENFN, "{tmp}/gen_mask.py"], 2,
     f"{WHOSE} loss_mask has", False),
    ("gen-tokens", [GENFN, "{tmp}/gen_tokens.py"], 2, f"{WHOSE} tokens are ['", False),
    ("gen-length", [GENFN, "{tmp}/gen_length.py"], 2, f"{WHOSE} response_length", False),
    ("gen-no-response", [GENFN, "{tmp}/gen_no_response.py"], 2,
     f"{WHOSE} response_length 0 does not fit its", False),
    ("gen-failed", [GENFN, "{tmp}/gen_failed.py"], 2,
     EVERY + "generate function {GENFN} {tmp}/gen_failed.py marked it FAILED; see its own output", False),
    ("gen-half", [GENFN, "{tmp}/gen_half.py"], 0,
     f"gen_half.py {WHOSE} rollout_log_probs has", False),
]  # fmt: skip


def _env() -> dict[str, str]:
    paths = [str(REPO), *(str(p) for p in sorted((REPO / "plugins").iterdir()) if p.is_dir())]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}


def run_case(argv: list[str], in_subprocess: bool, capsys: pytest.CaptureFixture) -> tuple[int, str, float]:
    start = time.perf_counter()
    if in_subprocess:
        cmd = [sys.executable, "-m", "miles_core.cli", *argv]
        out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
        return out.returncode, out.stdout + out.stderr, time.perf_counter() - start
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err, time.perf_counter() - start


@pytest.fixture(scope="module")
def walls() -> dict[str, float]:
    """Wall time of each subprocess case; a blocking reward's run may take no longer than the string
    reward's (which fails at once) plus --rm-timeout and a margin."""
    return {}


@pytest.mark.parametrize(
    ("case", "flags", "status", "fragment", "in_subprocess"), CASES, ids=[c[0] for c in CASES]
)
def test_user_function_case(tmp_path, capsys, case, flags, status, fragment, in_subprocess, walls):
    for name, source in FILES.items():
        (tmp_path / name).write_text(source)
    run_dir = tmp_path / "run"
    flags = [f.format(tmp=tmp_path) for f in flags]
    fragment = fragment.format(tmp=tmp_path, RM=RM, GENFN=GENFN)
    if RM not in flags:
        flags += [RM, str(tmp_path / "ok.py")]
    argv = ["train", *DEMO, *DATA, *TINY, *flags, "--run-dir", str(run_dir)]
    code, output, wall = run_case(argv, in_subprocess, capsys)
    assert "Traceback" not in output, output
    assert code == status, output
    assert fragment in output, output
    errors = [line for line in output.splitlines() if line.startswith("miles: error: ")]
    if status == 2:  # one sentence: one line, ending in a full stop, naming the fix
        assert len(errors) == 1 and errors[0].endswith("."), output
        assert fragment in errors[0]
        assert not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text()
    else:
        assert errors == []
        rows = [
            json.loads(x, parse_constant=_no_constants)
            for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        expect_failed = {"reward-half-raises": ("reward", 2), "gen-half": ("generate", 2)}.get(
            case, ("reward", 0)
        )
        assert rows[0][f"rollout/{expect_failed[0]}_failed"] == expect_failed[1]
        assert rows[0]["rollout/failed_frac"] == expect_failed[1] / 4
    walls[case] = wall
    if case.startswith("reward-sleep"):
        # A broken time limit waits out the 60 s sleep (or the exit joins the stuck thread).
        baseline = walls.get("reward-str", 15.0)
        assert wall < baseline + RM_TIMEOUT + 8.0, walls  # margin: the start-up varies on a busy CPU
        print(f"{case}: {wall:.1f} s; string reward, failing at once: {baseline:.1f} s")


def _no_constants(name: str) -> None:
    raise AssertionError(f"metrics.jsonl holds {name}, which is not JSON")
