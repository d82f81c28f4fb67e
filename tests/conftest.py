"""Shared fixtures: a tiny random Qwen3-MoE checkpoint (with the demo's tokenizer) and its data."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import stevedore
import torch

from miles_core.model import ModelConfig, build_model, save_model

REPO = Path(__file__).resolve().parent.parent
DEMO_CKPT = REPO / "examples" / "arith" / "checkpoint"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a `multigpu` test, before its fixtures start anything, where fewer CUDA devices are visible
    than the largest ``gpus=`` of its marks asks for (default 2)."""
    need = max((m.kwargs.get("gpus", 2) for m in item.iter_markers("multigpu")), default=0)
    if need and torch.cuda.device_count() < need:
        have = torch.cuda.device_count()
        pytest.skip(f"needs {need} CUDA devices, and {have} {'is' if have == 1 else 'are'} visible")


def tiny_config(vocab_size: int, eos: int, **over) -> dict:
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "initializer_range": 0.1,
        "eos_token_id": eos,
    }
    cfg.update(over)
    return cfg


def make_checkpoint(out: Path, seed: int = 0, **over) -> Path:
    """A random tiny MoE saved by miles, with the demo tokenizer files beside it."""
    tok = json.loads((DEMO_CKPT / "tokenizer.json").read_text())
    vocab = len(tok["model"]["vocab"]) + len(tok.get("added_tokens", []))
    eos = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|im_end|>")
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_hf(tiny_config(vocab, eos, **over)))
    save_model(model, out, tokenizer_src=str(DEMO_CKPT))
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_ckpt_b(tmp_path_factory) -> Path:
    """Other random weights of `tiny_ckpt`'s shape (weight updates push them)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_b", seed=7)


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [
        {"prompt": f"What is {a}+{b}?", "label": str(a + b)} for a in range(10, 20) for b in range(20, 24)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def reward_file(tmp_path) -> Path:
    path = tmp_path / "reward.py"
    path.write_text("async def reward(args, sample):\n    return float(len(sample.response) % 2)\n")
    return path


class Site:
    """A directory on sys.path into which a test writes modules and installed distributions."""

    def __init__(self, root: Path):
        self.root = root
        self.tops: set[str] = set()

    def module(self, relpath: str, source: str = "") -> None:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        self.tops.add(Path(relpath).parts[0].removesuffix(".py"))

    def dist(self, name: str, version: str, entry_points: dict[str, dict[str, str]]) -> None:
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = []
        for group, eps in entry_points.items():
            lines += [f"[{group}]", *(f"{k} = {v}" for k, v in eps.items()), ""]
        (info / "entry_points.txt").write_text("\n".join(lines))


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    # stevedore caches entry points per namespace for the life of the process (so tests start empty) and
    # on disk per sys.path (so a test run would leave one file per temporary directory behind).
    monkeypatch.setattr(stevedore.ExtensionManager, "ENTRY_POINT_CACHE", {})
    monkeypatch.setattr(stevedore._cache._c, "_disable_caching", True)
    s = Site(root)
    yield s
    for name in list(sys.modules):
        if name.partition(".")[0] in s.tops:
            del sys.modules[name]


@pytest.fixture
def serving_backends(site):
    """The `http` and `sglang` rollout backends' entry points, as miles-core's metadata declares them
    (visible before a reinstall picks up pyproject.toml)."""
    group = {"http": "miles_core.serve.client:HttpEngine", "sglang": "miles_core.serve.client:SGLangEngine"}
    site.dist("miles-serve-backends", "0.0.0", {"miles.rollout_backends": group})
    return site
