"""Tool calls: the registry (entry-point group ``miles.tools``), parsing the model's calls, running them.

The model calls a tool the way Qwen2.5/Qwen3 chat models do, a JSON object between tags (several calls
in one turn are allowed)::

    <tool_call>{"name": "python", "arguments": {"code": "print(17 * 23)"}}</tool_call>

``arguments`` may also be a JSON string holding that object. A tool is ``async def tool(args, arguments:
dict) -> str`` (`miles_core.protocols.Tool`), installed under a name in ``miles.tools`` and offered with
``--tools NAME ...``; an optional ``spec`` attribute (an OpenAI function schema) is what a chat template's
``tools`` variable receives. Nothing a call does stops the rollout: an unparsable call, an unknown tool,
bad arguments or a tool that raises each come back to the model as one line of text starting ``error:``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from typing import Any

from miles_core import drivers
from miles_core.rollout.checks import describe_exception

CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    """One call found in a model turn: the tool's name and arguments, or why it could not be read."""

    name: str | None
    arguments: dict
    error: str | None = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The tool calls in ``text``, in order (an empty list when it has none)."""
    return [_parse_one(body) for body in CALL_RE.findall(text)]


def _parse_one(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall(None, {}, f"error: the tool call is not JSON ({e.msg} at character {e.pos})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall(None, {}, 'error: a tool call is {"name": "<tool>", "arguments": {...}}')
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(arguments, dict):
        return ToolCall(obj["name"], {}, "error: the tool call's arguments are not a JSON object")
    return ToolCall(obj["name"], arguments)


class ToolRegistry:
    """The tools of ``--tools``, loaded once per rollout manager."""

    def __init__(self, names: list[str]) -> None:
        self.tools = {name: drivers.get_tool(name) for name in names}

    @property
    def specs(self) -> list[dict]:
        """The ``spec`` of each tool that has one (for the chat template's ``tools`` variable)."""
        return [t.spec for t in self.tools.values() if getattr(t, "spec", None)]

    async def call(self, args: argparse.Namespace, call: ToolCall) -> str:
        """The text the model sees for ``call``: the tool's answer, or an ``error:`` line."""
        if call.error is not None:
            return call.error
        tool = self.tools.get(call.name)
        if tool is None:
            return f"error: no tool named {call.name!r}; the tools are: {', '.join(self.tools)}"
        try:
            result: Any = await tool(args, call.arguments)
        except Exception as e:  # a broken tool is the model's problem to read about, not the run's
            return f"error: tool {call.name!r} raised {describe_exception(e)}"
        return result if isinstance(result, str) else json.dumps(result, default=str)


_REGISTRIES: dict[tuple[str, ...], ToolRegistry] = {}


def registry_for(names: list[str]) -> ToolRegistry:
    """The (cached) registry of these tool names; unknown names are a ``UsageError``."""
    key = tuple(names)
    if key not in _REGISTRIES:
        _REGISTRIES[key] = ToolRegistry(list(names))
    return _REGISTRIES[key]
