"""LlamaCppRunner: a GGUF model run by llama.cpp, under our continuous-batching scheduler.

The second backend behind the engine protocol, for CPUs: on the demo model llama.cpp's CPU
kernels (compiled for the host, one C++ graph per step) decode several times faster than
ipex-llm's CPU path (bench/RESULTS.md). ipex-llm stays the default and the Intel GPU path.

Only the tensor work is llama.cpp's (through llama-cpp-python's ctypes bindings of
``llama.h``): scheduling, admission, chunked prefill, stop strings, sampling and streaming
are the shared scheduler's and sampler's, so both engines behave the same to callers. Each
running request owns one llama.cpp sequence id (a slot): its KV cells live in the slot's
own stream (``kv_unified`` off, measured faster for batched decoding than one shared
buffer), so a request joins or leaves the batch without copying anyone's cache. A decode
plan is one ``llama_decode`` over one token per decoded sequence; a prefill plan one over
every prompt token it computes.

Prompt cache (engine option ``prompt_cache``, on by default, as llama-server's
``cache_prompt``): a finished request's slot keeps its KV cells, and a new request takes the
free slot whose cached tokens share the longest prefix with its prompt (else the slot freed
longest ago, so every cached prompt is kept as long as the slots allow), then prefills only
the rest. A chat's next turn (its history is the previous prompt plus the answer) or
requests with one system prompt skip most of their prefill, which on a CPU costs about as
much per token as a decode step of a whole batch. Logits of reused positions were computed
in another batch, so an answer may differ in the last bits from an uncached run's.

Text goes through the checkpoint's Hugging Face tokenizer, as with IpexLLMRunner, so chat
templates and detokenizing are the same for both engines; ``load`` checks that it agrees
with the GGUF vocabulary.

llama_cpp is imported inside methods: importing this module is cheap and does not need the
optional ``llama-cpp`` extra.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from deployments.constants import GGUF_MODEL_FILE
from deployments.contract import ErrorKind
from deployments.engine.hf_text import HFTokenizerText
from deployments.engine.options import LlamaCppOptions
from deployments.engine.plan import PrefillWork, RunnerOutput, SequenceState, StepPlan
from deployments.engine.prefix_store import shared_prefix
from deployments.engine.protocol import EngineError
from deployments.engine.runner import ModelRunner, RunnerLimits, eos_ids

if TYPE_CHECKING:
    from pathlib import Path

logger = logging.getLogger(__name__)

# Text whose tokens the HF tokenizer and llama.cpp's must agree on before serving.
_TOKENIZER_PROBE = ("<|im_start|>user\nHello, world! The capital of France is Paris.\n  1234 "
                    "naïve café 🙂<|im_end|>\n")
_INSTALL_HINT = ("engine llama_cpp needs llama-cpp-python: pip install -e '.[llama-cpp]' "
                 "(builds llama.cpp for this CPU, about 4 minutes on 2 cores)")


class LlamaCppRunner(ModelRunner):
    """A GGUF causal LM on the CPU, computing for up to ``max_batch_size`` requests at once."""

    def __init__(self, model_path: Path, tokenizer: Any, *, max_batch_size: int,
                 max_prefill_tokens_per_step: int, options: LlamaCppOptions | None = None):
        options = options or LlamaCppOptions()
        threads, prompt_cache, short_first = \
            options.threads, options.prompt_cache, options.short_first
        llama = _import_llama_cpp()
        llama.llama_backend_init()
        model_params = llama.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model = llama.llama_model_load_from_file(str(model_path).encode(), model_params)
        if not model:
            raise EngineError(f"llama.cpp could not load {model_path}",
                              kind=ErrorKind.MISCONFIGURED)
        vocab = llama.llama_model_get_vocab(model)
        context = min(options.context_tokens, llama.llama_model_n_ctx_train(model))
        threads = threads or len(os.sched_getaffinity(0))
        batch_tokens = max(max_prefill_tokens_per_step, max_batch_size)
        params = llama.llama_context_default_params()
        params.n_ctx = context * max_batch_size
        params.n_seq_max = max_batch_size
        params.kv_unified = False  # one KV stream of `context` cells per slot
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        ctx = llama.llama_init_from_model(model, params)
        if not ctx:
            llama.llama_model_free(model)
            raise EngineError(f"llama.cpp could not make a context of {params.n_ctx} tokens "
                              f"for {model_path}", kind=ErrorKind.MISCONFIGURED)
        batch = llama.llama_batch_init(batch_tokens, 0, 1)
        weakref.finalize(self, _free, llama, model, ctx, batch)

        self._llama, self._model, self._ctx, self._batch = llama, model, ctx, batch
        self._memory = llama.llama_get_memory(ctx)
        self._n_vocab = int(llama.llama_vocab_n_tokens(vocab))
        self._tokenizer = tokenizer
        self.text = HFTokenizerText(tokenizer)
        _check_tokenizer(llama, vocab, tokenizer, self._n_vocab)
        eog = [t for t in range(self._n_vocab) if llama.llama_vocab_is_eog(vocab, t)]
        self.limits = RunnerLimits(
            max_batch_size=max_batch_size, max_prefill_tokens_per_step=max_prefill_tokens_per_step,
            max_context_tokens=context, vocab_size=self._n_vocab,
            eos_token_ids=eos_ids(eog, tokenizer.eos_token_id), short_first=short_first,
            decodes_row_subsets=True)  # a batch lists (token, position, slot): any will do
        self._free_slots = set(range(max_batch_size))
        self._slots: dict[str, int] = {}  # request id -> llama.cpp sequence id
        # The tokens whose KV cells each slot holds, in position order (what a new prompt
        # may reuse); kept only with the prompt cache on.
        self._slot_tokens: list[list[int]] = [[] for _ in range(max_batch_size)]
        self._slot_freed_at = [0] * max_batch_size  # releases so far, when each was freed
        self._releases = 0
        self._prompt_cache = prompt_cache
        logger.info("llama.cpp engine: %s, %d slots x %d tokens, %d threads, prompt cache %s, "
                    "short-first %s", model_path, max_batch_size, context, threads,
                    "on" if prompt_cache else "off", "on" if short_first else "off")

    @classmethod
    def load(cls, checkpoint_path: str, *, device: str, max_batch_size: int,
             max_prefill_tokens_per_step: int, options: LlamaCppOptions | None = None,
             hashes_verified: bool = False) -> LlamaCppRunner:
        """Verify a ``gguf`` checkpoint, then load its GGUF file (memory-mapped: replicas on
        one node share the page cache) and tokenizer."""
        if device not in ("cpu", "auto"):
            raise EngineError(f"engine llama_cpp runs on the CPU; device {device!r} needs "
                              "engine ipex_llm", kind=ErrorKind.MISCONFIGURED)
        _import_llama_cpp()  # a missing extra fails before the checkpoint is hashed
        from transformers import AutoTokenizer

        from deployments.checkpoints import resolve_checkpoint, verify_checkpoint

        folder = resolve_checkpoint(checkpoint_path)
        verify_checkpoint(folder, checkpoint_format="gguf", quick=hashes_verified)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(folder / GGUF_MODEL_FILE, tokenizer, max_batch_size=max_batch_size,
                   max_prefill_tokens_per_step=max_prefill_tokens_per_step, options=options)

    # ---- plans -------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> RunnerOutput:
        for seq in plan.leaving:
            if seq.request_id in self._slots:
                self._release(seq.request_id)
        parts = []
        if plan.prefill:
            parts.append(self._prefill(plan.prefill))
        if plan.decode:
            parts.append(self._decode(plan.decode))
        if not parts:
            return RunnerOutput(logits=np.empty((0, self._n_vocab), dtype=np.float32))
        return RunnerOutput(logits=parts[0] if len(parts) == 1 else np.concatenate(parts))

    def _prefill(self, works: Sequence[PrefillWork]) -> np.ndarray:
        """One llama_decode over every prompt position the works compute; the logits after
        each complete prompt."""
        items = []
        for work in works:
            prompt, slot = work.seq.prompt, self._slots[work.seq.request_id]
            items += [(prompt[pos], pos, slot, work.complete and pos == work.end - 1)
                      for pos in range(work.start, work.end)]
            self._slot_tokens[slot] = list(prompt[:work.end])
        return self._run(items)

    def _decode(self, sequences: Sequence[SequenceState]) -> np.ndarray:
        items = [(seq.generated[-1], seq.total_tokens - 1, self._slots[seq.request_id], True)
                 for seq in sequences]
        logits = self._run(items)
        for token, _, slot, _ in items:
            self._slot_tokens[slot].append(token)
        return logits

    # ---- prompt cache --------------------------------------------------------------------

    def claim_cache(self, seq: SequenceState) -> int:
        """Give ``seq`` a free slot: the one whose cached tokens share the longest prefix with
        its prompt, else (or on a tie) the one freed longest ago, the lowest first; the
        positions reused. At least the prompt's last token is left to compute: its logits
        give the first token. The slot's cells past the shared prefix go now, so giving the
        slot back leaves a shorter, still valid cache."""
        if not self._prompt_cache:
            slot, reused = min(self._free_slots), 0
        else:
            shared = {s: shared_prefix(self._slot_tokens[s], seq.prompt)
                      for s in self._free_slots}
            slot = max(shared, key=lambda s: (shared[s], -self._slot_freed_at[s], -s))
            reused = min(shared[slot], len(seq.prompt) - 1)
        if reused and not self._llama.llama_memory_seq_rm(self._memory, slot, reused, -1):
            reused = 0  # this model's memory cannot drop a tail: start the slot afresh
        if not reused:
            self._llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
        del self._slot_tokens[slot][reused:]
        self._free_slots.remove(slot)
        self._slots[seq.request_id] = slot
        return reused

    def unclaim_cache(self, seq: SequenceState) -> None:
        self._free_slots.add(self._slots.pop(seq.request_id))  # its place in the LRU order kept

    def _release(self, request_id: str) -> None:
        """Free the request's slot; its KV stays for the next prompt unless the cache is off."""
        slot = self._slots.pop(request_id)
        if not self._prompt_cache:
            self._llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
            self._slot_tokens[slot].clear()
        self._releases += 1
        self._slot_freed_at[slot] = self._releases
        self._free_slots.add(slot)

    # ---- llama.cpp -----------------------------------------------------------------------

    def _run(self, items: Sequence[tuple[int, int, int, bool]]) -> np.ndarray:
        """One llama_decode of (token, position, slot, wants logits) items; the logits of
        the items that want them, one row each, in item order.

        Items go to llama.cpp sorted by slot: with one KV stream per slot, llama.cpp splits a
        batch whose sequence ids are out of order into several passes (measured: about twice
        the time for a batch in descending slot order).
        """
        order = sorted(range(len(items)), key=lambda i: items[i][2])  # stable: positions stay
        batch = self._batch
        batch.n_tokens = len(items)
        for row, i in enumerate(order):
            token, position, slot, wants_logits = items[i]
            batch.token[row] = token
            batch.pos[row] = position
            batch.n_seq_id[row] = 1
            batch.seq_id[row][0] = slot
            batch.logits[row] = wants_logits
        status = self._llama.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status} on a batch of "
                              f"{len(items)} tokens", kind=ErrorKind.MISCONFIGURED)
        wanted_in_batch_order = [i for i in order if items[i][3]]
        pointer = self._llama.llama_get_logits(self._ctx)
        logits = np.ctypeslib.as_array(pointer, shape=(len(wanted_in_batch_order),
                                                       self._n_vocab))
        rank = {item: row for row, item in enumerate(wanted_in_batch_order)}
        rows = [rank[i] for i in range(len(items)) if items[i][3]]
        return logits if rows == sorted(rows) else logits[rows]


def _check_tokenizer(llama: Any, vocab: Any, tokenizer: Any, n_vocab: int) -> None:
    """Refuse a checkpoint whose tokenizer files disagree with the GGUF's vocabulary: every
    id the tokenizer gives for a probe text (special tokens included) must spell the same
    bytes in llama.cpp's vocabulary. (Segmentation may differ, e.g. of whitespace runs: the
    model reads the tokenizer's ids, so only their meaning has to agree.)"""
    if len(tokenizer) > n_vocab:
        raise EngineError(f"the tokenizer has {len(tokenizer)} tokens, the GGUF model "
                          f"{n_vocab}", kind=ErrorKind.MISCONFIGURED)
    ids = tokenizer.encode(_TOKENIZER_PROBE, add_special_tokens=False)
    buffer = ctypes.create_string_buffer(256)

    def piece(token: int) -> bytes:
        length = llama.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
        return buffer.raw[:length]

    spelled = b"".join(piece(token) for token in ids)
    if spelled != _TOKENIZER_PROBE.encode():
        raise EngineError("the checkpoint's tokenizer and its GGUF vocabulary disagree: "
                          f"{_TOKENIZER_PROBE!r} reads back as {spelled!r}",
                          kind=ErrorKind.MISCONFIGURED)


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
        from llama_cpp import _logger
    except ImportError:
        raise EngineError(_INSTALL_HINT, kind=ErrorKind.MISCONFIGURED) from None
    if _logger.logger.level == logging.NOTSET:  # llama.cpp's load chatter: errors only
        _logger.set_verbose(False)
    return llama_cpp


def _free(llama: Any, model: Any, ctx: Any, batch: Any) -> None:
    llama.llama_batch_free(batch)
    llama.llama_free(ctx)
    llama.llama_model_free(model)

