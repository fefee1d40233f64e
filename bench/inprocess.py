"""In-process baselines on the demo model, in a process of their own (no Ray, no HTTP).

1. The ceiling: ipex-llm's batched ``model.generate`` (left padding, greedy,
   ``min_new_tokens = max_new_tokens`` so every row runs to the same length).
2. The seed's way: one request at a time, as LangChain's ``IpexLLM._call`` does it
   (tokenizer, ``model.generate``, decode), sequentially.
3. Our engine alone: ``IpexLLMEngine.step`` driven in a loop, no serving around it, with
   the time inside the model's forward pass split out (what the engine's own Python costs).
4. A profile of one decode step at batch 8: aten op count, time in ipex-llm's low-bit
   matmuls (``LowBitLinear``), the rest of the forward pass, sampling, detokenizing.
5. The engine's decode attention against ipex-llm's own (``deployments/engine/
   ipex_attention.py``), the two taking turns step by step in one batch.

With ``--engine llama_cpp`` (a ``gguf`` checkpoint), only 3. runs, on ``LlamaCppEngine``:
engine llama_cpp's in-process ceiling, with its ``llama_decode`` calls (``_run``) as the
model's forward pass.

    python -m bench.inprocess --workload full --checkpoint DIR --output out.json
    python -m bench.inprocess --engine llama_cpp --checkpoint GGUF_DIR --output out.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.machine import measure_quietly
from bench.workload import WORKLOADS, Workload

REPO_ROOT = Path(__file__).resolve().parents[1]


ENGINES = ("ipex_llm", "llama_cpp")
# The batch (and client count) at which the ipex_llm targets compare service and ceiling.
TURN_BATCH_SIZE = 8


def load_engine(checkpoint: str, max_batch_size: int, engine: str = "ipex_llm") -> Any:
    from deployments.constants import MAX_PREFILL_TOKENS_PER_STEP

    if engine == "llama_cpp":
        from deployments.engine.llama_cpp import LlamaCppEngine as Engine
    else:
        from deployments.engine.ipex_llm import IpexLLMEngine as Engine
    return Engine.load(checkpoint, device="cpu", max_batch_size=max_batch_size,
                       max_prefill_tokens_per_step=MAX_PREFILL_TOKENS_PER_STEP)


def engine_hooks(engine: Any, engine_name: str) -> list[tuple[Any, str, str]]:
    """(owner, attribute, label) of the calls engine_direct times: the model's forward pass,
    sampling, detokenizing, and for ipex_llm its low-bit matmuls (inside the forward)."""
    if engine_name == "llama_cpp":
        return [(engine, "_run", "model_forward"), (engine, "_sample", "sample"),
                (engine, "_decode_text", "detokenize")]
    from ipex_llm.transformers.low_bit_linear import LowBitLinear

    return [(engine, "_forward", "model_forward"), (engine, "_sample", "sample"),
            (engine, "_decode_text", "detokenize"),
            (LowBitLinear, "forward", "lowbit_linear")]


def _generate(model: Any, tokenizer: Any, prompts: list[str], max_tokens: int) -> Any:
    import torch

    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model.generate(**encoded, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id)


def ceiling(model: Any, tokenizer: Any, work: Workload) -> list[dict[str, Any]]:
    """Batched generate at each batch size: tokens/s over the whole call (prefill included)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompt_tokens = tokenizer(work.prompt, return_tensors="pt").input_ids.shape[1]
    rows = []
    for batch_size in work.ceiling_batch_sizes:
        prompts = [work.prompt] * batch_size
        _generate(model, tokenizer, prompts, 8)  # warm this batch shape

        def one_run(prompts: list[str] = prompts) -> dict[str, Any]:
            started = time.perf_counter()
            out = _generate(model, tokenizer, prompts, work.max_tokens)
            seconds = time.perf_counter() - started
            new_tokens = (out.shape[1] - prompt_tokens) * len(prompts)
            return {"tokens_per_s": new_tokens / seconds}

        runs = [measure_quietly(one_run) for _ in range(work.ceiling_repeats)]
        speeds = [run["tokens_per_s"] for run in runs]
        rows.append({"batch_size": batch_size, "tokens_per_s": statistics.median(speeds),
                     "runs_tokens_per_s": speeds,
                     "foreign_cores": max(run["foreign_cores"] for run in runs),
                     "attempts": sum(run["attempts"] for run in runs)})
        _log(f"ceiling bs={batch_size}: {statistics.median(speeds):.1f} tok/s {speeds}")
    return rows


def sequential(model: Any, tokenizer: Any, work: Workload) -> dict[str, Any]:
    """LangChain IpexLLM._call per request, one after another."""
    import torch

    def call(prompt: str) -> str:
        input_ids = tokenizer.encode(prompt, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(input_ids, streamer=None, max_new_tokens=work.max_tokens,
                                    min_new_tokens=work.max_tokens, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(output[0], skip_special_tokens=True)

    call(work.prompt)  # warm

    def measure() -> dict[str, Any]:
        latencies = []
        started = time.perf_counter()
        for _ in range(work.sequential_requests):
            t0 = time.perf_counter()
            call(work.prompt)
            latencies.append(time.perf_counter() - t0)
        seconds = time.perf_counter() - started
        return {"requests": work.sequential_requests,
                "tokens_per_s": work.sequential_requests * work.max_tokens / seconds,
                "requests_per_s": work.sequential_requests / seconds,
                "e2e_p50_s": statistics.median(latencies)}

    result = measure_quietly(measure)
    _log(f"sequential: {result['tokens_per_s']:.1f} tok/s")
    return result


@contextlib.contextmanager
def _timed(owner: Any, name: str, totals: dict[str, float], label: str) -> Iterator[None]:
    """Add the wall time spent in ``owner.name`` to ``totals[label]`` (an instance
    attribute shadows a bound method; a class attribute is patched and restored)."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - t0

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        if isinstance(owner, type):
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def _add_requests(engine: Any, prompt_ids: list[int], count: int, max_tokens: int,
                  tag: str) -> None:
    from deployments.engine.protocol import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(count):
        engine.add_request(GenerationRequest(f"{tag}-{i}", tuple(prompt_ids), params))


def engine_direct(engine: Any, prompt_ids: list[int], work: Workload,
                  engine_name: str = "ipex_llm") -> list[dict[str, Any]]:
    """The engine's step() in a loop: tokens/s and where each step's time goes."""
    batch_sizes = work.llama_cpp_engine_batch_sizes if engine_name == "llama_cpp" \
        else work.engine_batch_sizes
    hooks = engine_hooks(engine, engine_name)
    rows = []
    for batch_size in batch_sizes:
        _add_requests(engine, prompt_ids, batch_size, 4, f"warm{batch_size}")
        while engine.has_unfinished_requests():
            engine.step()

        def measure(batch_size: int = batch_size) -> dict[str, Any]:
            totals: dict[str, float] = {}
            steps = 0
            with contextlib.ExitStack() as timers:
                for owner, name, label in hooks:
                    timers.enter_context(_timed(owner, name, totals, label))
                _add_requests(engine, prompt_ids, batch_size, work.max_tokens,
                              f"e{batch_size}-{time.monotonic_ns()}")
                started = time.perf_counter()
                while engine.has_unfinished_requests():
                    engine.step()
                    steps += 1
                seconds = time.perf_counter() - started
            return {"batch_size": batch_size, "steps": steps,
                    "tokens_per_s": batch_size * work.max_tokens / seconds,
                    "step_ms": 1000 * seconds / steps,
                    **{f"{k}_share": v / seconds for k, v in totals.items()}}

        rows.append(measure_quietly(measure))
        _log(f"engine bs={batch_size}: {rows[-1]}")
    return rows


def profile_decode_step(engine: Any, prompt_ids: list[int], batch_size: int,
                        steps: int = 3) -> dict[str, Any]:
    """torch.profiler over ``steps`` decode steps at ``batch_size``, per step."""
    import torch
    from ipex_llm.transformers.low_bit_linear import LowBitLinear
    from torch.profiler import ProfilerActivity, profile, record_function

    def labelled(owner: Any, name: str, label: str) -> Callable[[], None]:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with record_function(label):
                return original(*args, **kwargs)

        setattr(owner, name, wrapper)
        return lambda: setattr(owner, name, original) if isinstance(owner, type) \
            else delattr(owner, name)

    _add_requests(engine, prompt_ids, batch_size, 16 + steps, "prof")
    for _ in range(4):  # prefill + join, then warm decode steps
        engine.step()
    restore = [labelled(LowBitLinear, "forward", "bench::lowbit_linear"),
               labelled(engine, "_forward", "bench::model_forward"),
               labelled(engine, "_sample", "bench::sample"),
               labelled(engine, "_decode_text", "bench::detokenize")]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("bench::decode_step"):
                    result = engine.step()
                assert result.batch_size == batch_size, result.batch_size
    finally:
        for undo in restore:
            undo()
    while engine.has_unfinished_requests():
        engine.step()
    averages = prof.key_averages()
    by_name = {e.key: e for e in averages}

    def total_ms(name: str) -> float:
        event = by_name.get(name)
        return event.cpu_time_total / 1000 / steps if event else 0.0

    def count(name: str) -> float:
        event = by_name.get(name)
        return event.count / steps if event else 0.0

    aten = [e for e in averages if e.key.startswith("aten::")]
    top = sorted(aten, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    step_ms = total_ms("bench::decode_step")
    forward_ms = total_ms("bench::model_forward")
    lowbit_ms = total_ms("bench::lowbit_linear")
    return {
        "batch_size": batch_size, "steps_profiled": steps, "step_ms": step_ms,
        "model_forward_ms": forward_ms, "lowbit_linear_ms": lowbit_ms,
        "lowbit_linear_calls": count("bench::lowbit_linear"),
        "forward_other_ms": forward_ms - lowbit_ms,
        "sample_ms": total_ms("bench::sample"), "detokenize_ms": total_ms("bench::detokenize"),
        "engine_other_ms": step_ms - forward_ms - total_ms("bench::sample")
        - total_ms("bench::detokenize"),
        "aten_op_calls": sum(e.count for e in aten) / steps,
        "aten_op_kinds": len(aten),
        "top_aten_self_ms": [(e.key, round(e.self_cpu_time_total / 1000 / steps, 3),
                              e.count / steps) for e in top],
        "torch_threads": torch.get_num_threads(),
    }


def decode_attention_turns(engine: Any, prompt_ids: list[int], batch_size: int,
                           max_tokens: int) -> dict[str, Any]:
    """One batch decoded with the engine's attention and ipex-llm's own on alternate steps,
    so both see the same rows and cache lengths and the same moment of the machine: mean
    step time of each (prefill steps left out)."""
    from deployments.engine import ipex_attention

    def measure() -> dict[str, Any]:
        steps: dict[str, list[float]] = {"grouped": [], "ipex_llm": []}
        _add_requests(engine, prompt_ids, batch_size, max_tokens, f"att-{time.monotonic_ns()}")
        try:
            while engine.has_unfinished_requests():
                kind = "grouped" if sum(map(len, steps.values())) % 2 else "ipex_llm"
                (ipex_attention.install if kind == "grouped" else ipex_attention.uninstall)()
                started = time.perf_counter()
                result = engine.step()
                if result.batch_size == batch_size and not result.num_prefill_tokens:
                    steps[kind].append(time.perf_counter() - started)
        finally:
            ipex_attention.install()
        grouped_ms, ipex_ms = (1000 * statistics.fmean(steps[k]) for k in ("grouped",
                                                                              "ipex_llm"))
        return {"batch_size": batch_size, "steps_each": min(map(len, steps.values())),
                "grouped_step_ms": grouped_ms, "ipex_llm_step_ms": ipex_ms,
                "speedup": ipex_ms / grouped_ms}

    row = measure_quietly(measure)
    _log(f"decode attention turns: {row}")
    return row


# (batch, tokens per row) shapes of one forward pass: decode batches and prefill chunks.
MATMUL_PATH_SHAPES = ((1, 1), (8, 1), (16, 1), (1, 31), (8, 31), (16, 31))


def matmul_paths(engine: Any, prompt_ids: list[int], shapes: tuple[tuple[int, int], ...],
                 repeats: int = 3) -> list[dict[str, Any]]:
    """One forward pass per shape on each of ipex-llm's two CPU sym_int4 matmul paths:
    ggml's kernel (taken below ``TORCH_LINEAR_THRESHOLD`` activation rows, 512 unless
    BIGDL_LLM_LINEAR_THRESHOLD says otherwise) and dequantize-to-fp32 + torch's sgemm (at
    or above it, on CPUs with AVX-512 VNNI but not AMX). Median ms of ``repeats``."""
    import ipex_llm.transformers.low_bit_linear as low_bit_linear
    import torch

    model = engine._model
    original = low_bit_linear.TORCH_LINEAR_THRESHOLD
    rows = []
    try:
        with torch.inference_mode():
            for batch, length in shapes:
                ids = torch.tensor([(list(prompt_ids) * 64)[:length]] * batch)
                timings = {}
                for path, threshold in (("ggml_ms", 10**9), ("dequant_sgemm_ms", 1)):
                    low_bit_linear.TORCH_LINEAR_THRESHOLD = threshold

                    def forward(ids: Any = ids) -> dict[str, Any]:
                        runs = []
                        for _ in range(repeats):
                            t0 = time.perf_counter()
                            model(input_ids=ids, use_cache=True)
                            runs.append(time.perf_counter() - t0)
                        return {"ms": 1000 * statistics.median(runs)}

                    model(input_ids=ids, use_cache=True)  # warm
                    measured = measure_quietly(forward)
                    timings[path] = measured["ms"]
                    timings["foreign_cores"] = max(timings.get("foreign_cores", 0.0),
                                                   measured["foreign_cores"])
                rows.append({"batch": batch, "tokens_per_row": length,
                             "rows": batch * length, **timings})
                _log(f"matmul paths {rows[-1]}")
    finally:
        low_bit_linear.TORCH_LINEAR_THRESHOLD = original
    return rows


def _log(message: str) -> None:
    print(f"[inprocess] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="full")
    parser.add_argument("--checkpoint", required=True,
                        help="an ipex_llm checkpoint, or a gguf one for --engine llama_cpp")
    parser.add_argument("--engine", choices=ENGINES, default="ipex_llm")
    parser.add_argument("--output", required=True)
    parser.add_argument("--turn", action="store_true",
                        help="only what section ipex_turns compares the service with: the "
                             "batched-generate ceiling at batch 8 and one request at a time")
    args = parser.parse_args(argv)
    work = WORKLOADS[args.workload]
    if args.engine == "llama_cpp":
        return main_llama_cpp(args.checkpoint, work, Path(args.output))
    if args.turn:
        return main_turn(args.checkpoint, work, Path(args.output))
    started = time.perf_counter()
    max_batch = max(*work.ceiling_batch_sizes, *work.engine_batch_sizes,
                    work.profile_batch_size)
    engine = load_engine(args.checkpoint, max_batch)
    model, tokenizer = engine._model, engine._tokenizer
    prompt_ids = engine.encode(work.prompt)
    import ipex_llm.transformers.low_bit_linear as low_bit_linear

    result: dict[str, Any] = {"prompt_tokens": len(prompt_ids),
                              "load_s": time.perf_counter() - started,
                              # rows from which ipex-llm takes dequantize + sgemm (as loaded)
                              "linear_threshold_rows": low_bit_linear.TORCH_LINEAR_THRESHOLD}
    result["ceiling"] = ceiling(model, tokenizer, work)
    result["sequential"] = sequential(model, tokenizer, work)
    result["engine"] = engine_direct(engine, prompt_ids, work, "ipex_llm")
    result["profiles"] = [profile_decode_step(engine, prompt_ids, bs)
                          for bs in sorted({1, work.profile_batch_size})]
    result["decode_attention"] = decode_attention_turns(
        engine, prompt_ids, work.profile_batch_size, work.max_tokens)
    result["matmul_paths"] = matmul_paths(
        engine, prompt_ids, MATMUL_PATH_SHAPES if work.name == "full"
        else ((1, 1), (8, 1), (1, 31)), repeats=3 if work.name == "full" else 1)
    result["seconds"] = time.perf_counter() - started
    Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


def main_turn(checkpoint: str, work: Workload, output: Path) -> int:
    """One in-process turn of section ipex_turns: the ceiling at batch 8 and one request at
    a time, measured as sections 1 and 2 measure them."""
    engine = load_engine(checkpoint, TURN_BATCH_SIZE)
    model, tokenizer = engine._model, engine._tokenizer
    result = {"ceiling": ceiling(model, tokenizer, dataclasses.replace(
                  work, ceiling_batch_sizes=(TURN_BATCH_SIZE,))),
              "sequential": sequential(model, tokenizer, work)}
    output.write_text(json.dumps(result, indent=1))
    return 0


def main_llama_cpp(checkpoint: str, work: Workload, output: Path) -> int:
    """Engine llama_cpp alone: its in-process ceiling (there is no batched generate to
    compare with, nor torch ops to profile)."""
    started = time.perf_counter()
    engine = load_engine(checkpoint, max(work.llama_cpp_engine_batch_sizes), "llama_cpp")
    prompt_ids = engine.encode(work.prompt)
    result: dict[str, Any] = {"engine_name": "llama_cpp", "prompt_tokens": len(prompt_ids),
                              "load_s": time.perf_counter() - started,
                              "threads": len(os.sched_getaffinity(0)),
                              "context_tokens_per_slot": engine.max_context_tokens}
    result["engine"] = engine_direct(engine, prompt_ids, work, "llama_cpp")
    result["seconds"] = time.perf_counter() - started
    output.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
