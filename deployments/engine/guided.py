"""Grammar-constrained decoding: a token mask per guided row, through llguidance.

A ``Guide`` (contract.py: a JSON schema, a regex, a list of choices or a Lark/GBNF grammar)
becomes an llguidance grammar; a ``GuideState`` per request follows the answer token by
token and gives the set of tokens that keep it inside the grammar, which the shared
sampler (sampler.py) applies to the row's logits before anything else. Every engine and
every batch row gets the same treatment, each row with its own state; the answer always
parses. Once the grammar is complete only EOS stays allowed, so a guided answer ends there.

llguidance (Rust, numpy only, no torch): deployments/grammar.py says why.
Compiled grammars are cached by guide (a new request copies the compiled matcher), and
the tokenizer's llguidance view is built once, on the first guided request.

The router checks every guide first (deployments/grammar.py), so a grammar that fails to
compile here is rare: it is refused with an EngineError naming the field.
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from deployments.constants import GUIDE_CACHE_SIZE
from deployments.contract import Guide
from deployments.engine.protocol import EngineError
from deployments.grammar import grammar_of

# The request field a guide came from, for errors (the router maps every guide form to it).
GUIDE_FIELD = "response_format"


class GuideCompiler:
    """Guides compiled for one tokenizer. ``make_tokenizer`` builds llguidance's view of it
    (called once, when the first guided request comes)."""

    def __init__(self, make_tokenizer: Callable[[], Any]):
        self._make_tokenizer = make_tokenizer
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._compiled: collections.OrderedDict[Guide, Any] = collections.OrderedDict()

    @classmethod
    def for_hf_tokenizer(cls, tokenizer: Any, vocab_size: int,
                         eos_token_ids: Sequence[int]) -> GuideCompiler:
        """For a Hugging Face tokenizer, from each token's bytes (llguidance's own reading
        of tokenizer.json takes byte-level tokens such as "Ġa" for literal text when the
        decoder is a chain, as the demo model's is)."""

        def make() -> Any:
            special = set(getattr(tokenizer, "added_tokens_decoder", {}))
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            tokens = [_token_bytes(piece, token in special)
                      for token, piece in enumerate(pieces)]
            tokens += [b""] * (vocab_size - len(tokens))  # ids the model has, the tokenizer not

            def encode(text: str) -> list[int]:
                return tokenizer.encode(text, add_special_tokens=False)

            return _ll_tokenizer(tokens, eos_token_ids, sorted(special), encode)

        return cls(make)

    @classmethod
    def for_token_bytes(cls, tokens: Sequence[bytes], eos_token_ids: Sequence[int]
                        ) -> GuideCompiler:
        """For a tokenizer given by each token's bytes (the echo runner's code points)."""

        def encode(text: str) -> list[int]:
            return [ord(c) for c in text]

        return cls(lambda: _ll_tokenizer(list(tokens), eos_token_ids, list(eos_token_ids),
                                         encode))

    def state(self, guide: Guide) -> GuideState:
        """A fresh state of ``guide``'s grammar; EngineError if it does not compile."""
        from llguidance import LLMatcher

        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            prototype = self._compiled.get(guide)
            if prototype is None:
                try:
                    grammar = grammar_of(guide)
                except (ValueError, TypeError) as error:
                    raise EngineError(f"invalid {guide.kind}: {error}",
                                      field=GUIDE_FIELD) from None
                prototype = LLMatcher(self._tokenizer, grammar, log_level=0)
                if prototype.is_error():
                    raise EngineError(f"invalid {guide.kind}: {prototype.get_error()}",
                                      field=GUIDE_FIELD)
                self._compiled[guide] = prototype
                while len(self._compiled) > GUIDE_CACHE_SIZE:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(guide)
            return GuideState(prototype.deep_copy())


def _ll_tokenizer(tokens: list[bytes], eos_token_ids: Sequence[int],
                  special_token_ids: list[int], encode: Callable[[str], list[int]]) -> Any:
    from llguidance import LLTokenizer, TokenizerWrapper

    class _Tokens:
        bos_token_id = None

        def __init__(self) -> None:
            self.eos_token_id = min(eos_token_ids)
            self.tokens = tokens
            self.special_token_ids = special_token_ids

        def __call__(self, text: str) -> list[int]:
            return encode(text)

    return LLTokenizer(TokenizerWrapper(_Tokens()), eos_token=sorted(eos_token_ids))


def _token_bytes(piece: str, special: bool) -> bytes:
    """A token's bytes from its vocabulary entry: GPT-2 byte-level pieces ("Ġ" is a space)
    mapped back to bytes, SentencePiece's "▁" to a space, special tokens as spelled."""
    if special:
        return piece.encode()
    byte_of = _byte_level_decoder()
    if all(char in byte_of for char in piece):
        return bytes(byte_of[char] for char in piece)
    return piece.replace("\u2581", " ").encode()


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class GuideState:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any):
        self._matcher = matcher

    def allowed(self, vocab_size: int) -> np.ndarray:
        """A boolean mask over ``vocab_size`` token ids: those the grammar allows next."""
        words = np.full((vocab_size + 31) // 32, -1, dtype=np.int32)
        self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise EngineError(f"token {token} left the grammar: "
                              f"{self._matcher.get_error()}", field=GUIDE_FIELD)

    def is_complete(self) -> bool:
        """Nothing more may follow: the answer is a whole sentence of the grammar."""
        return self._matcher.is_stopped()
