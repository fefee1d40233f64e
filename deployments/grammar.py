"""Guides (contract.Guide) as llguidance grammars: shared by the router, which refuses a
guide that cannot be enforced with a 400 before any replica works on it, and the engine,
which compiles it for its tokenizer (engine/guided.py).

llguidance was chosen by measurement (bench/RESULTS.md): no Python dependencies, numpy
masks, and it refuses a JSON Schema keyword it does not enforce (``uniqueItems``) instead
of ignoring it. JSON is generated compact (no free whitespace between tokens: with it a
model may pad forever).

Imports neither ray nor torch.
"""

from __future__ import annotations

from typing import Any

from deployments.constants import STRICT_NUMBER_STEP
from deployments.contract import Guide


def grammar_of(guide: Guide) -> str:
    """The llguidance grammar of ``guide``; ValueError naming what is wrong."""
    from llguidance import LLMatcher, grammar_from

    if guide.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(
            guide.spec, overrides={"whitespace_flexible": False})
    return grammar_from(guide.kind, guide.spec)  # grammar: Lark, or GBNF made Lark


def guide_error(guide: Guide) -> str | None:
    """Why ``guide`` cannot be enforced (an invalid grammar or regex, a JSON Schema keyword
    llguidance does not support), or None when it can; needs no tokenizer."""
    from llguidance import LLMatcher

    try:
        grammar = grammar_of(guide)
    except (ValueError, TypeError) as error:
        return _one_line(str(error))
    message = LLMatcher.validate_grammar(grammar)
    return _one_line(message) if message else None


def _one_line(message: str, limit: int = 300) -> str:
    """llguidance's multi-line diagnostics (with carets) as one line for an error JSON."""
    flat = " ".join(message.split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."




def strict_schema(schema: Any) -> Any:
    """``schema`` as OpenAI's strict mode reads it, so that an answer always ends: an object
    schema that does not say otherwise allows no properties beyond those it declares (or a
    model may invent keys forever), and a number without ``multipleOf`` has at most six
    decimal places (``STRICT_NUMBER_STEP``). Every answer still validates against
    ``schema``."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: strict_schema(value) for key, value in schema.items()}
    if (schema.get("type") == "object" or "properties" in schema) \
            and "additionalProperties" not in schema:
        strict["additionalProperties"] = False
    types = schema.get("type")
    if (types == "number" or (isinstance(types, list) and "number" in types)) \
            and "multipleOf" not in schema:
        strict["multipleOf"] = STRICT_NUMBER_STEP
    return strict
