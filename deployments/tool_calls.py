"""Tool calls: the grammar of a forced call, and the calls read back from an answer.

A forced call (``tool_choice`` "required" or a named function) is generated under a JSON
schema, as vLLM does, so its arguments always parse and match the tool's schema: for a
named function, the arguments object itself; for "required", a list of
``{"name": ..., "arguments": ...}`` objects, one of the tools each (one call unless
``parallel_tool_calls``). With ``tool_choice`` "auto" the model writes what it likes, and
a parser for its template family reads calls out of the text (``TOOL_CALL_PARSERS``; the
config's ``tool_call_parser`` picks one):

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes,
  Qwen 2.5 and 3; the format deployments/engine/chat_template.py writes tools in for
  models whose template has none, the demo model's among them);
- ``llama3_json``: the whole answer is ``{"name": ..., "parameters": {...}}`` (or several,
  separated by ``;``), as Llama 3.1-3.3 call tools.

Imports neither ray nor torch.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

from deployments.contract import Guide, Tool, ToolCall
from deployments.grammar import strict_schema

ToolCallParserName = Literal["hermes", "llama3_json"]
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def forced_call_guide(tools: Sequence[Tool], named: str | None, parallel: bool) -> Guide:
    """The grammar of a forced call: the named tool's arguments, or a list of calls. The
    arguments allow no keys beyond those declared unless a schema says otherwise (OpenAI's
    strict mode; a function takes the arguments it declares)."""
    if named is not None:
        tool = next(t for t in tools if t.name == named)
        return Guide(kind="json_schema", spec=json.dumps(strict_schema(tool.parameters)))
    calls = [{"type": "object", "properties": {"name": {"const": tool.name},
                                               "arguments": strict_schema(tool.parameters)},
              "required": ["name", "arguments"], "additionalProperties": False}
             for tool in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return Guide(kind="json_schema", spec=json.dumps(schema))


def forced_calls(text: str, named: str | None) -> list[ToolCall]:
    """The calls of a forced answer (``text``: what ``forced_call_guide`` allowed). Cut
    short by max_tokens, a named call keeps its text as the arguments (unparseable: the
    client sees it was cut), and a list keeps the calls it completed."""
    if named is not None:
        return [ToolCall(id=new_call_id(), name=named, arguments=text)]
    return [ToolCall(id=new_call_id(), name=call["name"], arguments=json.dumps(call["arguments"]))
            for call in _whole_items(text)]


def _whole_items(text: str) -> list[Any]:
    """The complete items of a JSON list, even when the list itself was cut off."""
    decoder, items, index = json.JSONDecoder(), [], text.find("[") + 1
    while 0 < index < len(text):
        try:
            item, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            break
        items.append(item)
        index += 1  # the comma (compact JSON: no whitespace)
    return items


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content before the first call or the whole text, calls) of a Hermes-style answer;
    a block that is not a JSON call stays text."""
    calls = []
    for block in _HERMES_CALL.findall(text):
        call = _json_call(block, "arguments")
        if call is None:
            return text, []
        calls.append(call)
    if not calls:
        return text, []
    content = text[:text.index("<tool_call>")].strip()
    return content or None, calls


def parse_llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    """(None, calls) when the whole answer is Llama 3's JSON call(s), else (text, [])."""
    stripped = text.strip().removeprefix("<|python_tag|>")
    if not stripped.startswith("{"):
        return text, []
    calls = [_json_call(part, "parameters") for part in stripped.split(";")]
    if not calls or any(call is None for call in calls):
        return text, []
    return None, calls  # type: ignore[return-value]


TOOL_CALL_PARSERS: dict[str, Callable[[str], tuple[str | None, list[ToolCall]]]] = {
    "hermes": parse_hermes, "llama3_json": parse_llama3_json}


def _json_call(text: str, arguments_key: str) -> ToolCall | None:
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get(arguments_key, call.get("arguments", {}))
    return ToolCall(id=new_call_id(), name=call["name"], arguments=json.dumps(arguments))
