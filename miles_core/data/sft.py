"""SFT samples (``--loss-type sft_loss``): prompt/response rows of the prompt data turned into training
samples, no generation and no reward, the loss on the response tokens only.

Two row shapes, read through `PromptDataset` like RL prompts:

- ``--input-key`` the prompt (text, or messages with ``--apply-chat-template``) and ``--label-key`` the
  response text: the sample is the prompt's tokens, then the response's and the tokenizer's EOS token;
- ``--input-key`` chat messages (slime's ``--input-key messages``), with ``--apply-chat-template`` and
  no ``--label-key``: the turns before the first assistant message are the prompt; from there on the
  response, in which what the template renders for each assistant message (its end-of-turn token
  included) is trained and the other turns between them are not.
"""

from __future__ import annotations

from typing import Any

from miles_core.data.source import Prompt, _is_messages
from miles_core.types import Sample, Status, UsageError


def _messages_split(
    prompt: Prompt, tokenizer: Any, system_prompt: str | None
) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids, loss mask) of a conversation: the response runs from the first assistant
    message to the last, each assistant message trained (mask 1) and the turns between them not (0),
    every piece rendered by the chat template and tokenized on its own (slime's multi-turn loss mask)."""
    messages = [dict(m) for m in prompt.prompt]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]

    def render(k: int, gen: bool) -> str:
        return tokenizer.apply_chat_template(messages[:k], add_generation_prompt=gen, tokenize=False)

    cuts = [(render(turns[0], True), 0)]  # (text up to here, trained?) of each piece, in order
    for n, i in enumerate(turns):
        if n:  # the turns between two assistant messages, up to the next generation prompt
            cuts.append((render(i, True), 0))
        cuts.append((render(i + 1, False), 1))
    ids: list[list[int]] = []
    mask: list[int] = []
    done = ""
    for k, (text, trained) in enumerate(cuts):
        if not text.startswith(done):
            raise UsageError(
                "the chat template does not render the conversation turn by turn as prefixes of the whole; "
                "give the rows a --label-key response instead."
            )
        piece = tokenizer.encode(text[len(done) :], add_special_tokens=False)
        ids.append(piece)
        if k:  # the first piece is the prompt
            mask += [trained] * len(piece)
        done = text
    return ids[0], [t for piece in ids[1:] for t in piece], mask


def sft_sample(prompt: Prompt, tokenizer: Any, index: int, system_prompt: str | None = None) -> Sample:
    """The training sample of one prompt/response row (a ``Sample`` with reward 0, loss on the response)."""
    raw = prompt.prompt
    if prompt.label is None and _is_messages(raw) and any(m["role"] == "assistant" for m in raw):
        prompt_ids, response_ids, mask = _messages_split(prompt, tokenizer, system_prompt)
    elif isinstance(prompt.label, str) and prompt.label:
        prompt_ids = list(prompt.prompt_ids)
        response_ids = tokenizer.encode(prompt.label, add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
        mask = [1] * len(response_ids)
    else:
        raise UsageError(
            "--loss-type sft_loss trains on a response per row: give its text with --label-key, or make "
            "--input-key chat messages with assistant turns (with --apply-chat-template)."
        )
    if not prompt_ids or not response_ids:
        raise UsageError(f"SFT row {index} has an empty prompt or response after tokenizing; fix the row.")
    return Sample(
        group_index=index,
        index=index,
        prompt=prompt.prompt_text,
        tokens=prompt_ids + response_ids,
        response_length=len(response_ids),
        loss_mask=mask,
        label=prompt.label,
        reward=0.0,
        status=Status.COMPLETED,
        metadata=dict(prompt.metadata or {}),
    )


def sft_samples(prompts: list[Prompt], tokenizer: Any, system_prompt: str | None = None) -> list[Sample]:
    """One SFT sample per row of ``prompts``, in order."""
    return [sft_sample(p, tokenizer, i, system_prompt) for i, p in enumerate(prompts)]
