"""SFT samples (``--loss-type sft_loss``): prompt/response rows of the prompt data turned into training
samples, no generation and no reward, the loss on the response tokens only.

Two row shapes, read through `PromptDataset` like RL prompts:

- ``--input-key`` the prompt (text, or messages with ``--apply-chat-template``) and ``--label-key`` the
  response text: the sample is the prompt's tokens, then the response's and the tokenizer's EOS token;
- ``--input-key`` chat messages whose last message is the assistant's (slime's ``--input-key
  messages``), with ``--apply-chat-template`` and no ``--label-key``: the response is what the template
  renders for that last message (its end-of-turn token included); the turns before it are the prompt.
"""

from __future__ import annotations

from typing import Any

from miles_core.data.source import Prompt, _is_messages
from miles_core.types import Sample, Status, UsageError


def _messages_split(prompt: Prompt, tokenizer: Any, system_prompt: str | None) -> tuple[list[int], list[int]]:
    messages = [dict(m) for m in prompt.prompt]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    head = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    if not full.startswith(head):
        raise UsageError(
            "the chat template does not render the conversation before its last (assistant) message as a "
            "prefix of the whole; give the rows a --label-key response instead."
        )
    return tokenizer.encode(head, add_special_tokens=False), tokenizer.encode(
        full[len(head) :], add_special_tokens=False
    )


def sft_sample(prompt: Prompt, tokenizer: Any, index: int, system_prompt: str | None = None) -> Sample:
    """The training sample of one prompt/response row (a ``Sample`` with reward 0, loss on the response)."""
    raw = prompt.prompt
    if prompt.label is None and _is_messages(raw) and raw and raw[-1]["role"] == "assistant":
        prompt_ids, response_ids = _messages_split(prompt, tokenizer, system_prompt)
    elif isinstance(prompt.label, str) and prompt.label:
        prompt_ids = list(prompt.prompt_ids)
        response_ids = tokenizer.encode(prompt.label, add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
    else:
        raise UsageError(
            "--loss-type sft_loss trains on a response per row: give its text with --label-key, or make "
            "--input-key chat messages ending with the assistant's (with --apply-chat-template)."
        )
    if not prompt_ids or not response_ids:
        raise UsageError(f"SFT row {index} has an empty prompt or response after tokenizing; fix the row.")
    return Sample(
        group_index=index,
        index=index,
        prompt=prompt.prompt_text,
        tokens=prompt_ids + response_ids,
        response_length=len(response_ids),
        loss_mask=[1] * len(response_ids),
        label=prompt.label,
        reward=0.0,
        status=Status.COMPLETED,
        metadata=dict(prompt.metadata or {}),
    )


def sft_samples(prompts: list[Prompt], tokenizer: Any, system_prompt: str | None = None) -> list[Sample]:
    """One SFT sample per row of ``prompts``, in order."""
    return [sft_sample(p, tokenizer, i, system_prompt) for i, p in enumerate(prompts)]
