"""The ``tool_call`` generate function, the tool registry and the Python sandbox.

The generate function runs against a scripted engine (each turn's text is fixed by the test) with the demo
checkpoint's tokenizer, so every tool turn, mask and budget is known exactly; the sandbox runs real child
processes."""

from __future__ import annotations

import asyncio
import importlib.metadata
import socket
import time
from pathlib import Path

import pytest
import tomllib

from miles_core import drivers
from miles_core.args import parse_args
from miles_core.data import Tokenizer
from miles_core.engine.sequence import EngineOutput
from miles_core.plugins import get_plugin_manager
from miles_core.rollout.generate import RolloutContext, rollout_context
from miles_core.rollout.sandbox import network_isolation, run_python
from miles_core.rollout.tool_call import tool_call, tool_turn
from miles_core.rollout.tools import ToolCall, parse_tool_calls, registry_for
from miles_core.types import Sample, Status, UsageError

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "examples" / "arith" / "checkpoint"


def project_entry_points() -> dict[str, dict[str, str]]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    return {g: data[g] for g in (drivers.GENERATE, drivers.TOOLS)}


@pytest.fixture
def agentic(site):
    """The generate function and tool entry points as pyproject.toml declares them (the installed metadata
    of an editable install predates them until it is reinstalled)."""
    eps = project_entry_points()
    assert eps[drivers.TOOLS] == {"python": "miles_core.rollout.sandbox:python_tool"}
    assert eps[drivers.GENERATE]["tool_call"] == "miles_core.rollout.tool_call:tool_call"
    if not importlib.metadata.entry_points(group=drivers.TOOLS, name="python"):
        generate = {"tool_call": eps[drivers.GENERATE]["tool_call"]}
        site.dist("miles-agentic-eps", "0", {drivers.TOOLS: eps[drivers.TOOLS], drivers.GENERATE: generate})
    return site


# ------------------------------------------------------------------------------------------- parsing


def test_parse_tool_calls():
    text = (
        'a<tool_call>{"name": "python", "arguments": {"code": "print(1)"}}</tool_call>b'
        '<tool_call>\n{"name": "calc", "arguments": "{\\"x\\": 2}"}\n</tool_call>'
    )
    assert parse_tool_calls(text) == [ToolCall("python", {"code": "print(1)"}), ToolCall("calc", {"x": 2})]
    assert parse_tool_calls("no call here <tool_call> unterminated") == []
    (bad,) = parse_tool_calls("<tool_call>{name: python}</tool_call>")
    assert bad.error.startswith("error: the tool call is not JSON (Expecting property name")
    (noname,) = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')
    assert noname.error == 'error: a tool call is {"name": "<tool>", "arguments": {...}}'
    (badargs,) = parse_tool_calls('<tool_call>{"name": "python", "arguments": [1]}</tool_call>')
    assert badargs.error == "error: the tool call's arguments are not a JSON object"


def test_tool_turn_is_qwen_chatml():
    assert tool_turn(["3", "x"], closed=True) == (
        "\n<|im_start|>user\n<tool_response>\n3\n</tool_response>\n<tool_response>\nx\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tool_turn(["3"], closed=False).startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n3\n")


# ------------------------------------------------------------------------------------------- sandbox

LIMITS = {"timeout": 1.0, "memory_mb": 256, "max_chars": 300}


def sandbox(code: str, **kw) -> tuple[str, float]:
    t0 = time.perf_counter()
    out = asyncio.run(run_python(code, **{**LIMITS, **kw}))
    return out, time.perf_counter() - t0


def test_sandbox_runs_code_and_reports_errors():
    assert sandbox("print(17 * 23)")[0] == "391"
    out, _ = sandbox("1/0")
    assert out == (
        'Traceback (most recent call last):\n  File "<tool>", line 1, in <module>\n'
        "ZeroDivisionError: division by zero\n[exit status 1]"
    )
    assert sandbox("import sys; sys.exit(3)")[0] == "[exit status 3]"
    assert sandbox("x = 1")[0] == "[no output: print() what you want to see]"


def test_sandbox_calls_run_concurrently_and_each_gets_its_own_answer():
    async def many():
        return await asyncio.gather(*(run_python(f"print({i} * {i})", **LIMITS) for i in range(6)))

    assert asyncio.run(many()) == [str(i * i) for i in range(6)]


def test_sandbox_kills_an_endless_loop_and_its_children():
    out, took = sandbox("while True: pass")
    assert out == "[timed out after 1 s: killed]" and took < 3.0
    # A grandchild in the same session, and a child that closed its output, are stopped too.
    code = "import os, subprocess, time\np = subprocess.Popen(['sleep', '60'])\nprint(p.pid, flush=True)\n"
    code += "os.close(1); os.close(2)\ntime.sleep(60)"
    out, took = sandbox(code)
    pid = int(out.splitlines()[0])
    assert out.endswith("[timed out after 1 s: killed]") and took < 3.0
    time.sleep(0.2)
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"  # gone, or dead and not yet reaped


def test_sandbox_limits_memory():
    out, _ = sandbox("x = bytearray(1 << 30)\nprint('allocated')")  # 1 GiB against a 256 MiB limit
    assert "MemoryError" in out and "allocated" not in out and out.endswith("[exit status 1]")
    assert sandbox("x = bytearray(100 << 20); print(len(x) >> 20)", memory_mb=512, timeout=5)[0] == "100"


def test_sandbox_blocks_the_network():
    # A server on this machine's loopback: reachable from here, so only the sandbox can make it fail.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
    out, _ = sandbox(code)
    assert "PermissionError: network access is disabled in this sandbox" in out and "connected" not in out
    # Past Python's socket module, straight to libc: only the network namespace stops this one.
    raw = (
        "import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"
        f"addr = struct.pack('>HH4s8x', 2, {port}, bytes([127, 0, 0, 1]))\n"
        "rc = libc.connect(fd, addr[1::-1] + addr[2:], 16)\nprint('rc', rc, 'errno', ctypes.get_errno())"
    )
    if network_isolation() != "netns":
        server.close()
        pytest.skip("no unprivileged user namespaces here: only Python's socket constructors are blocked")
    out, _ = sandbox(raw)
    server.close()
    assert out == "rc -1 errno 101"  # ENETUNREACH: the namespace's loopback is down, no route anywhere


def test_sandbox_cuts_a_flood_of_output():
    out, took = sandbox("while True: print('y' * 50)", max_chars=120)
    assert out.endswith("[output cut at 120 characters]") and took < 1.0
    assert len(out.split("\n[output cut")[0]) == 120


# ------------------------------------------------------------------------------ the generate function


class ScriptedEngine:
    """Answers each request with the next scripted text (+ EOS); remembers every input it was given."""

    weight_version = 0

    def __init__(self, tok: Tokenizer, turns: list[str]):
        self.tok, self.turns, self.inputs, self.params = tok, list(turns), [], []

    async def generate(self, input_ids, params, rid=None):
        self.inputs.append(list(input_ids))
        self.params.append(dict(params))
        ids = (self.tok.encode(self.turns.pop(0)) + [self.tok.eos_token_id])[: params["max_new_tokens"]]
        finish = "stop" if ids[-1] == self.tok.eos_token_id else "length"
        return EngineOutput(ids, [-0.5] * len(ids), finish, len(input_ids), 0, rid=rid)

    def abort(self, rid=None):
        return 0


def call(code: str) -> str:
    return '<tool_call>{"name": "python", "arguments": {"code": "' + code + '"}}</tool_call>'


def run_tool_call(
    turns: list[str],
    argv: list[str] = (),
    max_new_tokens: int = 4000,
    index: int = 0,
    params: dict | None = None,
):
    args = parse_args(["--tool-timeout", "1", "--tool-memory-mb", "256", *argv])
    tok = Tokenizer.from_pretrained(CKPT)
    engine = ScriptedEngine(tok, turns)
    prompt = tok.encode("<|im_start|>user\nWhat is 63+15?<|im_end|>\n<|im_start|>assistant\n")
    sample = Sample(group_index=0, index=index, tokens=list(prompt))
    ctx = RolloutContext(engine=engine, tokenizer=tok, pm=get_plugin_manager())
    params = {"temperature": 1.0, "max_new_tokens": max_new_tokens, **(params or {})}

    async def go():
        with rollout_context(ctx):
            return await tool_call(args, sample, params)

    return asyncio.run(go()), engine, tok, prompt


def test_failing_tools_are_reported_and_the_sample_goes_on(agentic):
    turns = [call("while True: pass"), call("x = bytearray(1 << 31)"),
             call("import socket; socket.socket()"), "oops <tool_call>{bad json}</tool_call>",
             '<tool_call>{"name": "shell", "arguments": {}}</tool_call>', call("print(63+15)"),
             "\\boxed{78}"]  # fmt: skip
    s, engine, tok, prompt = run_tool_call(turns, ["--max-turns", "7"])
    assert s.status == Status.COMPLETED and s.metadata == {"tool_calls": 6, "turns": 7}
    seen = [tok.decode(x[len(prompt) :], skip_special_tokens=False) for x in engine.inputs]
    assert "<tool_response>\n[timed out after 1 s: killed]\n</tool_response>" in seen[1]
    assert "MemoryError\n[exit status 1]\n</tool_response>" in seen[2]
    assert "PermissionError: network access is disabled in this sandbox" in seen[3]
    assert "<tool_response>\nerror: the tool call is not JSON" in seen[4]
    assert "<tool_response>\nerror: no tool named 'shell'; the tools are: python\n</tool_response>" in seen[5]
    assert seen[6].endswith("<tool_response>\n78\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert s.response.endswith("\\boxed{78}") and "78" in s.response
    # Every model token trains, no tool token does; each model turn's tokens are exactly what it emitted.
    resp = s.tokens[len(prompt) :]
    assert len(resp) == s.response_length == len(s.loss_mask) == len(s.rollout_log_probs)
    assert len(s.response_weight_versions) == s.response_length
    model_tokens = [t for t, m in zip(resp, s.loss_mask) if m]
    expected = [t for text in turns for t in tok.encode(text) + [tok.eos_token_id]]
    assert model_tokens == expected
    for m, lp, v in zip(s.loss_mask, s.rollout_log_probs, s.response_weight_versions, strict=True):
        assert (lp, v) == ((-0.5, 0) if m else (0.0, -1))
    masked = tok.decode([t for t, m in zip(resp, s.loss_mask) if not m], skip_special_tokens=False)
    assert masked.count("<tool_response>") == 6 and "\\boxed" not in masked


def test_max_turns_ends_the_sample(agentic):
    s, engine, _, _ = run_tool_call([call("print(1)"), call("print(2)"), "\\boxed{3}"], ["--max-turns", "2"])
    assert s.metadata == {"tool_calls": 1, "turns": 2} and len(engine.inputs) == 2 and len(engine.turns) == 1
    s, _, _, _ = run_tool_call(["\\boxed{3}"], ["--max-turns", "1"])
    assert s.metadata == {"tool_calls": 0, "turns": 1} and all(s.loss_mask)


def test_a_tool_turn_that_overflows_the_budget_truncates(agentic):
    tok = Tokenizer.from_pretrained(CKPT)
    first = len(tok.encode(call("print(78)"))) + 1
    turn = len(tok.encode(tool_turn(["78"], closed=True)))
    s, engine, _, _ = run_tool_call([call("print(78)"), "\\boxed{78}"], max_new_tokens=first + turn)
    assert s.status == Status.TRUNCATED and s.response_length == first and len(engine.inputs) == 1
    s, engine, _, _ = run_tool_call([call("print(78)"), "\\boxed{78}"], max_new_tokens=first + turn + 1)
    assert s.response_length == first + turn + 1 and s.status == Status.TRUNCATED  # 1 token left: "length"
    assert s.loss_mask == [1] * first + [0] * turn + [1]


def test_later_turns_are_seeded_by_the_sample_not_by_when_the_tools_returned(agentic):
    """The engine draws a request's sampling key in arrival order, and a later turn arrives when its tools
    are done (timing): each turn after the first carries its own seed, the same whenever it is run."""
    turns = [call("print(63+15)"), call("print(1)"), "\\boxed{78}"]

    def seeds(**kw) -> list:
        _, engine, _, _ = run_tool_call(turns, ["--max-turns", "3", *kw.pop("argv", [])], **kw)
        return [p.get("sampling_seed") for p in engine.params]

    base = seeds()
    assert base[0] is None  # the first turn keeps the engine's key (requests arrive in a fixed order)
    assert all(isinstance(x, int) and 0 <= x < 2**31 for x in base[1:]) and base[1] != base[2]
    assert seeds() == base  # a rerun samples alike
    # Another sample of the group, another --rollout-seed or another caller seed: other keys.
    for other in (seeds(index=1), seeds(argv=["--rollout-seed", "7"]), seeds(params={"sampling_seed": 5})):
        assert other[1] not in base[1:] and other[2] not in base[1:], (other, base)
    caller = seeds(params={"sampling_seed": 5})
    assert caller[0] == 5 and caller == seeds(params={"sampling_seed": 5})
    # The tokens so far count: a different tool call before turn 2 gives turn 2 another key.
    _, engine, _, _ = run_tool_call([call("print(63+16)"), "\\boxed{79}"], ["--max-turns", "2"])
    assert engine.params[1]["sampling_seed"] != base[1]


def test_tool_flags_are_checked(agentic):
    assert registry_for(["python"]).specs[0]["function"]["name"] == "python"
    for argv, needle in [
        (
            ["--tools", "shell", "--custom-generate-function-path", "tool_call"],
            "unknown --tools 'shell'; installed: python",
        ),
        (["--max-turns", "0"], "--max-turns 0 leaves the model no turn"),
        (["--tool-timeout", "0"], "--tool-timeout 0.0 must be positive"),
        (["--tool-memory-mb", "8"], "--tool-memory-mb 8 is below the 64 MiB"),
        (
            ["--rollout-function-path", "f.py", "--over-sampling-batch-size", "4"],
            "filter inside your rollout",
        ),
    ]:
        with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
            parse_args(argv)


def test_multi_turn_answers_each_user_turn_and_trains_only_the_model_tokens():
    """The built-in ``multi_turn`` generate function: the model answers the first user turn, the next
    user turn is fed through the chat template, the model answers again; only its tokens are trained."""
    from miles_core.rollout.generate import multi_turn

    args = parse_args([])
    tok = Tokenizer.from_pretrained(CKPT)
    engine = ScriptedEngine(tok, ["2", "4"])
    sample = Sample(group_index=0, index=0, prompt=[{"role": "user", "content": "What is 1+1?"}])
    sample.metadata["turns"] = ["And 2+2?"]
    ctx = RolloutContext(engine=engine, tokenizer=tok, pm=get_plugin_manager())

    async def go():
        with rollout_context(ctx):
            return await multi_turn(args, sample, {"temperature": 1.0, "max_new_tokens": 64})

    out = asyncio.run(go())
    first, second = tok.encode("2") + [tok.eos_token_id], tok.encode("4") + [tok.eos_token_id]
    prompt = engine.inputs[0]
    inserted = engine.inputs[1][len(prompt) + len(first) :]
    assert engine.inputs[1][: len(prompt) + len(first)] == prompt + first and inserted
    assert "And 2+2?" in tok.decode(inserted)
    assert out.tokens == prompt + first + inserted + second
    assert out.loss_mask == [1] * len(first) + [0] * len(inserted) + [1] * len(second)
    assert out.rollout_log_probs == [-0.5] * len(first) + [0.0] * len(inserted) + [-0.5] * len(second)
    assert out.response_length == len(out.loss_mask) and out.status == Status.COMPLETED
    assert out.response_weight_versions.count(-1) == len(inserted)
