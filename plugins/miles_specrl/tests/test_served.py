"""Speculative decoding inside `miles serve`: the server runs the plugin's pre_rollout itself, answers
with the same tokens as plain decoding (greedy) and reports the speculator's statistics per request."""

from __future__ import annotations

from specrl_helpers import checkpoint_with_mtp, tiny_model

from miles_core.testing import served


def test_served_speculative_decoding_matches_plain_and_reports_spec_info(tmp_path):
    mtp = checkpoint_with_mtp(tmp_path, tiny_model(moe=True))
    body = {"input_ids": [5, 6, 7], "sampling_params": {"temperature": 0.0, "max_new_tokens": 16}}
    spec = ("--mtp-num-layers", "1", "--sglang-speculative-algorithm", "EAGLE")
    with served(mtp, tmp_path / "a", *spec, "--sglang-speculative-num-steps", "3") as s:
        code, fast = s.post("/generate", {**body, "return_routed_experts": True})
    with served(mtp, tmp_path / "b", "--mtp-num-layers", "1") as s:
        code2, plain = s.post("/generate", {**body, "return_routed_experts": True})
    assert code == code2 == 200
    assert fast["output_ids"] == plain["output_ids"] and len(fast["output_ids"]) == 16
    assert fast["meta_info"]["routed_experts"] == plain["meta_info"]["routed_experts"]
    info = fast["meta_info"]["spec_info"]
    assert info["spec_verify_steps"] >= 1 and info["spec_accept_length"] >= 1.0
    assert "spec_info" not in plain["meta_info"]


def test_served_metrics_from_samples_equal_the_speculators_totals():
    """A served rollout's statistics, summed from each sample's spec_info, are the ones an in-process
    speculator keeps in its totals (steps, accept length and rate weighted by each sequence's counts)."""
    from miles_specrl.plugin import _served_metrics
    from specrl_helpers import engine, mtp_speculator, with_mtp

    from miles_core.types import Sample

    spec = mtp_speculator(k=3)
    eng = engine(with_mtp(tiny_model(std=0.5)), 6, spec=spec)
    lengths = [3, 9, 17, 30, 5, 12]
    outs = [
        eng.generate_batch([[1 + i, 2, 3]], {"temperature": 1.0, "max_new_tokens": n})[0]
        for i, n in enumerate(lengths)
    ]
    t = spec.totals
    assert t.steps > len(lengths) and 0 < t.accepted < t.drafted  # mixed acceptance: a real average
    got = _served_metrics([Sample(spec_info=o.spec_info) for o in outs])
    assert got["spec_verify_steps"] == t.steps
    assert abs(got["spec_accept_length"] - t.emitted / t.steps) < 1e-9
    assert abs(got["spec_accept_rate"] - t.accepted / t.drafted) < 1e-9
    unweighted = sum(o.spec_info["spec_accept_rate"] for o in outs) / len(outs)
    assert abs(got["spec_accept_rate"] - unweighted) > 1e-6  # a plain mean of rates would differ
