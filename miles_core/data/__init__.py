"""Prompt data for rollouts: data files, the tokenizer and chat templates, and the batch source.

`Tokenizer` needs only `tokenizers` and `jinja2`; `PromptDataset` turns JSONL/Parquet rows into
tokenized prompts and `RolloutDataSource` serves them in reproducible, resumable batches.
"""

from miles_core.data.source import Prompt, PromptDataset, RolloutDataSource, read_rows
from miles_core.data.tokenizer import Tokenizer

__all__ = ["Prompt", "PromptDataset", "RolloutDataSource", "Tokenizer", "read_rows"]
