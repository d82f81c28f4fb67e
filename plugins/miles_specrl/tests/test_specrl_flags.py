"""Flag validation of miles-specrl: each bad combination fails with a sentence naming the fix."""

from __future__ import annotations

import pytest
from specrl_helpers import make_args, plugin_manager

from miles_core import UsageError


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--enable-mtp-training"], "--mtp-num-layers"),
        (["--sglang-speculative-algorithm", "EAGLE"], "--mtp-num-layers N"),
        (["--sglang-speculative-algorithm", "NGRAM", "--mtp-num-layers", "1"], "not supported"),
        (["--sglang-speculative-algorithm", "STANDALONE"], "draft-model-path"),
        (["--sglang-speculative-algorithm", "EAGLE", "--mtp-num-layers", "1",
          "--sglang-speculative-eagle-topk", "4"], "use 1"),
        (["--sglang-speculative-algorithm", "EAGLE", "--mtp-num-layers", "1",
          "--sglang-speculative-num-steps", "2", "--sglang-speculative-num-draft-tokens", "8"], "use 3"),
        (["--sglang-speculative-algorithm", "EAGLE", "--sglang-speculative-draft-model-path", "/nope"],
         "does not exist"),
        (["--mtp-num-layers", "1", "--mtp-train-chain", "3"], "add --enable-mtp-training"),
        (["--mtp-num-layers", "1", "--enable-mtp-training", "--mtp-train-chain", "-1"], ">= 0"),
        (["--mtp-num-layers", "1", "--enable-mtp-training", "--actor-num-gpus-per-node", "2"],
         "--use-ray do not have yet"),
    ],
)  # fmt: skip
def test_bad_combinations(flags, match):
    with pytest.raises(UsageError, match=match):
        make_args(plugin_manager(), *flags)


def test_defaults_follow_sglang():
    args = make_args(plugin_manager(), "--sglang-speculative-algorithm", "eagle", "--mtp-num-layers", "1")
    assert args.sglang_speculative_algorithm == "EAGLE"
    assert (args.sglang_speculative_num_steps, args.sglang_speculative_eagle_topk) == (3, 1)
    assert args.sglang_speculative_num_draft_tokens == 4
    assert args.mtp_loss_scaling_factor == 0.2
    assert not hasattr(args, "sglang_extra") or "speculative_algorithm" not in args.sglang_extra
