"""Text through a Hugging Face tokenizer: the engines' shared half of the text contract.

Both model engines read their checkpoint's tokenizer files with ``AutoTokenizer``, so
prompts, chat templates and detokenizing are the same whichever backend computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deployments.engine.chat_template import (
    template_takes_tools,
    uses_tools,
    with_tools_as_text,
)
from deployments.engine.guided import GuideCompiler
from deployments.engine.protocol import EngineError


class HFTokenizerText:
    """The TokenizerText (runner.py) of a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            tools: Sequence[dict[str, Any]] = ()) -> str:
        """Through the model's chat template; tools through it too when it takes them,
        else written out in the Hermes format (chat_template.py)."""
        template = getattr(self._tokenizer, "chat_template", None)
        if not template:
            raise EngineError("this model has no chat template; use /v1/completions",
                              field="messages")
        extra: dict[str, Any] = {}
        if uses_tools(messages, tools):
            if template_takes_tools(template):
                extra["tools"] = list(tools) or None
            else:
                messages = with_tools_as_text(messages, tools)
        return self._tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                   add_generation_prompt=True, **extra)

    def guides(self, vocab_size: int, eos_token_ids: Sequence[int]) -> GuideCompiler:
        """Grammar constraints over this tokenizer's tokens (guided.py)."""
        return GuideCompiler.for_hf_tokenizer(self._tokenizer, vocab_size, eos_token_ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        """``tokenizer.decode(ids, skip_special_tokens=True)``, straight from the Rust
        tokenizer when there is one. The scheduler decodes every running sequence's whole
        answer once per step; transformers' own decode checks each id's type in Python
        first, many times slower than the Rust call."""
        tokenizer = self._tokenizer
        backend = getattr(tokenizer, "_tokenizer", None) if tokenizer.is_fast else None
        if backend is None:
            return tokenizer.decode(token_ids, skip_special_tokens=True)
        text = backend.decode(list(token_ids), skip_special_tokens=True)
        if tokenizer.clean_up_tokenization_spaces:
            text = tokenizer.clean_up_tokenization(text)
        return text
