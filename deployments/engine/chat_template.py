"""Chats with tools, for models whose chat template knows no tools.

A chat template that takes ``tools`` (its source mentions them) renders tool definitions,
assistant tool calls and tool results itself. For one that does not (the demo model's
ChatML template), ``with_tools_as_text`` rewrites the chat into plain turns in the Hermes
format that Qwen and NousHermes models were trained on, and that the ``hermes`` tool-call
parser (deployments/tool_calls.py) reads back:

- the system turn (one is added if the chat has none) ends with the tool definitions, one
  JSON object per line inside ``<tools></tools>``, and the instruction to answer a call as
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
- an assistant turn's tool calls follow its text, each inside ``<tool_call></tool_call>``;
- a ``tool`` turn (a call's result) becomes a user turn inside
  ``<tool_response></tool_response>``.

Imports neither ray nor torch.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any

TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def template_takes_tools(template: str | None) -> bool:
    """Whether a Jinja chat template renders tools and tool calls itself."""
    return bool(template) and "tool" in template


def uses_tools(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def with_tools_as_text(messages: Sequence[dict[str, Any]],
                       tools: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """``messages`` (OpenAI style) as plain role/content turns, tools written out."""
    turns: list[dict[str, str]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            turns.append({"role": "user",
                          "content": f"<tool_response>\n{content}\n</tool_response>"})
        elif message.get("tool_calls"):
            calls = "\n".join(_tool_call_text(call) for call in message["tool_calls"])
            turns.append({"role": role, "content": f"{content}\n{calls}".lstrip("\n")})
        else:
            turns.append({"role": role, "content": content})
    if tools:
        listing = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t["function"])
                                                      for t in tools))
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{listing}"}
        else:
            turns.insert(0, {"role": "system", "content": f"{DEFAULT_SYSTEM_PROMPT}\n\n{listing}"})
    return turns


def _tool_call_text(call: dict[str, Any]) -> str:
    function = call["function"]
    arguments = function["arguments"]
    with contextlib.suppress(json.JSONDecodeError):  # else written as it came
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    body = json.dumps({"name": function["name"], "arguments": arguments})
    return f"<tool_call>\n{body}\n</tool_call>"
