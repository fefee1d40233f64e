"""What every benchmark section runs: one prompt, fixed output lengths, client counts.

The full workload is the default of ``python -m bench.run``; ``--quick`` is a smoke check
with fewer levels and shorter outputs. Both are sized so the run stays bounded on 2 cores.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

# About 30 tokens with SmolLM2's tokenizer (the exact count is measured and reported). Every
# section sends the same text, so prompt and output lengths are fixed: answers run to
# max_tokens (min_new_tokens in-process, ignore_eos over the API).
PROMPT = ("You are a helpful assistant. Write a long, detailed story about a small robot who "
          "lives in a lighthouse and learns to paint the sea at night.")
MODEL_NAME = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Workload:
    name: str
    max_tokens: int
    ceiling_batch_sizes: tuple[int, ...]
    ceiling_repeats: int
    sequential_requests: int
    engine_batch_sizes: tuple[int, ...]
    http_clients: tuple[int, ...]
    handle_clients: tuple[int, ...]
    llama_clients: tuple[int, ...]
    # Each client count runs ceil(min_requests / clients) closed-loop rounds (at least one).
    min_requests: int
    mixed_long_clients: int
    mixed_short_clients: int
    mixed_long_tokens: int
    mixed_short_tokens: int
    mixed_short_requests_per_client: int
    profile_batch_size: int
    pyspy_seconds: int
    prompt: str = PROMPT
    model_name: str = MODEL_NAME
    llama_parallel_slots: int = 8
    llama_threads: int = 2
    # Batch sizes of engine llama_cpp alone (LlamaCppEngine.step in a loop, no serving).
    llama_cpp_engine_batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    # Client counts measured again with per-token chunks (engine llama_cpp's service only).
    pacing_clients: tuple[int, ...] = (1, 8)
    # Engine llama_cpp's service vs llama-server, measured in alternating turns (section
    # head_to_head): this machine's speed drifts by 10-20% over minutes, more than the gap.
    head_to_head_clients: tuple[int, ...] = (8, 16)
    head_to_head_turns: int = 3
    # Replica start-up (serve.run to ready) and the bare path it is judged against are each
    # timed this many times, and the target judged on their medians: one start on a shared
    # machine can be an outlier (a 6.6 s start among 5.1-6.2 s ones).
    ready_starts: int = 3
    # Engine ipex_llm's service at 8 clients vs the in-process ceiling at batch 8 and one
    # request at a time, measured again in alternating turns (section ipex_turns).
    ipex_turns: int = 3

    def rounds(self, clients: int) -> int:
        return max(1, math.ceil(self.min_requests / clients))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        data = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


FULL = Workload(
    name="full", max_tokens=128,
    ceiling_batch_sizes=(1, 4, 8, 16), ceiling_repeats=2, sequential_requests=4,
    engine_batch_sizes=(1, 8, 16),
    http_clients=(1, 4, 8, 16, 32), handle_clients=(1, 4, 8, 16, 32),
    llama_clients=(1, 4, 8, 16, 32), min_requests=12,
    mixed_long_clients=4, mixed_short_clients=4, mixed_long_tokens=256,
    mixed_short_tokens=16, mixed_short_requests_per_client=8,
    profile_batch_size=8, pyspy_seconds=20, llama_cpp_engine_batch_sizes=(1, 4, 8, 16))

QUICK = Workload(
    name="quick", max_tokens=32,
    ceiling_batch_sizes=(1, 8), ceiling_repeats=1, sequential_requests=2,
    engine_batch_sizes=(8,),
    http_clients=(1, 8), handle_clients=(8,), llama_clients=(1, 8), min_requests=4,
    mixed_long_clients=2, mixed_short_clients=2, mixed_long_tokens=64,
    mixed_short_tokens=16, mixed_short_requests_per_client=3,
    profile_batch_size=8, pyspy_seconds=0, llama_cpp_engine_batch_sizes=(1, 8),
    pacing_clients=(8,), head_to_head_clients=(8,), head_to_head_turns=2, ready_starts=1,
    ipex_turns=2)

WORKLOADS = {w.name: w for w in (FULL, QUICK)}
