"""Tests for miles_core.data.source: row reading, prompt building, error sentences, resumable batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from miles_core.data import Prompt, PromptDataset, RolloutDataSource, Tokenizer, read_rows
from miles_core.types import UsageError

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """A word-level tokenizer: one id per whitespace-separated word, so prompt lengths are easy to predict."""
    words = "what is one two three four five six seven eight nine ten user system assistant be brief".split()
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    folder = tmp_path_factory.mktemp("tok")
    tk.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_pretrained(folder)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------
# read_rows


def test_read_rows_jsonl_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a"}, "", "   ", {"input": "b", "x": [1]}])
    assert read_rows(path) == [{"input": "a"}, {"input": "b", "x": [1]}]


def test_read_rows_malformed_line_names_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a"}, "", '{"input": "b",'])
    with pytest.raises(UsageError, match=r"d\.jsonl:3: malformed JSON row \(.*\); fix or remove that line\."):
        read_rows(path)


def test_read_rows_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a"}, "[1, 2]"])
    with pytest.raises(UsageError, match=r"d\.jsonl:2: row is a JSON list, not an object"):
        read_rows(path)


def test_read_rows_missing_and_empty_file(tmp_path):
    with pytest.raises(UsageError, match=r"nope\.jsonl does not exist; .*--prompt-data"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UsageError, match=r"empty\.jsonl has no rows"):
        read_rows(tmp_path / "empty.jsonl")


def test_read_rows_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # an import of it raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(UsageError, match=r"d\.parquet needs pyarrow, .*pip install 'miles-core\[parquet\]'"):
        read_rows(tmp_path / "d.parquet")


def test_read_rows_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pip install 'miles-core[parquet]' (in the dev extra)")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"input": "one", "label": "1"}]), tmp_path / "d.parquet")
    assert read_rows(tmp_path / "d.parquet") == [{"input": "one", "label": "1"}]


# ---------------------------------------------------------------------------------------------------
# PromptDataset


def test_plain_text_prompts(tmp_path, tokenizer):
    rows = [
        {"input": "what is one", "label": 1, "metadata": {"rm_type": "math"}},
        {"input": "two three", "label": "x"},
    ]
    ds = PromptDataset(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, label_key="label")
    assert len(ds) == 2 and ds.num_filtered == 0
    first = ds[0]
    assert isinstance(first, Prompt)
    assert first.prompt == first.prompt_text == "what is one"
    assert first.prompt_ids == tokenizer.encode("what is one") and len(first.prompt_ids) == 3
    assert first.label == "1" and first.metadata == {"rm_type": "math"}
    assert ds[1].label == "x" and ds[1].metadata == {}


def test_missing_input_key_names_line_and_keys(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "one"}, "", {"question": "two", "answer": "2"}])
    with pytest.raises(UsageError) as err:
        PromptDataset(path, tokenizer)
    msg = str(err.value)
    assert (
        "d.jsonl:3" in msg and "'input'" in msg and "['answer', 'question']" in msg and "--input-key" in msg
    )
    ok = PromptDataset(
        write_jsonl(tmp_path / "e.jsonl", [{"question": "two"}]), tokenizer, input_key="question"
    )
    assert ok[0].prompt == "two"


def test_missing_label_key(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "one", "label": "1"}, {"input": "two"}])
    with pytest.raises(UsageError) as err:
        PromptDataset(path, tokenizer, label_key="label")
    msg = str(err.value)
    assert "d.jsonl:2" in msg and "'label'" in msg and "['input']" in msg and "--label-key" in msg


def test_chat_template_with_system_prompt(tmp_path, tokenizer):
    rows = [{"input": "what is one"}, {"input": [{"role": "user", "content": "two"}]}]
    ds = PromptDataset(
        write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, apply_chat_template=True, system_prompt="be brief"
    )
    want = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is one<|im_end|>\n"
    assert ds[0].prompt_text == want + "<|im_start|>assistant\n"
    assert ds[0].prompt == "what is one"
    assert ds[0].prompt_ids == tokenizer.encode(ds[0].prompt_text)
    assert ds[0].prompt_ids[0] == tokenizer.token_to_id("<|im_start|>")
    assert ds[1].prompt_text.startswith("<|im_start|>system\nbe brief") and "user\ntwo" in ds[1].prompt_text


def test_messages_without_chat_template_flag(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": [{"role": "user", "content": "two"}]}])
    with pytest.raises(
        UsageError, match=r"d\.jsonl:1: 'input' holds chat messages; pass --apply-chat-template"
    ):
        PromptDataset(path, tokenizer)


def test_max_prompt_len_filters_and_counts(tmp_path, tokenizer):
    rows = [{"input": "one"}, {"input": "one two three four"}, {"input": "one two"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = PromptDataset(path, tokenizer, max_prompt_len=2)
    assert [p.prompt for p in ds.prompts] == ["one", "one two"] and ds.num_filtered == 1
    with pytest.raises(UsageError, match=r"all 3 prompts .* are longer than 0 tokens"):
        PromptDataset(path, tokenizer, max_prompt_len=0)


def test_bad_metadata(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"input": "one", "metadata": '{"k": 1}'}, {"input": "x", "metadata": 3}]
    )
    with pytest.raises(UsageError, match=r"d\.jsonl:2: 'metadata' must be an object"):
        PromptDataset(path, tokenizer)
    ok = PromptDataset(
        write_jsonl(tmp_path / "e.jsonl", [{"input": "one", "metadata": '{"k": 1}'}]), tokenizer
    )
    assert ok[0].metadata == {"k": 1}


# ---------------------------------------------------------------------------------------------------
# RolloutDataSource


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(prompt=f"p{i}", prompt_text=f"p{i}", prompt_ids=[i]) for i in range(n)]


def test_batches_walk_epochs_in_order_without_shuffle():
    src = RolloutDataSource(_prompts(5), batch_size=3, shuffle=False, seed=0)
    got = [[p.prompt for p in src.next_batch()] for _ in range(3)]
    assert got == [["p0", "p1", "p2"], ["p3", "p4", "p0"], ["p1", "p2", "p3"]]
    assert (src.epoch, src.offset) == (1, 4)


def test_shuffle_is_a_seeded_permutation_per_epoch():
    src = RolloutDataSource(_prompts(10), batch_size=10, shuffle=True, seed=7)
    e0, e1 = [p.prompt_ids[0] for p in src.next_batch()], [p.prompt_ids[0] for p in src.next_batch()]
    assert sorted(e0) == sorted(e1) == list(range(10))
    assert e0 != e1 and e0 != list(range(10))
    again = RolloutDataSource(_prompts(10), batch_size=10, shuffle=True, seed=7)
    assert [p.prompt_ids[0] for p in again.next_batch()] == e0
    other = RolloutDataSource(_prompts(10), batch_size=10, shuffle=True, seed=8)
    assert [p.prompt_ids[0] for p in other.next_batch()] != e0


@pytest.mark.parametrize("batch_size", [3, 7, 16])
def test_resume_continues_exactly(batch_size):
    n = 8  # batches; with 7 prompts every batch size above crosses epoch boundaries mid-batch
    straight = RolloutDataSource(_prompts(7), batch_size=batch_size, shuffle=True, seed=3)
    want = [[p.prompt for p in straight.next_batch()] for _ in range(n)]

    first = RolloutDataSource(_prompts(7), batch_size=batch_size, shuffle=True, seed=3)
    got = [[p.prompt for p in first.next_batch()] for _ in range(n // 2)]
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a JSON checkpoint
    resumed = RolloutDataSource(_prompts(7), batch_size=batch_size, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    got += [[p.prompt for p in resumed.next_batch()] for _ in range(n - n // 2)]
    assert got == want
    assert (resumed.epoch, resumed.offset) == (straight.epoch, straight.offset)


def test_resume_with_different_data_size_is_refused():
    src = RolloutDataSource(_prompts(7), batch_size=2, shuffle=True, seed=0)
    src.next_batch()
    other = RolloutDataSource(_prompts(6), batch_size=2, shuffle=True, seed=0)
    with pytest.raises(UsageError, match=r"saved for 7 prompts but the data now has 6"):
        other.load_state_dict(src.state_dict())


def test_bad_batch_size():
    with pytest.raises(UsageError, match=r"--rollout-batch-size must be positive"):
        RolloutDataSource(_prompts(3), batch_size=0, shuffle=False, seed=0)
