"""Test helpers shared by the plugins' test suites (imported from their ``conftest.py``; needs pytest).

from miles_core.testing import one_torch_thread  # noqa: F401  (an autouse fixture)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: one thread is as fast, and on a busy CPU several threads' OpenMP spin-waits make small
    matmuls up to ~100x slower. Restored after each test so other test directories are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def greedy_tokens(model: Any, cuda_graph: bool, vocab: int) -> tuple[Any, list[list[int]]]:
    """An engine on ``model`` with CUDA graphs on or off, and its greedy tokens for 11 fixed prompts of
    ids below ``vocab`` on 8 slots (so slots are refilled), 16 tokens each, EOS ignored: the captured ==
    uncaptured check of the quantization plugins' GPU tests."""
    from miles_core.engine import Engine

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (3 + i % 7,), generator=g).tolist() for i in range(11)]
    engine = Engine(model, None, max_batch_size=8, seed=7)
    engine._eos = set()
    engine.cuda_graph = cuda_graph
    outs = engine.generate_batch(prompts, {"temperature": 0.0, "max_new_tokens": 16})
    return engine, [o.output_ids for o in outs]


def tail_vs_alone_rel(experts: Any, hidden: int, num_experts: int, tail: int = 500) -> float:
    """Relative difference between the last ``tail`` rows of one bf16 call of ``experts(x, idx, w)`` on
    enough top-1 tokens that the output offsets of its last copies pass 2^31 elements, and the same
    tokens run alone (GPU tests of the expert kernels' address arithmetic: int32 offsets wrap)."""
    torch.manual_seed(0)
    tokens, dev = 2**31 // hidden + 40_000, torch.device("cuda")
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
    idx = torch.randint(0, num_experts, (tokens, 1), device=dev)
    w = torch.ones(tokens, 1, device=dev)
    with torch.no_grad():
        big = experts(x, idx, w)[-tail:].float()
        alone = experts(x[-tail:], idx[-tail:], w[-tail:]).float()
    return ((big - alone).norm() / alone.norm()).item()


def write_sum_tokenizer(out: Path) -> int:
    """Save a byte-level BPE trained on a few sums ("3+4=7") with ChatML-style specials into the new
    folder `out` (tokenizer.json + tokenizer_config.json); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator([f"{a}+{b}={a + b}" for a in range(20) for b in range(20)], trainer)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


# ---------------------------------------------------------------- real `miles serve` processes
# `served` / `served_many` start one or ``n`` servers (their model loads overlap) and stop them however the
# block ends; `start_server` / `stop_server` for a test that kills (`Served.kill`, SIGKILL) or restarts one.


def http_json(method: str, url: str, body: Any = None, timeout: float = 120.0) -> tuple[int, Any]:
    """One blocking request to any url (a server, a router); returns (HTTP status, the decoded JSON answer,
    or None for an empty or non-JSON body). ``body`` is sent as JSON, or as is when it is bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw.strip() else None
    except ValueError:
        return status, None


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    log: Path

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            text = r.read().decode()
        return json.loads(text) if text else {}

    def post(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        status, answer = http_json("POST", self.url + path, body or {})
        return status, answer if isinstance(answer, dict) else {}

    def kill(self) -> None:
        """SIGKILL (a crash), then wait for the process to end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


def serve_env() -> dict[str, str]:
    """This interpreter's environment for a child process: the same sys.path, one thread."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))


def launch_server(ckpt: Path, workdir: Path, *flags: str, port: int = 0) -> tuple[subprocess.Popen, Path]:
    """Start a `miles serve` process (``port`` 0: a free one) without waiting; returns it and its port file
    (its log is the port file's name with ``.log``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"serve-{time.monotonic_ns()}.port"
    cmd = [sys.executable, "-m", "miles_core.cli", "serve", "--hf-checkpoint", str(ckpt), "--port", str(port),
           "--port-file", str(port_file), "--device", "cpu", *flags]  # fmt: skip
    with port_file.with_suffix(".log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=serve_env(), cwd=workdir)
    return proc, port_file


def wait_server(proc: subprocess.Popen, port_file: Path, deadline_s: float = 120.0) -> Served:
    """Returns once the launched server answers /health (or stops it and raises with its log)."""
    log = port_file.with_suffix(".log")
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"miles serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if port_file.is_file():
            served = Served(proc, f"http://127.0.0.1:{port_file.read_text().strip()}", log)
            with contextlib.suppress(OSError):
                served.get("/health")
                return served
        time.sleep(0.05)
    stop_server(Served(proc, "", log))
    raise RuntimeError(f"miles serve did not come up in {deadline_s} s:\n{log.read_text()[-3000:]}")


def start_server(ckpt: Path, workdir: Path, *flags: str, port: int = 0, deadline_s: float = 120.0) -> Served:
    """A `miles serve` process (``port`` 0: a free one); returns once it answers /health (or raises with
    its log)."""
    return wait_server(*launch_server(ckpt, workdir, *flags, port=port), deadline_s)


def stop_server(served: Served) -> None:
    if served.proc.poll() is None:
        served.proc.terminate()
        try:
            served.proc.wait(10)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait(10)


@contextlib.contextmanager
def served(ckpt: Path, workdir: Path, *flags: str) -> Iterator[Served]:
    s = start_server(ckpt, workdir, *flags)
    try:
        yield s
    finally:
        stop_server(s)


@contextlib.contextmanager
def served_many(ckpt: Path, workdir: Path, n: int, *flags: str) -> Iterator[list[Served]]:
    """``n`` servers started at once (their model loads overlap); all stopped at exit."""
    launched = [launch_server(ckpt, workdir, *flags) for _ in range(n)]
    try:
        yield [wait_server(proc, port_file) for proc, port_file in launched]
    finally:
        for proc, port_file in launched:
            stop_server(Served(proc, "", port_file.with_suffix(".log")))
