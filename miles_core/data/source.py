"""Prompt data: read JSONL / Parquet rows, turn them into tokenized prompts, and serve them in batches.

`PromptDataset` follows slime's row format (``--input-key``, ``--label-key``, ``--metadata-key``);
`RolloutDataSource` walks it epoch by epoch with a seeded shuffle and can save and restore its position,
so a resumed run sees exactly the prompts it would have seen without the interruption.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miles_core.types import UsageError

# ---------------------------------------------------------------------------------------------------
# reading rows


def _iter_rows(path: str | Path, flag: str = "--prompt-data") -> Iterator[tuple[str, dict]]:
    """Yield `(where, row)` per row of a JSONL or Parquet file; `where` is "file:line" or "file row N".
    ``flag`` is the flag that named the file, for the error messages."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"prompt data file {path} does not exist; pass an existing .jsonl or .parquet to {flag}."
        )
    if path.suffix == ".parquet":
        yield from _iter_parquet(path)
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(
                    f"{path}:{lineno}: malformed JSON row ({e}); fix or remove that line."
                ) from e
            if not isinstance(row, dict):
                raise UsageError(
                    f"{path}:{lineno}: row is a JSON {type(row).__name__}, not an object; "
                    'write one {"input": ...} object per line.'
                )
            yield f"{path}:{lineno}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UsageError(
            f"reading {path} needs pyarrow, which is not installed; pip install 'miles-core[parquet]'."
        ) from e
    for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path} row {i}", row


def read_rows(path: str | Path, flag: str = "--prompt-data") -> list[dict]:
    """All rows of a JSONL (one object per line, blank lines skipped) or Parquet file."""
    rows = [row for _, row in _iter_rows(path, flag)]
    if not rows:
        raise UsageError(f"prompt data file {path} has no rows; give {flag} a file with at least one row.")
    return rows


# ---------------------------------------------------------------------------------------------------
# prompts


@dataclass
class Prompt:
    """One prompt ready for rollout: the raw prompt, the text the engine sees, and its token ids."""

    prompt: str | list[dict]  # the row's input: text, or chat messages
    prompt_text: str  # after the chat template (if any)
    prompt_ids: list[int]  # token ids of prompt_text
    label: Any = None  # ground truth from --label-key (numbers become strings)
    metadata: dict[str, Any] = field(default_factory=dict)  # from --metadata-key


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


class PromptDataset:
    """Every usable prompt of one data file, tokenized, in file order (``flag``: the flag that named it)."""

    def __init__(
        self,
        path: str | Path,
        tokenizer: Any,
        input_key: str = "input",
        label_key: str | None = None,
        metadata_key: str = "metadata",
        apply_chat_template: bool = False,
        system_prompt: str | None = None,
        max_prompt_len: int | None = None,
        flag: str = "--prompt-data",
        chat_template_kwargs: dict[str, Any] | None = None,
    ):
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.input_key, self.label_key, self.metadata_key = input_key, label_key, metadata_key
        self.apply_chat_template = apply_chat_template
        self.system_prompt = system_prompt
        self.max_prompt_len = max_prompt_len
        self.chat_template_kwargs = dict(chat_template_kwargs or {})  # --apply-chat-template-kwargs
        self.num_filtered = 0  # prompts dropped for being longer than max_prompt_len
        self.prompts: list[Prompt] = []
        num_rows = 0
        for where, row in _iter_rows(self.path, flag):
            num_rows += 1
            prompt = self._build(where, row)
            if max_prompt_len is not None and len(prompt.prompt_ids) > max_prompt_len:
                self.num_filtered += 1
                continue
            self.prompts.append(prompt)
        if num_rows == 0:
            raise UsageError(f"prompt data file {self.path} has no rows; give {flag} a file with rows.")
        if not self.prompts:
            raise UsageError(
                f"all {num_rows} prompts of {self.path} are longer than {max_prompt_len} tokens; "
                "raise --rollout-max-prompt-len or use shorter prompts."
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    def _required(self, where: str, row: dict, key: str, flag: str) -> Any:
        if key not in row:
            raise UsageError(
                f"{where}: row has no key {key!r} (its keys: {sorted(row)}); pass the right one with {flag}."
            )
        return row[key]

    def _build(self, where: str, row: dict) -> Prompt:
        raw = self._required(where, row, self.input_key, "--input-key")
        label = self._required(where, row, self.label_key, "--label-key") if self.label_key else None
        if isinstance(label, (int, float)) and not isinstance(label, bool):
            label = str(label)
        metadata = self._metadata(where, row)
        if self.apply_chat_template:
            messages = self._messages(where, raw)
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **self.chat_template_kwargs
            )
            # The template writes any BOS itself, so the rendered text is encoded without extra specials.
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        elif isinstance(raw, str):
            text, ids = raw, self.tokenizer.encode(raw, add_special_tokens=True)
        elif _is_messages(raw):
            raise UsageError(
                f"{where}: {self.input_key!r} holds chat messages; pass --apply-chat-template to render them."
            )
        else:
            raise UsageError(
                f"{where}: {self.input_key!r} is a {type(raw).__name__}; it must be a string or a list of "
                "chat messages ({'role', 'content'})."
            )
        return Prompt(prompt=raw, prompt_text=text, prompt_ids=ids, label=label, metadata=metadata)

    def _messages(self, where: str, raw: Any) -> list[dict]:
        if isinstance(raw, str):
            messages = [{"role": "user", "content": raw}]
        elif _is_messages(raw):
            messages = [dict(m) for m in raw]
        else:
            raise UsageError(
                f"{where}: {self.input_key!r} is a {type(raw).__name__}; it must be a string or a list of "
                "chat messages ({'role', 'content'})."
            )
        if self.system_prompt is not None and messages[:1] and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _metadata(self, where: str, row: dict) -> dict:
        value = row.get(self.metadata_key)
        if value is None:
            return {}
        if isinstance(value, str):  # some datasets store metadata as a JSON string
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if not isinstance(value, dict):
            raise UsageError(
                f"{where}: {self.metadata_key!r} must be an object (or a JSON string of one), got "
                f"{type(value).__name__}; fix the row or choose another --metadata-key."
            )
        return value


# ---------------------------------------------------------------------------------------------------
# batches


class RolloutDataSource:
    """Serve `batch_size` prompts at a time, epoch after epoch, in a reproducible (maybe shuffled) order."""

    def __init__(self, dataset: PromptDataset | list[Prompt], batch_size: int, shuffle: bool, seed: int):
        if batch_size <= 0:
            raise UsageError(f"--rollout-batch-size must be positive, got {batch_size}.")
        if len(dataset) == 0:
            raise UsageError("the prompt dataset is empty; give --prompt-data a file with prompts.")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0  # epochs started so far minus one: the epoch `offset` points into
        self.offset = 0  # position within the current epoch's order
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            # A fresh generator per epoch makes each epoch's order a function of (seed, epoch) alone,
            # so restoring (epoch, offset) reproduces the rest of the run exactly.
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_batch(self, size: int | None = None) -> list[Prompt]:
        """The next `size` (default `batch_size`) prompts; a batch that runs past the end continues into
        the next epoch."""
        size = self.batch_size if size is None else size
        batch = []
        while len(batch) < size:
            if self.offset == len(self._order):
                self.epoch += 1
                self.offset = 0
                self._order = self._epoch_order(self.epoch)
            take = min(size - len(batch), len(self._order) - self.offset)
            batch.extend(self.dataset[i] for i in self._order[self.offset : self.offset + take])
            self.offset += take
        return batch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_prompts": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; the data file must hold the same number of prompts as then."""
        if state.get("num_prompts", len(self.dataset)) != len(self.dataset):
            raise UsageError(
                f"the checkpoint's data position was saved for {state['num_prompts']} prompts but the data "
                f"now has {len(self.dataset)}; resume with the same --prompt-data (and filters) or start a "
                "new run."
            )
        self.seed = state.get("seed", self.seed)
        self.shuffle = state.get("shuffle", self.shuffle)
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._epoch_order(self.epoch)
