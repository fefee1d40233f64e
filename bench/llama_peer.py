"""The peer a CPU user would pick instead: llama.cpp's own server on the same GGUF.

``llama-server`` (built once by ``python -m bench.build_llama_server``) runs with 2 threads,
8 parallel slots and continuous batching on loopback, and gets the same closed-loop sweep
as our service through its OpenAI-compatible /v1/completions (streamed). Prompt caching is
at its default on both sides (llama-server's ``cache_prompt``, engine llama_cpp's
``prompt_cache``): every request repeats the same prompt, so both reuse its KV; the tables'
"prompt from cache" column shows how much.

    python -m bench.llama_peer --workload full --gguf FILE --output out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.build_llama_server import llama_server_path
from bench.coldstart import vm_hwm_bytes
from bench.loadgen import HttpTarget, closed_loop
from bench.machine import measure_quietly_async
from bench.stats import summarize
from bench.workload import WORKLOADS, Workload

READY_TIMEOUT_S = 120.0


def _log(message: str) -> None:
    print(f"[llama.cpp] {message}", file=sys.stderr, flush=True)


def server_command(binary: Path, gguf: str, port: int, work: Workload) -> list[str]:
    # 512 context tokens per slot: prompt plus the longest answer of any section fit.
    return [str(binary), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
            "-t", str(work.llama_threads), "-tb", str(work.llama_threads),
            "-np", str(work.llama_parallel_slots), "-c", str(512 * work.llama_parallel_slots),
            "-cb", "--no-webui", "--log-disable"]


def _wait_ready(base_url: str, process: subprocess.Popen) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < READY_TIMEOUT_S:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"llama-server not ready after {READY_TIMEOUT_S} s")


async def sweep(base_url: str, work: Workload,
                clients_list: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
    """The closed-loop sweep (``work.llama_clients`` unless ``clients_list``) of one server."""
    rows = []
    async with HttpTarget(base_url, work.model_name, work.prompt) as target:
        for clients in clients_list or work.llama_clients:
            await closed_loop(target.issue, clients=clients, rounds=1, max_tokens=4,
                              timeout_s=120)

            async def measure(clients: int = clients) -> dict[str, Any]:
                records = await closed_loop(
                    target.issue, clients=clients, rounds=work.rounds(clients),
                    max_tokens=work.max_tokens,
                    timeout_s=60 + work.rounds(clients) * clients * work.max_tokens / 5)
                return {**summarize(records, clients).as_dict(),
                        "first_errors": [r.error for r in records if not r.ok][:3]}

            row = await measure_quietly_async(measure)
            rows.append(row)
            _log(f"clients={clients}: {row['tokens_per_s']:.1f} tok/s, "
                 f"ttft p50 {row['ttft_p50_s']:.3f} s, errors {row['errors']}")
    return rows


def built_server_or_skip(output: str) -> Path | None:
    """The built llama-server; None (after writing the section's "skipped" JSON to
    ``output``) until ``python -m bench.build_llama_server`` has built it."""
    binary = llama_server_path()
    if binary is None:
        Path(output).write_text(json.dumps({"skipped": "llama-server not built"}))
    return binary


@contextlib.contextmanager
def running_server(binary: Path, gguf: str, work: Workload) -> Iterator[dict[str, Any]]:
    """llama-server on a free loopback port until the block ends (then its process tree is
    stopped): ``base_url``, ``command``, ``ready_s`` and ``pid``."""
    from tests.helpers import free_port, stop_process_tree

    port = free_port()
    command = server_command(binary, gguf, port, work)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        yield {"base_url": base_url, "command": " ".join(command), "pid": process.pid,
               "ready_s": _wait_ready(base_url, process)}
    finally:
        stop_process_tree(process, timeout_s=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="full")
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    work = WORKLOADS[args.workload]
    binary = built_server_or_skip(args.output)
    if binary is None:
        return 0
    result: dict[str, Any] = {}
    try:
        with running_server(binary, args.gguf, work) as server:
            result.update(command=server["command"], ready_s=server["ready_s"])
            result["sweep"] = asyncio.run(sweep(server["base_url"], work))
            result["vm_hwm_bytes"] = vm_hwm_bytes(server["pid"])
    finally:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
