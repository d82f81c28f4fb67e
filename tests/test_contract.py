"""The plugin contract holds on this repository: plugins reach the core only through its public modules,
the core names no plugin, and the built-in backends are exactly what the loop calls."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import pytest

from miles_core import contract, protocols
from miles_core.engine import Engine
from miles_core.plugins import get_plugin_manager
from miles_core.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
PLUGINS = sorted(p for p in (REPO / "plugins").iterdir() if (p / "pyproject.toml").is_file())


def packages() -> list[tuple[str, Path]]:
    return [(p.name, p / p.name) for p in PLUGINS]


def test_every_plugin_package_keeps_the_contract():
    assert len(PLUGINS) >= 5
    problems = [v for name, root in packages() for v in contract.check_plugin_package(root, name)]
    example = REPO / "examples" / "third_party_plugin" / "miles_example_plugin"
    assert problems + contract.check_plugin_package(example, "miles_example_plugin") == []


PLANTED: dict[str, str | None] = {
    "from miles_core.engine.engine import _filter_flags\n": "imports from miles_core.engine.engine",
    "from miles_core.model import swap_modules\n": "imports from miles_core.model",
    "import miles_core.train.trainer\n": "imports miles_core.train.trainer",
    "from miles_other.helpers import _secret\n": "imports private name _secret",
    "import miles_other\nx = miles_other._secret\n": "private name miles_other._secret",
    "import torch\nx = torch._scaled_mm\nfrom miles_core.api import last_boxed\n": None,
    "from miles_core import api\nx = api._thing\n": "private name api._thing",
    "def pre_rollout(engine):\n    engine.cuda_graph = False\n": "sets engine.cuda_graph",
}


@pytest.mark.parametrize("source", sorted(PLANTED))
def test_a_planted_violation_fails_the_check(tmp_path, source):
    pkg = tmp_path / "my_plugin"
    pkg.mkdir()
    (pkg / "plugin.py").write_text("from miles_core.api import swap_modules\nfrom my_plugin import _own\n")
    assert contract.check_plugin_package(pkg, "my_plugin") == []  # public names, and its own privates
    (pkg / "bad.py").write_text(textwrap.dedent(source))
    problems = contract.check_plugin_package(pkg, "my_plugin")
    if PLANTED[source] is None:  # a third-party library's private API is outside the contract
        assert problems == []
    else:
        assert problems and all("bad.py:" in p for p in problems)
        assert any(PLANTED[source] in p for p in problems), problems


def plugin_words() -> set[str]:
    """Every plugin distribution, package and flag (train and convert flags, from their own hooks)."""
    words = set()
    for name, _ in packages():
        words |= {name, name.replace("_", "-")}
    core_flags = {o for a in _parser(core_only=True)._actions for o in a.option_strings}
    plugin_flags = {o for a in _parser(core_only=False)._actions for o in a.option_strings}
    convert, core_convert = argparse.ArgumentParser(), argparse.ArgumentParser()
    get_plugin_manager(env={}).hook.add_convert_arguments(parser=convert)
    get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}).hook.add_convert_arguments(parser=core_convert)
    plugin_flags |= {o for a in convert._actions for o in a.option_strings}
    core_flags |= {o for a in core_convert._actions for o in a.option_strings}  # the core's own hookimpls
    return words | {f for f in plugin_flags - core_flags if f.startswith("--")} - {"--help"}


def _parser(core_only: bool) -> argparse.ArgumentParser:
    from miles_core.args import build_parser

    return build_parser(get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""} if core_only else {}))


def test_the_core_names_no_plugin():
    words = plugin_words()
    assert {
        "miles_r3",
        "miles-fp8",
        "--use-rollout-routing-replay",
        "--int4-qat",
        "--add-mtp-layers",
    } <= words
    assert contract.core_mentions(REPO / "miles_core", words) == []


def test_core_mentions_finds_a_flag_only_whole(tmp_path):
    (tmp_path / "m.py").write_text("x = '--int4-qat'\ny = '--int4-qat-extra'\nz = 'miles_r3.plugin'\n")
    assert contract.core_mentions(tmp_path, ["--int4-qat", "miles_r3"]) == [
        f"{tmp_path / 'm.py'}:1: --int4-qat",
        f"{tmp_path / 'm.py'}:3: miles_r3",
    ]


def protocol_members(proto: type) -> set[str]:
    names = set(getattr(proto, "__annotations__", {}))
    names |= {
        n
        for n, v in vars(proto).items()
        if not n.startswith("_") and (callable(v) or isinstance(v, (property, classmethod)))
    }
    return names


def test_builtin_backends_satisfy_the_protocols(tiny_ckpt):
    from miles_core.args import check_run_args, parse_args
    from miles_core.model import load_model

    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    argv = ["--hf-checkpoint", str(tiny_ckpt), "--prompt-data", "x.jsonl", "--rollout-batch-size", "2"]
    args = parse_args([*argv, "--num-rollout", "1", "--custom-rm-path", "r.py"], pm)
    check_run_args(args)
    engine = Engine.from_args(args, load_model(tiny_ckpt), None)
    trainer = Trainer(args, pm, load_model(tiny_ckpt))
    assert isinstance(engine, protocols.RolloutBackend) and isinstance(trainer, protocols.TrainBackend)
    assert not isinstance(engine, protocols.TrainBackend)
    assert not isinstance(trainer, protocols.RolloutBackend)


def test_protocols_list_exactly_what_the_loop_calls():
    core = REPO / "miles_core"
    # The loop reads the backend's class as `backend` (in_process, from_args), then its instance as engine.
    engine_owners = {"engine", "self.engine", "r.engine", "ctx.engine", "run.engine", "engine_cls", "backend"}
    used = set()
    for f in ("loop.py", "rollout/manager.py", "rollout/generate.py", "rollout/async_loop.py"):
        used |= contract.attribute_uses(core / f, engine_owners)
    assert used == protocol_members(protocols.RolloutBackend)
    trainer_used = contract.attribute_uses(core / "loop.py", {"trainer", "r.trainer", "run.trainer"})
    trainer_used |= contract.attribute_uses(core / "train" / "checkpoint.py", {"trainer"})
    assert trainer_used == protocol_members(protocols.TrainBackend)
