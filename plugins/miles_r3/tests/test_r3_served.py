"""R3 through `miles serve`: `miles train --rollout-backend http --use-rollout-routing-replay` against a
real engine server gets the routes from its responses and trains exactly as the in-process run does."""

from __future__ import annotations

import json

import miles_r3.plugin as r3_plugin
import pytest
import stevedore
from test_r3_e2e import REWARD, _checkpoint

import miles_core.plugins
from miles_core import cli, drivers
from miles_core.plugins import get_plugin_manager
from miles_core.testing import served


@pytest.fixture
def http_backend(tmp_path, monkeypatch):
    """The ``http`` rollout backend's entry point, as miles-core's installed metadata declares it."""
    if "http" not in drivers.available(drivers.ROLLOUT_BACKENDS):
        site = tmp_path / "site"
        info = site / "miles_http_backend-0.0.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: miles-http-backend\nVersion: 0.0.0\n")
        (info / "entry_points.txt").write_text(
            "[miles.rollout_backends]\nhttp = miles_core.serve.client:HttpEngine\n"
        )
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.setattr(stevedore.ExtensionManager, "ENTRY_POINT_CACHE", {})
        monkeypatch.setattr(stevedore._cache._c, "_disable_caching", True)


def test_routing_replay_over_http_trains_as_in_process(tmp_path, monkeypatch, http_backend):
    ckpt = _checkpoint(tmp_path)
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"input": f"{a}+{a + 1}=", "label": str(2 * a + 1)}) + "\n" for a in range(4))
    )
    (tmp_path / "rm.py").write_text(REWARD)

    def only_core_and_r3(**kw):
        kw["env"] = {"MILES_LOAD_PLUGINS": ""}
        return get_plugin_manager(**kw, extra=[r3_plugin])

    monkeypatch.setattr(miles_core.plugins, "get_plugin_manager", only_core_and_r3)
    argv = [
        "train", "--hf-checkpoint", str(ckpt), "--prompt-data", str(data), "--label-key", "label",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--num-rollout", "2",
        "--rollout-max-response-len", "6", "--custom-rm-path", str(tmp_path / "rm.py"),
        "--device", "cpu", "--rollout-dtype", "bfloat16", "--micro-batch-size", "2", "--lr", "1e-3",
        "--use-rollout-routing-replay",
    ]  # fmt: skip
    runs = {}
    with served(ckpt, tmp_path / "engine", "--rollout-dtype", "bfloat16") as engine:
        for name, extra in (
            ("local", []),
            ("http", ["--rollout-backend", "http", "--rollout-engine-urls", engine.url]),
        ):
            assert cli.main([*argv, "--run-dir", str(tmp_path / name), *extra]) == 0
            rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            runs[name] = [r for r in rows if "train/routing_mismatch_frac" in r]
    assert len(runs["http"]) == 2
    for local, remote in zip(runs["local"], runs["http"]):
        assert remote["rollout/routes_bytes_per_token"] == 2 * 2 * 4  # L * k * int32, from the response
        for key in ("train/routing_mismatch_frac", "train/train_rollout_logprob_abs_diff", "train/pg_loss"):
            assert remote[key] == pytest.approx(local[key], abs=1e-6), key
