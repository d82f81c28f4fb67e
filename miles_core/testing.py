"""Test helpers shared by the plugins' test suites (imported from their ``conftest.py``; needs pytest).

from miles_core.testing import one_torch_thread  # noqa: F401  (an autouse fixture)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


def start_server(ckpt: Path, workdir: Path, *flags: str, deadline_s: float = 120.0) -> Served:
    """A `miles serve` process on a free port; returns once it answers /health (or raises with its log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"port.{time.monotonic_ns()}"
    log = port_file.with_suffix(".log")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "miles_core.cli", "serve", "--hf-checkpoint", str(ckpt), "--port", "0",
           "--port-file", str(port_file), "--device", "cpu", *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=workdir)
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
