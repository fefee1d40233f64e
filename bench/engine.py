"""Engine micro-benchmark: one engine alone through the LLMEngine protocol, no serving.

    python -m bench.engine --engine ipex_llm|llama_cpp --checkpoint DIR --batch 1,4,8,16 \\
        [--generate 1,8] [--max-tokens 128] [--out engine.json]

``load_engine(...)`` (the runner under the shared scheduler), then for each batch size,
after a warm-up batch of that size: the batch's requests added at once (``add_request``:
greedy, ``ignore_eos``, ``max_tokens``), ``step()`` until none is unfinished; tokens/s
over those steps. ``--generate`` (engine ipex_llm only) adds ipex-llm's batched
``model.generate`` on the same loaded model (left padding, ``min_new_tokens =
max_new_tokens``, tokenize and decode included): the in-process ceiling a service is
compared with. At batch 1 it is one request at a time, as LangChain's ``IpexLLM._call``
runs it. A measurement disturbed by other load is made once more (bench.machine).
Output: ``EngineRun`` as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from bench.loadgen import PROMPT
from bench.machine import emit_result, machine_info, measure_quietly


class BatchRow(BaseModel):
    batch: int
    tokens_per_s: float = Field(description="batch x max_tokens over the steps' wall time")
    step_ms: float | None = Field(None, description="mean wall time of a step")
    foreign_cores: float = Field(description="CPU cores other processes used meanwhile")
    attempts: int


class EngineRun(BaseModel):
    engine: str
    checkpoint: str
    date: str
    commit: str
    load_s: float = Field(description="load_engine, imports included")
    prompt_tokens: int
    max_tokens: int
    batches: list[BatchRow] = Field(description="the engine's step() loop")
    generate: list[BatchRow] = Field([], description="ipex-llm's batched model.generate")


def load(engine: str, checkpoint: str, max_batch_size: int) -> Any:
    """The engine as a replica loads it: its runner under the shared scheduler."""
    from deployments.config import RUNNER_CLASSES
    from deployments.constants import MAX_PREFILL_TOKENS_PER_STEP
    from deployments.engine.batching import load_engine

    return load_engine(RUNNER_CLASSES[engine], checkpoint, device="cpu",
                       max_batch_size=max_batch_size,
                       max_prefill_tokens_per_step=MAX_PREFILL_TOKENS_PER_STEP)


def steps(engine: Any, prompt_ids: list[int], batch: int, max_tokens: int) -> BatchRow:
    from deployments.engine.protocol import GenerationRequest, SamplingParams

    def run_batch(tokens: int) -> tuple[float, int]:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        tag = time.monotonic_ns()
        for i in range(batch):
            engine.add_request(GenerationRequest(f"{tag}-{i}", tuple(prompt_ids), params))
        started, count = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            count += 1
        return time.perf_counter() - started, count

    run_batch(4)  # warm this batch size

    def measure() -> dict[str, Any]:
        seconds, count = run_batch(max_tokens)
        return {"batch": batch, "tokens_per_s": batch * max_tokens / seconds,
                "step_ms": 1000 * seconds / count}

    return BatchRow(**measure_quietly(measure))


def generate(engine: Any, prompt: str, batch: int, max_tokens: int) -> BatchRow:
    """ipex-llm's model.generate on the engine's loaded model and tokenizer."""
    import torch

    model, tokenizer = engine.runner._model, engine.runner._tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def call(tokens: int) -> int:
        encoded = tokenizer([prompt] * batch, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**encoded, max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[:, encoded.input_ids.shape[1]:]
        tokenizer.batch_decode(new, skip_special_tokens=True)
        return new.numel()

    call(8)  # warm this batch shape

    def measure() -> dict[str, Any]:
        started = time.perf_counter()
        tokens = call(max_tokens)
        return {"batch": batch, "tokens_per_s": tokens / (time.perf_counter() - started)}

    return BatchRow(**measure_quietly(measure))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("ipex_llm", "llama_cpp"), default="ipex_llm")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--batch", default="1,8,16", help="comma-separated batch sizes")
    parser.add_argument("--generate", default="", help="batch sizes of model.generate")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",") if b]
    generated = [int(b) for b in args.generate.split(",") if b]
    if generated and args.engine != "ipex_llm":
        parser.error("--generate is ipex-llm's model.generate: engine ipex_llm only")
    started = time.perf_counter()
    engine = load(args.engine, args.checkpoint, max(batches, default=1))
    load_s = time.perf_counter() - started
    prompt_ids = engine.encode(PROMPT)
    info = machine_info()
    result = EngineRun(
        engine=args.engine, checkpoint=args.checkpoint, date=info["date"],
        commit=info["git_commit"], load_s=load_s, prompt_tokens=len(prompt_ids),
        max_tokens=args.max_tokens,
        batches=[steps(engine, prompt_ids, b, args.max_tokens) for b in batches],
        generate=[generate(engine, PROMPT, b, args.max_tokens) for b in generated])
    for kind, rows in (("step()", result.batches), ("generate", result.generate)):
        for row in rows:
            print(f"[engine] {kind} batch {row.batch}: {row.tokens_per_s:.1f} tok/s",
                  file=sys.stderr)
    emit_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
