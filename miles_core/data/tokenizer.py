"""A light tokenizer for the core: HF `tokenizer.json` through the `tokenizers` library, plus chat templates.

It reads the files transformers saves (tokenizer.json, tokenizer_config.json, chat_template.jinja,
special_tokens_map.json) and renders chat templates the way transformers does, so prompts and token ids
match `AutoTokenizer` exactly without making transformers a dependency of the core.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from miles_core.types import UsageError

# The named special tokens transformers hands to chat templates (its `special_tokens_map`).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Files that make up a saved tokenizer; save_pretrained copies whichever of them exist.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
_FIX = "point --hf-checkpoint at a folder with tokenizer.json"


def _token_str(value: Any) -> str | None:
    """A special token as saved: a plain string, or an AddedToken dict whose text is under "content"."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e}); restore it from the original checkpoint.") from e


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by templates that mark assistant text)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, so templates cannot reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set namespace attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False):
    # Jinja's own tojson HTML-escapes quotes and '<'; chat templates expect plain JSON, as transformers gives.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(template: str) -> jinja2.Template:
    """Compile `template` in a sandbox with the globals and filters HF chat templates rely on."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _SafeNamespace
    return env.from_string(template)


def _normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Copy messages, dropping None-valued keys (templates print "None") and aliasing reasoning fields."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise UsageError(
                f"chat message {message!r} is not a dict; give messages as {{'role', 'content'}}."
            )
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next(
            (message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None
        )
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class Tokenizer:
    """Encode, decode and apply chat templates for one saved HF tokenizer folder."""

    def __init__(self, path: Path, backend: _HFTokenizer, config: dict, chat_template: str | dict | None):
        self.path = path
        self._tk = backend
        self.config = config
        if isinstance(chat_template, list):  # several named templates, saved as [{"name", "template"}]
            chat_template = {t["name"]: t["template"] for t in chat_template}
        if isinstance(chat_template, dict):
            chat_template = chat_template.get("default")
        self.chat_template: str | None = chat_template
        self.special_tokens = {k: _token_str(config.get(k)) for k in SPECIAL_TOKEN_NAMES if config.get(k)}
        self.special_tokens = {k: v for k, v in self.special_tokens.items() if v is not None}
        self.eos_token_id = self._id_of("eos_token")
        self.bos_token_id = self._id_of("bos_token")
        pad = self._id_of("pad_token")
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        # add_bos_token / add_eos_token in the config are ignored on purpose: like transformers 5, the
        # post-processor saved in tokenizer.json decides what encode(add_special_tokens=True) adds.
        self._compiled: jinja2.Template | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, chat_template_path: str | Path | None = None) -> Tokenizer:
        """Load the tokenizer saved in folder `path` (an HF checkpoint or a `save_pretrained` output); the
        Jinja file `chat_template_path` (``--chat-template-path``) replaces its chat template."""
        path = Path(path)
        if not path.is_dir():
            raise UsageError(f"tokenizer folder {path} does not exist; {_FIX}.")
        if not (path / "tokenizer.json").is_file():
            raise UsageError(
                f"{path} has no tokenizer.json; {_FIX} (a fast tokenizer saved by transformers)."
            )
        try:
            backend = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise UsageError(f"{path / 'tokenizer.json'} could not be loaded ({e}); {_FIX}.") from e
        config = _read_json(path / "tokenizer_config.json")
        # special_tokens_map.json (older saves) fills in what tokenizer_config.json leaves out.
        for key, value in _read_json(path / "special_tokens_map.json").items():
            if not config.get(key):
                config[key] = value
        chat_template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():  # transformers >= 4.50 saves the template here
            chat_template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if chat_template_path is not None:
            template_file = Path(chat_template_path)
            if not template_file.is_file():
                raise UsageError(
                    f"--chat-template-path {template_file} does not exist; pass a Jinja chat template file."
                )
            chat_template = template_file.read_text(encoding="utf-8")
            try:
                compile_chat_template(chat_template)
            except jinja2.exceptions.TemplateSyntaxError as e:
                raise UsageError(
                    f"--chat-template-path {template_file}: line {e.lineno}: {e.message}; fix the template."
                ) from None
        return cls(path, backend, config, chat_template)

    # ---------------------------------------------------------------------------------------------
    # vocabulary

    def _id_of(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._tk.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit, added tokens included (transformers' `len(tokenizer)`)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token", self.eos_token)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tk.id_to_token(idx)

    # ---------------------------------------------------------------------------------------------
    # encode / decode

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the post-processor adds (e.g. a BOS)."""
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)
        # transformers skips this clean-up for BPE models because it corrupts their spacing.
        if self._clean_up_spaces and type(self._tk.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    # ---------------------------------------------------------------------------------------------
    # chat template

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the tokenizer's chat template; token ids instead when `tokenize`.

        Extra keyword arguments (``tools``, ``enable_thinking``, ...) reach the template as variables,
        overriding the special-token variables (``bos_token``, ``eos_token``, ...) like in transformers.
        """
        if not self.chat_template:
            raise UsageError(
                f"tokenizer {self.path} has no chat template; drop --apply-chat-template or add one "
                "(chat_template.jinja or 'chat_template' in tokenizer_config.json)."
            )
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        try:
            text = self._compiled.render(
                messages=_normalize_messages(messages),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as e:
            raise UsageError(
                f"the chat template of {self.path} rejected the messages ({e}); fix the prompt messages "
                "(roles, order) or the template."
            ) from e
        # The template writes any BOS itself, so the rendered text is encoded without adding specials.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---------------------------------------------------------------------------------------------
    # saving

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Copy the tokenizer's original files into `out_dir` (created if missing)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            src = self.path / name
            if src.is_file() and src.resolve() != (out_dir / name).resolve():
                shutil.copyfile(src, out_dir / name)
        return out_dir


def _clean_up_tokenization(text: str) -> str:
    """Undo the spaces WordPiece-style decoders put before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
        text = text.replace(before, after)
    for before, after in ((" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
