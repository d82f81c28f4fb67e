"""Eval datasets: from ``--eval-prompt-data NAME PATH ...`` or an ``--eval-config`` YAML (slime's format),
each with its own keys, samples per prompt, sampling parameters and reward; and pass@k over their groups.

An eval config is ``eval: {defaults: {...}, datasets: [{name, path, ...}, ...]}`` (``eval:`` may be left
out; ``datasets`` may map names to entries). A dataset's value wins over ``defaults``, which win over the
flags (``--eval-input-key``/``--input-key``, ``--n-samples-per-eval-prompt``, ``--eval-temperature``/
``--rollout-temperature``, ...).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from miles_core.data import PromptDataset
from miles_core.errors import UsageError
from miles_core.rollout.reward import resolve_rm

# Per-dataset keys: the flags each falls back on, first set wins.
FALLBACKS: dict[str, tuple[str, ...]] = {
    "input_key": ("eval_input_key", "input_key"),
    "label_key": ("eval_label_key", "label_key"),
    "metadata_key": ("metadata_key",),
    "n_samples_per_eval_prompt": ("n_samples_per_eval_prompt",),
    "temperature": ("eval_temperature", "rollout_temperature"),
    "top_p": ("eval_top_p", "rollout_top_p"),
    "top_k": ("eval_top_k", "rollout_top_k"),
    "max_response_len": ("eval_max_response_len", "rollout_max_response_len"),
    "rm_type": ("rm_type",),
}
KEYS = ("name", "path", *FALLBACKS)
SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_response_len": "max_new_tokens",
}


@dataclass
class EvalSet:
    """One eval dataset with what it is generated and scored with."""

    name: str
    dataset: PromptDataset
    n_samples: int  # responses per prompt
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k, max_new_tokens
    rm_type: str | None = None  # a reward other than the run's (given to each sample's metadata)

    def __len__(self) -> int:
        return len(self.dataset)


def read_eval_config(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(defaults, datasets)`` of an eval config file, each entry checked for unknown keys."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--eval-config {file} does not exist; pass a YAML file of eval datasets.")
    try:
        root = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"--eval-config {file} is not valid YAML ({e}); fix the file.") from None
    cfg = root.get("eval", root) if isinstance(root, dict) else None
    if not isinstance(cfg, dict):
        raise UsageError(
            f"--eval-config {file} must hold a mapping (eval: {{datasets: [...]}}); fix the file."
        )
    defaults, raw = cfg.get("defaults") or {}, cfg.get("datasets")
    if isinstance(raw, dict):
        raw = [{"name": name, **(entry or {})} for name, entry in raw.items()]
    if not isinstance(raw, list) or not raw or not isinstance(defaults, dict):
        raise UsageError(
            f"--eval-config {file} defines no datasets; list them under eval.datasets as {{name, path}}."
        )
    _check_keys(file, "eval.defaults", defaults, set(FALLBACKS))
    for i, entry in enumerate(raw):
        where = f"eval.datasets[{i}]"
        if not isinstance(entry, dict) or "name" not in entry or "path" not in entry:
            raise UsageError(f"--eval-config {file}: {where} needs a name and a path; add them.")
        _check_keys(file, where, entry, set(KEYS))
    return defaults, raw


def _check_keys(file: Path, where: str, entry: dict, allowed: set[str]) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise UsageError(
            f"--eval-config {file}: {where} has unknown keys {unknown}; the keys read are "
            f"{', '.join(sorted(allowed))}."
        )


def eval_entries(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every eval dataset with each per-dataset key resolved (dataset, then defaults, then the flags);
    ``--eval-config`` wins over ``--eval-prompt-data``."""
    if args.eval_config:
        defaults, raw = read_eval_config(args.eval_config)
    else:
        pairs = args.eval_prompt_data or []
        defaults, raw = {}, [{"name": pairs[i], "path": pairs[i + 1]} for i in range(0, len(pairs), 2)]
    entries = []
    for entry in raw:
        resolved = {"name": str(entry["name"]), "path": str(entry["path"])}
        for key, flags in FALLBACKS.items():
            value = entry.get(key, defaults.get(key))
            for dest in flags:
                if value is None:
                    value = vars(args)[dest]
            resolved[key] = value
        entries.append(resolved)
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise UsageError(f"eval dataset names repeat ({names}); give each eval dataset its own name.")
    return entries


def _check_entry(e: dict[str, Any], args: argparse.Namespace) -> None:
    where = f"eval dataset {e['name']}"
    for key in ("n_samples_per_eval_prompt", "max_response_len"):
        if not isinstance(e[key], int) or isinstance(e[key], bool) or e[key] < 1:
            raise UsageError(f"{where}: {key} must be an integer of at least 1, got {e[key]!r}.")
    if not isinstance(e["temperature"], (int, float)) or e["temperature"] < 0:
        raise UsageError(f"{where}: temperature must be 0 (greedy) or more, got {e['temperature']!r}.")
    if not isinstance(e["top_p"], (int, float)) or not 0 < e["top_p"] <= 1:
        raise UsageError(f"{where}: top_p must be in (0, 1], got {e['top_p']!r}.")
    if not isinstance(e["top_k"], int) or isinstance(e["top_k"], bool) or e["top_k"] == 0 or e["top_k"] < -1:
        raise UsageError(f"{where}: top_k must be -1 (all tokens) or at least 1, got {e['top_k']!r}.")
    if e["rm_type"] != args.rm_type and args.custom_rm_path:
        raise UsageError(
            f"{where}: rm_type {e['rm_type']} would be ignored, --custom-rm-path scores every sample; drop "
            "one of them."
        )


def build_eval_sets(args: argparse.Namespace, common: dict[str, Any]) -> dict[str, EvalSet]:
    """The run's eval datasets by name, tokenized (``common``: the run's PromptDataset options, tokenizer
    included)."""
    sets: dict[str, EvalSet] = {}
    for e in eval_entries(args):
        _check_entry(e, args)
        if e["rm_type"] and e["rm_type"] != args.rm_type:
            resolve_rm(e["rm_type"])  # an unknown reward fails now, before any model loads
        options = dict(
            common, input_key=e["input_key"], label_key=e["label_key"], metadata_key=e["metadata_key"]
        )
        flag = "--eval-config" if args.eval_config else "--eval-prompt-data"
        dataset = PromptDataset(e["path"], **options, flag=flag)
        sampling = {SAMPLING[k]: e[k] for k in SAMPLING}
        rm_type = e["rm_type"] if e["rm_type"] != args.rm_type else None
        sets[e["name"]] = EvalSet(e["name"], dataset, e["n_samples_per_eval_prompt"], sampling, rm_type)
    return sets


def pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """Mean over prompts of the unbiased pass@k, 1 - C(n-c, k) / C(n, k), from ``(n, c)`` = (samples,
    correct ones) per prompt (Chen et al., 2021)."""
    per_prompt = [1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k) for n, c in counts]
    return sum(per_prompt) / len(per_prompt)


def pass_at_k_metrics(counts: list[tuple[int, int]], prefix: str) -> dict[str, float]:
    """``{prefix}/pass@k`` for k = 1, 2, 4, ... up to the smallest group (none for one sample a prompt)."""
    smallest = min((n for n, _ in counts), default=1)
    if smallest < 2:
        return {}
    return {f"{prefix}/pass@{2**i}": pass_at_k(counts, 2**i) for i in range(int(math.log2(smallest)) + 1)}
