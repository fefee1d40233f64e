"""OpenAI choices out of replica answers: text, logprobs and tool calls, whole or streamed.

The router generates one answer per choice (``n``; per prompt on completions) and turns
each into OpenAI's choice object here: ``completion_choice`` and ``chat_choice`` for whole
answers, ``ChatChoiceStream`` for the deltas of a streamed chat answer, with tool calls
read from the answer as the request's tool mode says (deployments/tool_calls.py):

- ``none``: the text is the content;
- ``named``: the answer is the named function's arguments (grammar-forced); streamed as
  they come, after a first delta with the call's id and name;
- ``required``: the answer is a JSON list of calls (grammar-forced); streamed whole once
  it is complete (a call's arguments are not known to be one call's before that);
- ``auto``: the model may write calls in its template's format; the content is held back
  while streaming and sent with the calls, if any, once the answer is complete.

A choice with calls ends with ``finish_reason`` "tool_calls" (unless max_tokens cut it).

Imports neither ray nor torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deployments.contract import OutputChunk, TokenLogprob, ToolCall
from deployments.tool_calls import TOOL_CALL_PARSERS, forced_calls, new_call_id


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Chat's ``logprobs`` object: one entry per token, with its top alternatives."""
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
                         "top_logprobs": [{"token": t.token, "logprob": t.logprob,
                                           "bytes": list(t.bytes)} for t in e.top_logprobs]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Completions' legacy ``logprobs`` object; ``offset``: where the answer starts in the
    choice's text (text_offset counts from there)."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
            "text_offset": offsets}


def completion_choice(index: int, answer: OutputChunk, *, prefix: str = "",
                      logprobs: bool = False) -> dict[str, Any]:
    """A completions choice; ``prefix``: the prompt, with ``echo``."""
    return {"index": index, "text": prefix + answer.text,
            "logprobs": completion_logprobs(answer.logprobs, len(prefix)) if logprobs else None,
            "finish_reason": answer.finish_reason}


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def read_calls(text: str, mode: str, named: str | None, parser: str
               ) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole answer under ``mode``."""
    if mode in ("named", "required"):
        return None, forced_calls(text, named)
    if mode == "auto":
        return TOOL_CALL_PARSERS[parser](text)
    return text, []


def _finish_reason(answer_reason: str | None, calls: list[ToolCall]) -> str | None:
    return "tool_calls" if calls and answer_reason == "stop" else answer_reason


def chat_choice(index: int, answer: OutputChunk, *, mode: str = "none",
                named: str | None = None, parser: str = "hermes",
                logprobs: bool = False) -> dict[str, Any]:
    content, calls = read_calls(answer.text, mode, named, parser)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [tool_call_json(call) for call in calls]
    return {"index": index, "message": message,
            "logprobs": chat_logprobs(answer.logprobs) if logprobs else None,
            "finish_reason": _finish_reason(answer.finish_reason, calls)}


class ChatChoiceStream:
    """The deltas of one streamed chat choice, chunk by chunk."""

    def __init__(self, *, mode: str = "none", named: str | None = None,
                 parser: str = "hermes"):
        self._mode, self._named, self._parser = mode, named, parser
        self._started = False
        self._held: list[str] = []  # text of modes that send it once complete
        self._call_id = new_call_id()

    def deltas(self, chunk: OutputChunk) -> list[tuple[dict[str, Any], str | None]]:
        """(delta, finish_reason) pairs for ``chunk``; several at the end of held modes."""
        if self._mode == "named":
            return self._named_deltas(chunk)
        if self._mode in ("required", "auto"):
            self._held.append(chunk.text)
            if chunk.finish_reason is None:
                return self._opening()
            return self._held_deltas(chunk)
        delta: dict[str, Any] = {"content": chunk.text}
        if not self._started:
            delta = {"role": "assistant", **delta}
            self._started = True
        elif not chunk.text and chunk.finish_reason is None:
            return []
        return [(delta, chunk.finish_reason)]

    def _opening(self) -> list[tuple[dict[str, Any], str | None]]:
        if self._started:
            return []
        self._started = True
        return [({"role": "assistant", "content": ""}, None)]

    def _named_deltas(self, chunk: OutputChunk) -> list[tuple[dict[str, Any], str | None]]:
        reason = "tool_calls" if chunk.finish_reason == "stop" else chunk.finish_reason
        function: dict[str, Any] = {"arguments": chunk.text}
        call: dict[str, Any] = {"index": 0, "function": function}
        if not self._started:
            self._started = True
            call.update(id=self._call_id, type="function")
            function["name"] = self._named
            return [({"role": "assistant", "content": None, "tool_calls": [call]}, reason)]
        if not chunk.text and reason is None:
            return []
        return [({"tool_calls": [call]}, reason)]

    def _held_deltas(self, last: OutputChunk) -> list[tuple[dict[str, Any], str | None]]:
        content, calls = read_calls("".join(self._held), self._mode, self._named,
                                    self._parser)
        out = self._opening()
        if content:
            out.append(({"content": content}, None))
        for index, call in enumerate(calls):
            out.append(({"tool_calls": [{"index": index, **tool_call_json(call)}]}, None))
        out.append(({}, _finish_reason(last.finish_reason, calls)))
        return out
