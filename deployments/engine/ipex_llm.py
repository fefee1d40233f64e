"""IpexLLMRunner: an ipex-llm low-bit model executing the shared scheduler's plans.

The decode loop is our own, over the model's forward pass and its KV cache, rather than one
opaque ``generate()`` call: each sequence streams, stops and is aborted on its own, and
new sequences join the running batch between decode steps (scheduler.py decides who).
Rows are left-padded: a zero in the attention mask hides padded cache positions, and
position ids come from the mask's cumulative sum, which reproduces ipex-llm's
``generate()`` token for token (a test shows it).

Joining copies the batch's KV into a new cache (ipex-llm's ``DynamicNormalCache``, whose
tensors are views into preallocated buffers), so joins are batched: one per step at most.
A join or a row drop builds the new cache layer by layer and lets go of each old layer once
copied, so it holds about one batch's KV plus a layer, not two or three.

KV memory bounds admission (``RunnerLimits.max_kv_tokens``): engine option
``kv_cache_gb``, by default a share of the memory free when the engine loads.
Left-padded rows make a batch's KV rows x its widest row, so ``kv_positions`` bounds that.

Prompt cache (engine option ``prompt_cache``, on by default, as engine llama_cpp's): a row
leaving the batch leaves a copy of its KV (prompt and answer) in a ``PrefixStore``, which
holds a share of the KV budget (taken out of what admission may use, so the two
together stay within ``kv_cache_gb``). A new prompt that starts with a stored entry's tokens
starts from a cache holding that prefix and prefills only the rest: a chat's next turn
skips its history, requests sharing a system prompt skip that. An entry also
keeps the logits its prompt's prefill ended with, so the same prompt again takes its first
token from them and computes nothing: it repeats the uncached answer, where computing the
last prompt token alone on the stored KV rounds differently from the prefill (low-bit
kernels quantize activations per row) and flipped greedy answers of most short prompts.

Short-first decoding (engine option ``short_first``; scheduler.py), on by default
on the CPU, where a decode step's time grows with its rows: joining
rows go in front of the running ones, so requests that arrived while long ones ran lead the
batch, and a step that may leave long rows out decodes the leading run of rows holding every
short one, on views of the batch's cache (no copy). The rows left out get a masked, zeroed
position: a hole, as left padding is, so each such step widens them by one position; it is
taken only while the KV budget could still run every row to its end (``rows_decodable``).
Off by default on an XPU, where a decode step's cost hardly depends on its rows.

On an Intel GPU the model runs in fp16 (``.half()``, as ipex-llm's GPU guides load it), on
``xpu:0``, the one tile the replica sees. ipex-llm would store the KV cache in FP8 on Arc and
BMG GPUs once a batch has two rows (and on Core Ultra iGPUs); the joins and row drops here
copy ``DynamicNormalCache`` tensors, so that switch is held off (``keep_kv_cache_unquantized``)
on every device, and asking for it is refused. ``warm_up`` (engine option ``warmup``, on by
default on an XPU) runs the model once before the replica reports ready: a cold SYCL kernel
cache compiles kernels on first use, which the first request would otherwise wait for.

Attention reads the KV cache as it is, not a copy per query head (ipex_attention).
Loading merges the meta q/k/v projections without ``torch.cat``, which would import
``torch._dynamo`` (ipex_meta_merge), which a replica's start need not pay.

torch, transformers and ipex_llm are imported inside methods: importing this module is
cheap, so the router and the tests that never load a model do not pay for the stack.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from deployments.constants import (
    HEAP_TRIM_AFTER_FREED_BYTES,
    IPEX_KV_CACHE_SHARE,
    IPEX_LINEAR_THRESHOLD_ROWS,
    IPEX_PROMPT_CACHE_SHARE,
    IPEX_WARMUP_PROMPT_TOKENS,
)
from deployments.contract import ErrorKind
from deployments.engine import ipex_attention, ipex_meta_merge
from deployments.engine.heap_trim import HeapTrimmer, HeapTrimStats
from deployments.engine.hf_text import HFTokenizerText
from deployments.engine.options import IpexLLMOptions
from deployments.engine.plan import PrefillWork, RunnerOutput, SequenceState, StepPlan
from deployments.engine.prefix_store import PrefixEntry, PrefixStore
from deployments.engine.protocol import EngineError
from deployments.engine.runner import ModelRunner, PromptCacheUsage, RunnerLimits, eos_ids

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_KV = list[tuple["torch.Tensor", "torch.Tensor"]]

# ipex-llm's low-bit matmul threshold (IPEX_LINEAR_THRESHOLD_ROWS says why ours); read once,
# when ipex_llm is imported; an operator's own value wins.
LINEAR_THRESHOLD_ENV = "BIGDL_LLM_LINEAR_THRESHOLD"
# ipex-llm's FP8 KV switches: the current name, and the deprecated one it reads first.
QUANTIZE_KV_ENV = "IPEX_LLM_QUANTIZE_KV_CACHE"
DEPRECATED_QUANTIZE_KV_ENV = "BIGDL_QUANTIZE_KV_CACHE"


class _Rows:
    """Batch tensors that travel together: per-layer KV and the attention mask."""

    def __init__(self, kv: _KV, mask: torch.Tensor):
        self.kv, self.mask = kv, mask


class IpexLLMRunner(ModelRunner):
    """A low-bit causal LM on one device ("cpu" or "xpu"), computing for many requests."""

    def __init__(self, model: Any, tokenizer: Any, *, device: str, max_batch_size: int,
                 max_prefill_tokens_per_step: int, options: IpexLLMOptions | None = None):
        from ipex_llm.transformers.kv import DynamicNormalCache

        options = options or IpexLLMOptions()
        kv_cache_gb = options.kv_cache_gb

        ipex_attention.install()  # attention without copying the KV per query head
        context = options.max_context_tokens or getattr(model.config, "max_position_embeddings",
                                                        2048)
        self._model = model
        self._tokenizer = tokenizer
        self.text = HFTokenizerText(tokenizer)
        self._device = device
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Positions the cache allocates past a row's width.
        self._spare = DynamicNormalCache.KV_ALLOC_BLOCK_LENGTH
        self.kv_bytes_per_position = self._kv_bytes_per_position()
        kind = "xpu" if device.startswith("xpu") else "cpu"
        self.warms_up = kind == "xpu" if options.warmup is None else options.warmup
        kv_bytes = (int(kv_cache_gb * 2**30) if kv_cache_gb is not None
                    else int(_free_memory_bytes(device) * IPEX_KV_CACHE_SHARE[kind]))
        kv_positions = max(kv_bytes // self.kv_bytes_per_position, 1)
        prompt_cache_positions = (int(kv_positions * IPEX_PROMPT_CACHE_SHARE)
                                  if options.prompt_cache else 0)
        self.limits = RunnerLimits(
            max_batch_size=max_batch_size, max_prefill_tokens_per_step=max_prefill_tokens_per_step,
            max_context_tokens=context, vocab_size=int(model.config.vocab_size),
            eos_token_ids=eos_ids(tokenizer.eos_token_id, model.generation_config.eos_token_id),
            max_kv_tokens=max(kv_positions - prompt_cache_positions, 1),
            short_first=kind == "cpu" if options.short_first is None else options.short_first,
            decodes_row_subsets=True,  # a leading run of rows, on views of the cache
            joins_in_front=True)  # so rows that came later, short ones among them, lead
        # Finished rows' KV for prompts that start alike (None: the prompt cache is off).
        # The KV tensors this runner frees (evicted prompt-cache entries, batches rebuilt as
        # rows leave) go back to the OS, or the heap keeps them and the RSS creeps up.
        self.heap = HeapTrimmer(HEAP_TRIM_AFTER_FREED_BYTES)
        self._prefixes: PrefixStore[_KV] | None = PrefixStore(
            prompt_cache_positions,
            on_drop=lambda positions: self.heap.freed(positions * self.kv_bytes_per_position),
        ) if prompt_cache_positions else None
        self._claims: dict[str, PrefixEntry[_KV]] = {}  # request id -> the entry it starts from
        # Request id -> the logits its prompt's prefill ended with, kept while it runs for its
        # prefix entry (only with the prompt cache on).
        self._prompt_logits: dict[str, torch.Tensor] = {}
        self._rows: list[str] = []  # request ids of the running batch, in row order
        self._running_rows: _Rows | None = None
        self._cache: Any = None  # the model's cache object for the running rows
        self._pending: list[_Rows] = []  # prefilled prompts' KV, to join in this order
        self._chunk: tuple[str, Any] | None = None  # (request id, cache) of a chunked prefill
        logger.info("KV cache budget: %.2f GB = %d positions of %d bytes (%s), of which the "
                    "prompt cache holds %d", kv_bytes / 2**30, kv_positions,
                    self.kv_bytes_per_position,
                    "engine option kv_cache_gb" if kv_cache_gb is not None else
                    f"{IPEX_KV_CACHE_SHARE[kind]:.0%} of the memory free at load",
                    prompt_cache_positions)

    @classmethod
    def load(cls, checkpoint_path: str, *, device: str, max_batch_size: int,
             max_prefill_tokens_per_step: int, options: IpexLLMOptions | None = None,
             hashes_verified: bool = False) -> IpexLLMRunner:
        """Verify the checkpoint, then load weights (no pickle code runs) and tokenizer."""
        os.environ.setdefault(LINEAR_THRESHOLD_ENV, IPEX_LINEAR_THRESHOLD_ROWS)
        keep_kv_cache_unquantized(os.environ)
        import torch
        from ipex_llm.transformers import AutoModelForCausalLM
        from transformers import AutoTokenizer

        from deployments.checkpoints import resolve_checkpoint, verify_checkpoint

        folder = resolve_checkpoint(checkpoint_path)
        verify_checkpoint(folder, checkpoint_format="ipex_llm", quick=hashes_verified)
        if device.startswith("xpu") and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise EngineError(f"device {device!r} asked for, but torch.xpu is not available",
                              kind=ErrorKind.MISCONFIGURED)
        ipex_meta_merge.install()  # spares the replica importing torch._dynamo
        with _weights_only_torch_load():
            model = AutoModelForCausalLM.load_low_bit(str(folder), trust_remote_code=False)
        model = to_device(model, device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(model, tokenizer, device=device, max_batch_size=max_batch_size,
                   max_prefill_tokens_per_step=max_prefill_tokens_per_step, options=options)

    def warm_up(self) -> None:
        """Run the model on dummy tokens before serving, if engine option ``warmup`` says so:
        a prefill and a decode step at batch 1 and at batch 2 (ipex-llm picks other kernels
        for one row than for several), so a cold device compiles its kernels now, not
        during the first requests. Request state and the prompt cache are not touched; runs
        on the engine thread, which must make the model's first forward pass."""
        if not self.warms_up:
            return
        import torch

        for rows in (1, 2):
            ids = torch.full((rows, IPEX_WARMUP_PROMPT_TOKENS), self._pad_id, dtype=torch.long)
            mask = torch.ones_like(ids)
            positions = torch.arange(IPEX_WARMUP_PROMPT_TOKENS, dtype=torch.long).expand(rows, -1)
            _, cache = self._forward(ids, mask, positions, None)
            mask = torch.ones((rows, IPEX_WARMUP_PROMPT_TOKENS + 1), dtype=torch.long)
            self._forward(ids[:, -1:], mask, positions[:, -1:] + 1, cache)
        logger.info("warmed up on %s", self._device)

    # ---- plans ---------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> RunnerOutput:
        import torch

        if plan.leaving:
            self._leave(plan.leaving)
        logits: list[torch.Tensor] = []
        if plan.prefill:
            logits += self._prefill(plan.prefill)
            self._join_pending([work.seq for work in plan.prefill if work.complete])
        if plan.decode:
            logits += list(self._decode(plan.decode))
        if not self._rows and not self._pending and self._chunk is None:
            self.heap.idle()
        if not logits:
            return RunnerOutput(logits=torch.empty((0, self.limits.vocab_size)).numpy())
        return RunnerOutput(logits=torch.stack(logits).numpy())

    def _prefill(self, works: Sequence[PrefillWork]) -> list[torch.Tensor]:
        """Prompts in plan order: each run of whole uncached ones as one left-padded batch,
        every other (a chunk, or the rest after a cached prefix) on its own; the logits
        after each complete prompt (their rows join in this order, so pending groups keep
        it)."""
        logits: list[torch.Tensor] = []
        batch: list[SequenceState] = []
        for work in works:
            if work.start == 0 and work.complete:
                batch.append(work.seq)
                continue
            if batch:
                logits += self._prefill_whole(batch)
                batch = []
            last = self._prefill_chunk(work)
            if last is not None:
                logits.append(last)
        return logits + (self._prefill_whole(batch) if batch else [])

    def _prefill_whole(self, sequences: Sequence[SequenceState]) -> list[torch.Tensor]:
        """Whole prompts as one left-padded batch. A prompt given more than once (the
        choices of an ``n`` > 1 request) is computed once and its row copied."""
        import torch

        rows: dict[tuple[int, ...], int] = {}  # prompt -> its row in the computed batch
        row_of = [rows.setdefault(seq.prompt, len(rows)) for seq in sequences]
        prompts = list(rows)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, None)
        kv = _cache_tensors(cache)
        if len(prompts) < len(sequences):
            index = torch.tensor(row_of, dtype=torch.long)
            logits, mask = logits.index_select(0, index), mask.index_select(0, index)
            kv = [(key.index_select(0, index), value.index_select(0, index))
                  for key, value in kv]
        for row, seq in enumerate(sequences):
            self._keep_prompt_logits(seq, logits[row])
        self._pending.append(_Rows(kv, mask))
        return list(logits)

    def _prefill_chunk(self, work: PrefillWork) -> torch.Tensor | None:
        """Prompt positions [start, end) on the cache of the earlier chunks (or of a claimed
        prefix); the logits after the prompt once it is complete, else None."""
        import torch

        seq, start, end = work.seq, work.start, work.end
        entry = self._claims.get(seq.request_id)
        if self._chunk is not None and self._chunk[0] == seq.request_id:
            cache = self._chunk[1]
        else:
            cache = self._take_claimed_prefix(seq)
        mask = torch.ones((1, end), dtype=torch.long)
        if start == end:  # the whole prompt was cached, with the logits its prefill ended with
            assert entry is not None and entry.prompt_logits is not None
            logits = entry.prompt_logits[1][None]
        else:
            ids = torch.tensor([seq.prompt[start:end]], dtype=torch.long)
            positions = torch.arange(start, end, dtype=torch.long)[None, :]
            logits, cache = self._forward(ids, mask, positions, cache)
        if not work.complete:
            self._chunk = (seq.request_id, cache)
            return None
        self._chunk = None
        self._keep_prompt_logits(seq, logits[0])
        self._pending.append(_Rows(_cache_tensors(cache), mask))
        return logits[0]

    def _keep_prompt_logits(self, seq: SequenceState, logits: torch.Tensor) -> None:
        if self._prefixes is not None:
            self._prompt_logits[seq.request_id] = logits.clone()

    def _join_pending(self, joined: Sequence[SequenceState]) -> None:
        """Put the pending prefilled rows (``joined``, in order) in front of the running
        ones, in one copy of the batch's KV."""
        import torch

        if not self._pending:
            return
        groups = list(self._pending)
        if self._running_rows is not None:
            groups.append(_Rows(_cache_tensors(self._cache), self._running_rows.mask))
        self._pending, self._cache = [], None  # the groups hold the old layers now
        self._rows = [*(seq.request_id for seq in joined), *self._rows]
        width = max(g.mask.shape[1] for g in groups)

        def joined_layers() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for layer in range(len(groups[0].kv)):
                parts = [g.kv[layer] for g in groups]
                for g in groups:
                    g.kv[layer] = None  # freed once copied into the new cache
                yield tuple(torch.cat([_left_pad(p[part], width, dim=2) for p in parts])
                            for part in (0, 1))

        self._set_running(joined_layers(),
                          torch.cat([_left_pad(g.mask, width, dim=1) for g in groups]))

    def _decode(self, sequences: Sequence[SequenceState]) -> torch.Tensor:
        """Decode the batch's first ``len(sequences)`` rows: all of them, or (short-first) a
        leading run, which runs on views of the batch's cache while every other row gets a
        hole: a zeroed position its mask hides."""
        import torch

        rows = self._running_rows
        count = len(sequences)
        assert rows is not None and [s.request_id for s in sequences] == self._rows[:count]
        batch, width = rows.mask.shape
        decoded = torch.zeros((batch, 1), dtype=torch.long)
        decoded[:count] = 1
        mask = torch.cat([rows.mask, decoded], 1)
        leading = mask[:count]
        cache = self._cache if count == batch else self._leading_rows_cache(count)
        last_tokens = torch.tensor([[seq.generated[-1]] for seq in sequences], dtype=torch.long)
        logits, cache = self._forward(last_tokens, leading, leading.sum(-1, keepdim=True) - 1,
                                      cache)
        if count == batch:
            self._cache = cache
        else:
            self._copy_new_position(cache, count, width)
        rows.mask = mask
        return logits

    def _leading_rows_cache(self, count: int) -> Any:
        """Give every row of the batch's cache a zeroed position, then a cache of views of
        its first ``count`` rows without it: their appends land in the batch's buffers
        (ipex-llm appends in place when there is room, and the new position made room)."""
        from ipex_llm.transformers.kv import DynamicNormalCache

        width = self._running_rows.mask.shape[1]
        for layer, (key, _) in enumerate(_cache_tensors(self._cache)):
            hole = key.new_zeros((key.shape[0], key.shape[1], 1, key.shape[3]))
            self._cache.update(hole, hole, layer)  # copied in: one tensor serves both
        leading = DynamicNormalCache()  # views: update() would copy into new buffers
        for key, value in _cache_tensors(self._cache):
            leading.key_cache.append(key[:count, :, :width])
            leading.value_cache.append(value[:count, :, :width])
        leading._seen_tokens = width
        return leading

    def _copy_new_position(self, leading: Any, count: int, width: int) -> None:
        """Copy the leading rows' new position into the batch's cache where their cache
        appended elsewhere (a new buffer), not in place."""
        for (key, value), (new_key, new_value) in zip(_cache_tensors(self._cache),
                                                      _cache_tensors(leading), strict=True):
            if new_key.data_ptr() != key.data_ptr():
                key[:count, :, width] = new_key[:, :, width]
                value[:count, :, width] = new_value[:, :, width]

    def rows_decodable(self, running: Sequence[SequenceState],
                       wanted: Sequence[SequenceState]) -> list[SequenceState]:
        """The leading run of rows holding ``wanted``; all rows when a hole for the others
        could take the batch past the KV budget (each term of ``kv_positions``' bound grows
        by at most the number of rows)."""
        budget = self.limits.max_kv_tokens
        if budget is not None and self.kv_positions(running, ()) + len(running) > budget:
            return list(running)
        return list(running[:running.index(wanted[-1]) + 1])  # wanted: in row order

    def _leave(self, leaving: Sequence[SequenceState]) -> None:
        """Drop the rows of ``leaving`` (keeping their KV in the prompt cache) and forget
        a chunked prefill or a claim any of them held."""
        rows = {}
        for seq in leaving:
            if seq.request_id in self._rows:
                rows[self._rows.index(seq.request_id)] = seq
            elif self._chunk is not None and self._chunk[0] == seq.request_id:
                self._chunk = None
            self._claims.pop(seq.request_id, None)
        if rows:
            self._drop_rows(dict(sorted(rows.items())))

    def _drop_rows(self, rows: dict[int, SequenceState]) -> None:
        """Remove these rows (row -> its sequence, ascending) from the running batch."""
        import torch

        current = self._running_rows
        assert current is not None
        old_layers = _cache_tensors(self._cache)
        self.heap.freed(current.mask.numel() * self.kv_bytes_per_position)  # rebuilt or gone
        for row, seq in rows.items():
            if self._prefixes is not None:
                self._keep_prefix(row, seq, old_layers)
            self._prompt_logits.pop(seq.request_id, None)
        keep = [i for i in range(current.mask.shape[0]) if i not in rows]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._running_rows, self._cache = None, None
            return
        index = torch.tensor(keep, dtype=torch.long)
        mask = current.mask.index_select(0, index)
        first_used = int((mask.sum(0) > 0).nonzero()[0])  # drop padding nobody needs now
        self._cache = None

        def kept_layers() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for layer in range(len(old_layers)):
                key, value = old_layers[layer]
                old_layers[layer] = None  # freed once copied into the new cache
                yield tuple(t.index_select(0, index)[:, :, first_used:] for t in (key, value))

        self._set_running(kept_layers(), mask[:, first_used:].contiguous())

    # ---- prompt cache --------------------------------------------------------------------

    def claim_cache(self, seq: SequenceState) -> int:
        """Start ``seq`` from the stored entry sharing the longest prefix with its prompt,
        leaving at least the prompt's last token to compute (its logits give the first
        token), unless the entry kept the logits that followed this very prompt. Entries are
        never changed, so a claim holds only a reference."""
        if self._prefixes is None:
            return 0
        entry, shared = self._prefixes.longest_prefix(seq.prompt)
        whole = len(seq.prompt)
        reused = min(shared, whole - 1)
        if entry is not None and shared == whole and entry.prompt_logits is not None \
                and entry.prompt_logits[0] == whole:
            reused = whole
        if entry is None or reused == 0:
            return 0
        self._claims[seq.request_id] = entry
        return reused

    def unclaim_cache(self, seq: SequenceState) -> None:
        self._claims.pop(seq.request_id, None)

    def _take_claimed_prefix(self, seq: SequenceState) -> Any:
        """A new cache holding the first ``seq.num_cached`` positions of its claimed entry
        (copied: the entry stays as it is for others), or None when nothing was claimed."""
        from ipex_llm.transformers.kv import DynamicNormalCache

        entry = self._claims.pop(seq.request_id, None)
        if entry is None:
            return None
        cache = DynamicNormalCache()
        for layer, (key, value) in enumerate(entry.kv):
            cache.update(key[:, :, :seq.num_cached], value[:, :, :seq.num_cached], layer)
        return cache

    def _keep_prefix(self, row: int, seq: SequenceState, layers: _KV) -> None:
        """Copy a leaving row's KV (``layers``: the running batch's) into the prefix store.
        It covers the prompt and every answer token but the last sampled one (never fed to
        the model)."""
        assert self._prefixes is not None and self._running_rows is not None
        tokens = [*seq.prompt, *seq.generated[:-1]]
        held = self._running_rows.mask[row].nonzero().squeeze(1)  # its positions, not holes
        if len(held) != len(tokens):  # cannot happen; keep nothing rather than a wrong prefix
            logger.warning("request %s: %d KV positions for %d tokens; not cached",
                           seq.request_id, len(held), len(tokens))
            return

        def copy_row() -> _KV:
            return [(key[row:row + 1].index_select(2, held),
                     value[row:row + 1].index_select(2, held)) for key, value in layers]

        logits = self._prompt_logits.get(seq.request_id)
        if logits is None:
            self._prefixes.put(tokens, copy_row)
            return
        logits_bytes = logits.numel() * logits.element_size()
        self._prefixes.put(tokens, copy_row, (len(seq.prompt), logits),
                           logits_positions=-(-logits_bytes // self.kv_bytes_per_position))

    # ---- KV memory -----------------------------------------------------------------------

    def heap_trim_stats(self) -> HeapTrimStats | None:
        return self.heap.stats

    def prompt_cache_usage(self) -> PromptCacheUsage | None:
        if self._prefixes is None:
            return None
        return PromptCacheUsage(entries=len(self._prefixes), positions=self._prefixes.positions,
                                capacity_positions=self._prefixes.capacity,
                                bytes_per_position=self.kv_bytes_per_position)

    def kv_positions(self, running: Sequence[SequenceState],
                     joining: Sequence[SequenceState]) -> int:
        """Rows share one width, which grows a position per decode step and shrinks only when
        the rows that needed the leading positions leave, plus the cache's spare positions.
        With k rows left, the width is at most the width after the join plus the k-th
        longest remaining run, so the batch never holds more than the largest
        k x (that width + remaining + spare). ``running`` is the batch as it is."""
        context = self.limits.max_context_tokens
        width = self._running_rows.mask.shape[1] \
            if running and self._running_rows is not None else 0
        width = max([width, *(len(seq.prompt) for seq in joining)])
        remaining = sorted((seq.final_length(context) - seq.total_tokens
                            for seq in (*running, *joining)), reverse=True)
        return max((k * (width + left + self._spare) for k, left in enumerate(remaining, 1)),
                   default=0)

    def _kv_bytes_per_position(self) -> int:
        """Bytes one position of one row takes in the KV cache, every layer: keys and values
        of each KV head, in the dtype of the hidden states (the embeddings'; fp32 on CPU).
        From the config, not measured on a forward pass: the first forward pass must run on
        the engine thread (one in the replica's constructor left the OpenMP pool of the
        wrong thread warm and cut decode throughput)."""
        config = self._model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        dtype = self._model.get_input_embeddings().weight.dtype
        return config.num_hidden_layers * 2 * heads * head_dim * dtype.itemsize

    # ---- tensors -------------------------------------------------------------------------

    def _set_running(self, layers: Iterator[tuple[torch.Tensor, torch.Tensor]],
                     mask: torch.Tensor) -> None:
        """Make the running batch's cache from ``layers`` (each copied into the cache's own
        buffers as it comes, so a generator can free what it has handed over)."""
        from ipex_llm.transformers.kv import DynamicNormalCache

        cache = DynamicNormalCache()
        for index, (key, value) in enumerate(layers):
            cache.update(key, value, index)
        self._cache = cache
        self._running_rows = _Rows([], mask)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any) -> tuple[torch.Tensor, Any]:
        import torch

        with torch.inference_mode():
            out = self._model(input_ids=ids.to(self._device),
                              attention_mask=mask.to(self._device),
                              position_ids=positions.to(self._device),
                              past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :].float().cpu(), out.past_key_values


def keep_kv_cache_unquantized(env: MutableMapping[str, str]) -> None:
    """Hold off ipex-llm's FP8 KV cache: ``IPEX_LLM_QUANTIZE_KV_CACHE=0``, which its
    ``use_quantize_kv_cache`` reads before it looks at the device (it would turn FP8 on for
    Arc and BMG GPUs at batch > 1, and for Core Ultra iGPUs). Continuous batching here joins
    and drops rows by copying ``DynamicNormalCache`` tensors; an FP8 cache keeps other
    tensors, which those copies would scramble. Raises EngineError when the environment
    asks for FP8 (either name set to 1)."""
    for name in (QUANTIZE_KV_ENV, DEPRECATED_QUANTIZE_KV_ENV):
        if env.get(name) == "1":
            raise EngineError(f"{name}=1 asks for ipex-llm's FP8 KV cache, which engine "
                              "ipex_llm does not support (its continuous batching copies KV "
                              "rows between caches): unset it", kind=ErrorKind.MISCONFIGURED)
    env.pop(DEPRECATED_QUANTIZE_KV_ENV, None)
    env[QUANTIZE_KV_ENV] = "0"


def to_device(model: Any, device: str) -> Any:
    """The loaded model on ``device``: in fp16 on an Intel GPU (ipex-llm's GPU guides load
    models so; its XPU kernels take fp16 activations), as it is on the CPU."""
    if device.startswith("xpu"):
        model = model.half()
    return model.to(device)


def _free_memory_bytes(device: str) -> int:
    """Memory free now: the device's own for xpu (torch.xpu's free bytes, else total minus
    what torch holds), the host's available memory for cpu."""
    import torch

    if device.startswith("xpu"):
        try:
            return torch.xpu.mem_get_info(device)[0]
        except (AttributeError, RuntimeError):
            return (torch.xpu.get_device_properties(device).total_memory
                    - torch.xpu.memory_reserved(device))
    import psutil

    return psutil.virtual_memory().available


def _cache_tensors(cache: Any) -> _KV:
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _left_pad(tensor: torch.Tensor, width: int, *, dim: int) -> torch.Tensor:
    import torch

    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor.contiguous()
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Make every torch.load during model loading refuse pickled code (weights only)."""
    import torch

    original = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original
