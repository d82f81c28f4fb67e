"""The flags of miles_core.args_algo: defaults filled in, and each combination that would not do what it
says refused in one sentence."""

from __future__ import annotations

import pytest
from conftest import REPO

from miles_core.args import build_parser, parse_args
from miles_core.plugins import get_plugin_manager
from miles_core.types import UsageError


def parse(*argv: str):
    return parse_args(list(argv), get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}))


def test_defaults_match_slime():
    a = parse()
    assert (a.loss_type, a.opsm_delta, a.opd_kl_coef, a.tis_level, a.rs_level) == (
        "policy_loss",
        1e-4,
        1.0,
        "token",
        "token",
    )
    assert not (a.use_rollout_logprobs or a.use_unbiased_kl or a.use_opsm or a.use_rs or a.use_opd)


def test_mis_bounds_default_from_the_upper_one():
    a = parse("--use-tis", "--tis-mode", "mask", "--tis-upper-bound", "4")
    assert (a.tis_lower_bound, a.tis_upper_bound) == (0.25, 4.0)
    a = parse("--use-tis", "--tis-mode", "clip", "--use-rs")
    assert (a.tis_lower_bound, a.tis_upper_bound, a.rs_lower_bound, a.rs_upper_bound) == (0.5, 2.0, 0.5, 2.0)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--loss-type", "custom_loss"], "--custom-loss-function-path"),
        (["--custom-loss-function-path", "x.py"], "--loss-type custom_loss"),
        (["--loss-type", "sft_loss", "--use-tis"], "--use-tis acts on the policy loss"),
        (["--loss-type", "sft_loss", "--n-samples-per-prompt", "4"], "--n-samples-per-prompt 1"),
        (["--tis-mode", "mask"], "add --use-tis"),
        (["--use-tis", "--tis-upper-bound", "3"], "--tis-upper-bound shapes MIS"),
        (["--use-tis", "--tis-level", "sequence"], "--tis-level shapes MIS"),
        (["--rs-veto-threshold", "1e-4"], "add --use-rs"),
        (["--use-tis", "--tis-mode", "clip", "--tis-lower-bound", "3"], "below --tis-upper-bound"),
        (["--use-tis", "--custom-tis-function-path", "f.py", "--tis-mode", "mask"], "not both"),
        (["--custom-tis-function-path", "f.py"], "only with --use-tis"),
        (["--use-rs", "--use-icepop"], "pass one of them"),
        (["--use-unbiased-kl"], "--use-kl-loss"),
        (["--use-opd"], "--opd-type"),
        (["--use-opd", "--opd-type", "megatron"], "--opd-teacher-load"),
        (["--use-opd", "--opd-type", "sglang"], "add --opd-teacher-urls"),
        (["--use-opd", "--opd-type", "sglang", "--opd-teacher-urls", "localhost:1"], "NAME=http"),
        (["--use-opd", "--opd-type", "sglang", "--opd-teacher-urls", "http://a", "http://b"], "repeats"),
        (
            ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", "t", "--opd-teacher-urls", "x"],
            "sglang",
        ),
        (["--opd-teacher-load", "t"], "add it"),
    ],
)
def test_refusals(argv, match):
    with pytest.raises(UsageError, match=match):
        parse(*argv)


def test_teacher_urls_by_name():
    a = parse(
        "--use-opd", "--opd-type", "sglang", "--opd-teacher-urls", "http://t:1/generate", "m=http://m:2/g"
    )
    assert a.opd_teacher_urls == {"default": "http://t:1/generate", "m": "http://m:2/g"}


def test_every_flag_of_the_group_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    group = next(g for g in build_parser()._action_groups if g.title.startswith("algorithm: loss types"))
    flags = [o for a in group._group_actions for o in a.option_strings if not o.startswith("--no-")]
    assert len(flags) > 20
    missing = [f for f in flags if f"`{f}" not in readme]
    assert not missing, missing
