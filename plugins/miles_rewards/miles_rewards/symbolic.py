"""Symbolic equality of two normalised answers through sympy, under a hard time limit.

LaTeX-lite (``\\frac``, ``\\sqrt``, ``\\pi``, ``^``, implicit multiplication) is rewritten here into a
whitelisted Python-expression subset; sympy parses and simplifies it in a child process
(``sympy_worker``) that is killed when one comparison runs past its limit: a thread could not stop a
runaway ``simplify``.
"""

from __future__ import annotations

import atexit
import json
import keyword
import os
import re
import select
import subprocess
import sys
import threading
import time
from functools import lru_cache

from miles_rewards.normalize import matching_brace

_COMMANDS = {
    r"\cdot": "*",
    r"\times": "*",
    r"\div": "/",
    r"\pi": " pi ",
    r"\infty": " oo ",
    r"\ln": " log ",
    r"\log": " log ",
    r"\exp": " exp ",
    **{f"\\{f}": f" {f} " for f in ("sin", "cos", "tan", "cot", "sec", "csc", "sinh", "cosh", "tanh")},
    **{f"\\arc{f}": f" a{f} " for f in ("sin", "cos", "tan")},
}
_MAX_SOURCE_LEN = 400
_STARTUP_TIMEOUT_S = 60.0


def _expand_groups(s: str) -> str | None:
    """Rewrite ``\\frac{a}{b}`` and ``\\sqrt[n]{a}`` (nested) into parenthesised Python arithmetic."""
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac{", i):
            a_end = matching_brace(s, i + 5)
            if a_end is None or not s.startswith("{", a_end + 1):
                return None
            b_end = matching_brace(s, a_end + 1)
            num, den = _expand_groups(s[i + 6 : a_end]), _expand_groups(s[a_end + 2 : b_end or 0])
            if b_end is None or num is None or den is None:
                return None
            out.append(f"(({num})/({den}))")
            i = b_end + 1
        elif s.startswith("\\sqrt", i) and s[i + 5 : i + 6] in ("{", "["):
            root, j = "2", i + 5
            if s[j] == "[":
                close = s.find("]", j)
                if close < 0:
                    return None
                root, j = s[j + 1 : close], close + 1
            end = matching_brace(s, j) if s.startswith("{", j) else None
            inner = _expand_groups(s[j + 1 : end]) if end is not None else None
            if inner is None or not re.fullmatch(r"\d+|[a-z]", root):
                return None
            out.append(f"sqrt({inner})" if root == "2" else f"(({inner})**(1/({root})))")
            i = end + 1
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


@lru_cache(maxsize=8192)
def to_sympy_source(latex: str) -> str | None:
    """A safe sympy-parseable source for a normalised LaTeX-lite answer, or None if it is out of scope."""
    if len(latex) > _MAX_SOURCE_LEN:
        return None
    s = _expand_groups(latex)
    if s is None:
        return None
    for command in sorted(_COMMANDS, key=len, reverse=True):  # longest first: \sinh before \sin
        s = re.sub(re.escape(command) + r"(?![A-Za-z])", lambda _m, c=command: _COMMANDS[c], s)
    s = re.sub(r"_\{(\w+)\}", r"_\1", s).replace("{", "(").replace("}", ")").replace("^", "**")
    if not re.fullmatch(r"[A-Za-z0-9_+\-*/().!= ]+", s) or s.count("(") != s.count(")") or s.count("=") > 1:
        return None
    if re.search(r"[A-Za-z_)]\s*\.|\.(?!\d)", s):  # a dot only inside a number: no attribute access
        return None
    for name in re.findall(r"[A-Za-z_]\w*", s):
        if "__" in name or keyword.iskeyword(name):
            return None
    # "x(x+1)" is a product here, not a call of a function named x.
    return re.sub(r"(?<![A-Za-z_])([A-Za-z])\s*\(", r"\1*(", s)


class SympyWorker:
    """A ``python -m miles_rewards.sympy_worker`` child doing comparisons, restarted after a timeout.

    A plain subprocess (not multiprocessing) so the caller's ``__main__`` is never re-imported and no
    lock held by another thread is copied by a fork. Requests and answers are JSON lines on its pipes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ)
        # The child must import this very package (an editable install or a test's sys.path entry).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "miles_rewards.sympy_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        if self._read_line(_STARTUP_TIMEOUT_S) != "ready":
            self.close()
            raise RuntimeError(
                "The sympy worker of miles-rewards did not start; run `python -m miles_rewards.sympy_worker` "
                "to see why."
            )

    def _read_line(self, timeout: float) -> str | None:
        """One answer line from the child, or None if none comes within ``timeout`` seconds."""
        fd, buf = self._proc.stdout.fileno(), b""
        deadline = time.monotonic() + timeout
        poller = select.poll()  # not select.select: a process with 1024+ open files has fds it refuses
        poller.register(fd, select.POLLIN)
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:  # the child died
                return None
            buf += chunk
        return buf.decode().strip()

    def close(self) -> None:
        """Kill the child; the next comparison starts a new one."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=5)
            self._proc.stdin.close()
            self._proc.stdout.close()
        self._proc = None

    def equal(self, a_src: str, b_src: str, timeout: float) -> bool:
        """Whether the two sources are equal; False when sympy needs longer than ``timeout`` seconds."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self.close()
                self._start()
            try:
                self._proc.stdin.write((json.dumps([a_src, b_src]) + "\n").encode())
                answer = self._read_line(timeout)
            except OSError:
                answer = None
            if answer is None:
                self.close()  # timed out or died: the runaway computation goes with the process
            return answer == "1"


_WORKER = SympyWorker()
atexit.register(_WORKER.close)  # do not leave a child computing after the trainer exits


@lru_cache(maxsize=8192)
def symbolic_equal(a: str, b: str, timeout: float = 2.0) -> bool:
    """Whether normalised answers ``a`` and ``b`` are equal as expressions, within ``timeout`` seconds."""
    a_src, b_src = to_sympy_source(a), to_sympy_source(b)
    if a_src is None or b_src is None:
        return False
    return _WORKER.equal(a_src, b_src, timeout)
