"""The built-in ``python`` tool: run model-written Python in a sandboxed subprocess, report what happened.

Each call starts a fresh interpreter (``python -I``) in an empty temporary directory, with a bare
environment, in its own session (process group), and the code on stdin. Before the code runs, the child:

- sets hard resource limits (``resource.setrlimit``; a process cannot raise a hard limit again):
  address space ``--tool-memory-mb`` (RLIMIT_AS), CPU seconds ``ceil(--tool-timeout) + 1`` (RLIMIT_CPU),
  written files 16 MiB (RLIMIT_FSIZE), no core dumps;
- leaves the network: ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` moves it into a new, empty network
  namespace (no interface but a down loopback, so every connection fails) where the kernel allows
  unprivileged user namespaces; where it does not, that step is skipped and only the next one holds;
- blocks socket creation in Python (``socket.socket``, ``socket.socketpair``, ``_socket.socket``,
  ``socket.create_connection`` raise ``PermissionError``). This alone is not a wall (ctypes can reach
  libc), which is why the namespace comes first; `network_isolation()` says which of the two is in force.

The parent kills the whole process group (SIGKILL) when the call outlives ``--tool-timeout`` seconds of
wall time or prints more than it will show. Every failure comes back as text for the model, never as an
exception: a traceback, ``[exit status N]``, ``[killed: ...]``, ``[timed out after T s: killed]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import os
import re
import signal
import subprocess
import sys
import tempfile

# Runs in the child before the model's code: limits, network namespace, socket block, then the code.
_PRELUDE = r"""
import ctypes, resource, sys
_code = sys.stdin.read()
sys.stdin.close()
_mem, _cpu = int(sys.argv[1]), int(sys.argv[2])
for _lim, _v in ((resource.RLIMIT_AS, _mem), (resource.RLIMIT_CPU, _cpu),
                 (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(_lim, (_v, _v))
try:
    _ok = ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) == 0
except Exception:
    _ok = False
if sys.argv[3] == "probe":
    print("netns" if _ok else "socket-blocked")
    raise SystemExit(0)
import socket, _socket
def _no_network(*a, **k):
    raise PermissionError("network access is disabled in this sandbox")
socket.socket = _socket.socket = socket.socketpair = socket.create_connection = _no_network
del ctypes, resource, socket, _socket, _lim, _v, _mem, _cpu, _ok
_g = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(_code, "<tool>", "exec"), _g)
"""

_PRELUDE_FRAME = re.compile(r'^  File "<string>", line \d+, in <module>\n(?=  File "<tool>")', re.MULTILINE)

SIGNAL_NOTES = {
    signal.SIGXCPU: "CPU time limit reached",
    signal.SIGKILL: "killed",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGXFSZ: "file size limit reached",
}


def _child_env() -> dict[str, str]:
    return {
        "PATH": os.defpath,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "LANG": "C.UTF-8",
    }


_SLOTS: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def _slots() -> asyncio.Semaphore:
    """At most one sandbox process per CPU core at a time on this event loop (a rollout's calls queue)."""
    loop = asyncio.get_running_loop()
    if loop not in _SLOTS:
        for old in [lp for lp in _SLOTS if lp.is_closed()]:
            del _SLOTS[old]
        _SLOTS[loop] = asyncio.Semaphore(max(2, os.cpu_count() or 1))
    return _SLOTS[loop]


async def run_python(code: str, timeout: float = 5.0, memory_mb: int = 512, max_chars: int = 1000) -> str:
    """Run ``code`` in the sandbox; returns its merged stdout/stderr, followed by a note in brackets when it
    failed, was killed, timed out or printed more than ``max_chars`` characters. The time limit starts when
    the process does (calls beyond one per CPU core wait their turn)."""
    async with _slots():
        return await _run(code, timeout, memory_mb, max_chars)


async def _run(code: str, timeout: float, memory_mb: int, max_chars: int) -> str:
    cpu = math.ceil(timeout) + 1
    with tempfile.TemporaryDirectory(prefix="miles-tool-") as cwd:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-c", _PRELUDE, str(memory_mb << 20), str(cpu), "run",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=cwd, env=_child_env(), start_new_session=True,
        )  # fmt: skip
        proc.stdin.write(code.encode("utf-8", "replace"))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await proc.stdin.drain()
        proc.stdin.close()
        limit = 4 * max_chars + 64  # bytes read before the process is stopped (utf-8: up to 4 a char)
        out = bytearray()

        async def drain() -> bool:  # True: it printed more than is shown
            while len(out) <= limit:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    await proc.wait()  # a closed stdout is not the end: the wait is under the deadline too
                    return False
                out.extend(chunk)
            return True

        timed_out = flooded = False
        try:
            flooded = await asyncio.wait_for(drain(), timeout)
        except asyncio.TimeoutError:
            timed_out = True
        if timed_out or flooded:
            _kill_group(proc.pid)
        status = await proc.wait()
        _kill_group(proc.pid)  # anything the code left running in its group goes too
    return _report(out.decode("utf-8", "replace"), status, timed_out, flooded, timeout, max_chars)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _report(text: str, status: int, timed_out: bool, flooded: bool, timeout: float, max_chars: int) -> str:
    text = _PRELUDE_FRAME.sub("", text)  # tracebacks show the model's code, not the prelude's exec line
    notes = []
    if len(text) > max_chars or flooded:
        text = text[:max_chars]
        notes.append(f"[output cut at {max_chars} characters]")
    if timed_out:
        notes.append(f"[timed out after {timeout:g} s: killed]")
    elif status < 0 and not flooded:
        sig = signal.Signals(-status)
        notes.append(f"[killed by {sig.name}: {SIGNAL_NOTES.get(sig, 'signal')}]")
    elif status > 0:
        notes.append(f"[exit status {status}]")
    text = text.rstrip("\n")
    if not text and not notes:
        return "[no output: print() what you want to see]"
    return "\n".join([text, *notes] if text else notes)


@functools.cache
def network_isolation() -> str:
    """``netns`` when the child can leave the network (a new network namespace), else ``socket-blocked``
    (only Python's socket constructors are blocked)."""
    out = subprocess.run(
        [sys.executable, "-I", "-c", _PRELUDE, str(512 << 20), "5", "probe"],
        input="", capture_output=True, text=True, env=_child_env(), timeout=30,
    )  # fmt: skip
    return out.stdout.strip() or "socket-blocked"


async def python_tool(args: argparse.Namespace, arguments: dict) -> str:
    """Run Python code and return what it printed (stdout and stderr). Arguments: ``code`` (str)."""
    code = arguments.get("code")
    if not isinstance(code, str):
        return 'error: the python tool takes {"code": "<python source>"}; print() the result you need.'
    return await run_python(code, args.tool_timeout, args.tool_memory_mb, args.tool_max_output_chars)


python_tool.spec = {  # what a chat template's ``tools`` variable shows the model (OpenAI function schema)
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code in a sandbox (no network) and return what it printed.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "Python source; print() results."}},
            "required": ["code"],
        },
    },
}
