"""Tests for miles_core.data.tokenizer: parity with transformers on a tokenizer built here, and errors.

The tokenizer is a byte-level BPE trained on a few sentences with Qwen's special tokens; transformers'
AutoTokenizer (a dev dependency) loads the same folder and is the reference for ids, text and templates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from miles_core.data.tokenizer import Tokenizer
from miles_core.types import UsageError

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 30? The answer is 42.",
    "Solve for x: 2x + 3 = 7, so x = 2.",
    "You are a helpful assistant. Please reason step by step.",
    "Héllo wörld, naïve café — 数学 问题",
]

# A Qwen-style template: default system prompt, tools rendered with tojson, a namespace, loop controls.
QWEN_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
{%- else %}You are a helpful assistant.{%- endif %}
{{- '\\n\\n# Tools\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' }}{{- tool | tojson }}
{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- else %}
{%- if messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
{%- if message.role == 'system' %}{% continue %}{% endif %}
{%- if message.role not in ['user', 'assistant'] %}
{{- raise_exception('unknown role ' + message.role) }}{% endif %}
{%- set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

# A Llama-style template that reads bos_token / eos_token from the special-token variables.
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def _train_backend() -> HFTokenizer:
    tk = HFTokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer=trainer)
    return tk


@pytest.fixture(scope="module")
def backend() -> HFTokenizer:
    return _train_backend()


def _save(folder: Path, backend: HFTokenizer, config: dict, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    return folder


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, backend) -> Path:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True, "lstrip": False},
        "bos_token": None,
        "chat_template": QWEN_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    return _save(tmp_path_factory.mktemp("qwen"), backend, config)


@pytest.fixture(scope="module")
def pair(qwen_dir):
    return Tokenizer.from_pretrained(qwen_dir), transformers.AutoTokenizer.from_pretrained(str(qwen_dir))


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and\nnewlines\n\n",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n",
    "Héllo wörld 数学 🙂 unseen zebra",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [
        {"role": "system", "content": "Please reason step by step."},
        {"role": "user", "content": "Solve for x: 2x + 3 = 7"},
        {"role": "assistant", "content": "x = 2", "reasoning_content": None},
        {"role": "user", "content": "Héllo 数学?"},
    ],
]


def test_special_token_ids(pair):
    ours, ref = pair
    assert ours.eos_token_id == ref.eos_token_id == ref.convert_tokens_to_ids("<|im_end|>")
    assert ours.pad_token_id == ref.pad_token_id == ref.convert_tokens_to_ids("<|endoftext|>")
    assert ours.bos_token_id is None and ref.bos_token_id is None
    assert ours.vocab_size == len(ref)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special", [False, True])
def test_encode_decode_parity(pair, text, add_special):
    ours, ref = pair
    ids = ours.encode(text, add_special_tokens=add_special)
    assert ids == ref.encode(text, add_special_tokens=add_special)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_parity(pair, chat, gen):
    ours, ref = pair
    text = ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
    assert text == ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
    assert "<|im_start|>user\n" in text and text.endswith("<|im_start|>assistant\n") == gen
    ids = ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
    assert ids == list(
        ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
    )
    assert ids.count(ours.eos_token_id) == text.count("<|im_end|>")


def test_chat_template_kwargs_and_tools_parity(pair):
    ours, ref = pair
    chat = CHATS[0]
    tools = [{"type": "function", "function": {"name": "add", "description": 'a<b & "c"', "parameters": {}}}]
    for kwargs in ({"enable_thinking": False}, {"tools": tools}):
        got = ours.apply_chat_template(chat, add_generation_prompt=True, **kwargs)
        assert got == ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, **kwargs)
    assert "<think>" in ours.apply_chat_template(chat, enable_thinking=False)
    assert 'a<b & \\"c\\"' in ours.apply_chat_template(chat, tools=tools)  # tojson does not HTML-escape


def test_bos_template_and_post_processor_parity(tmp_path, backend):
    # A Llama-style tokenizer.json whose post-processor prepends BOS; add_bos_token in the config is
    # ignored by transformers 5 when tokenizer.json exists, so it is set to False here to prove that.
    backend = HFTokenizer.from_str(backend.to_str())
    bos_id = backend.token_to_id("<|im_start|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A",
        pair="<|im_start|> $A <|im_start|> $B",
        special_tokens=[("<|im_start|>", bos_id)],
    )
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True},
        "add_bos_token": False,
        "chat_template": LLAMA_TEMPLATE,
    }
    folder = _save(tmp_path / "llama", backend, config)
    ours, ref = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.bos_token_id == ref.bos_token_id is not None
    for text in TEXTS[:4]:
        assert ours.encode(text, add_special_tokens=True) == ref.encode(text, add_special_tokens=True)
        assert ours.encode(text, add_special_tokens=True)[0] == ours.bos_token_id
    for chat in CHATS:
        assert ours.apply_chat_template(chat) == ref.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=False
        )
        got = ours.apply_chat_template(chat, tokenize=True)
        want = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert got == list(want) and got[0] == ours.bos_token_id


def test_chat_template_jinja_file_and_special_tokens_map(tmp_path, backend):
    jinja = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    folder = _save(
        tmp_path / "t5", backend, {"chat_template": "IGNORED"}, chat_template__jinja=jinja,
        special_tokens_map__json=json.dumps({"eos_token": {"content": "<|im_end|>", "lstrip": False}}),
    )  # fmt: skip
    ours, ref = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.chat_template == jinja
    assert ours.eos_token_id == ref.eos_token_id == ours.token_to_id("<|im_end|>")
    assert ours.pad_token_id == ours.eos_token_id  # no pad token: falls back to EOS
    chat = CHATS[1]
    assert ours.apply_chat_template(chat, add_generation_prompt=False) == ref.apply_chat_template(
        chat, add_generation_prompt=False, tokenize=False
    )


def test_save_pretrained_round_trip(tmp_path, qwen_dir, pair):
    ours, _ = pair
    out = ours.save_pretrained(tmp_path / "copy")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    again = Tokenizer.from_pretrained(out)
    assert again.apply_chat_template(CHATS[1]) == ours.apply_chat_template(CHATS[1])
    assert again.encode(TEXTS[0]) == ours.encode(TEXTS[0])


def test_missing_folder_and_tokenizer_json(tmp_path):
    with pytest.raises(UsageError, match=r"nowhere does not exist; point --hf-checkpoint at a folder"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"empty has no tokenizer.json; point --hf-checkpoint"):
        Tokenizer.from_pretrained(tmp_path / "empty")


def test_no_chat_template(tmp_path, qwen_dir):
    folder = tmp_path / "plain"
    shutil.copytree(qwen_dir, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = Tokenizer.from_pretrained(folder)
    assert tok.encode("The fox")  # plain encoding still works
    with pytest.raises(
        UsageError, match=r"plain has no chat template; drop --apply-chat-template or add one"
    ):
        tok.apply_chat_template(CHATS[0])


def test_template_raise_exception_becomes_usage_error(pair):
    ours, _ = pair
    with pytest.raises(UsageError, match=r"rejected the messages \(unknown role tool\)"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
