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
