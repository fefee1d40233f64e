"""Engine llama_cpp's service and llama.cpp's server, measured in alternating turns.

The issue's hardest target compares two numbers a few percent apart, while this machine's
speed drifts by 10-20% over minutes (llama-server alone: 210 then 181 tok/s at 8 clients,
ten minutes apart). Sections ``llama_cpp_service`` and ``llama`` run many minutes apart,
so their ratio carries that drift. Here the two take turns, in the order A B, B A, A B, ...
(drift that is steady over the run cancels in pairs), each turn starting its server afresh
(the other one stopped: neither runs beside the other) and measuring the same client
counts; the ratio of each adjacent pair, and their median, are what the report judges.

    python -m bench.head_to_head --workload full --checkpoint GGUF_CHECKPOINT \\
        --gguf FILE --output out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import llama_peer
from bench.loadgen import HttpTarget
from bench.service import CONFIG_FILES, Service, sweep
from bench.workload import WORKLOADS, Workload

OURS, PEER = "service", "llama_server"


def _log(message: str) -> None:
    print(f"[head-to-head] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr,
          flush=True)


def turn_order(turns: int, first: str = OURS, second: str = PEER) -> list[tuple[str, str]]:
    """Who goes first in each turn: ``first`` (ours), then ``second``; then the other way
    round."""
    return [(first, second) if turn % 2 == 0 else (second, first) for turn in range(turns)]


def alternate(turns: int, measure: dict[str, Callable[[], Any]],
              log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run the two measurements of ``measure`` (ours first in it) in ``turn_order``: each
    turn's {"order": [...], name: result, ...}."""
    first, second = measure
    results: list[dict[str, Any]] = []
    for order in turn_order(turns, first, second):
        turn: dict[str, Any] = {"order": list(order)}
        for who in order:
            log(f"turn {len(results) + 1}: {who}")
            turn[who] = measure[who]()
        results.append(turn)
    return results


def _measure_ours(checkpoint: str, work: Workload) -> list[dict[str, Any]]:
    service = Service(checkpoint, CONFIG_FILES["llama_cpp"])
    try:
        return asyncio.run(sweep(
            service, lambda: HttpTarget(service.base_url, work.model_name, work.prompt),
            work.head_to_head_clients, work, "head-to-head service"))
    finally:
        service.close()


def _measure_peer(binary: Path, gguf: str, work: Workload) -> list[dict[str, Any]]:
    with llama_peer.running_server(binary, gguf, work) as server:
        return asyncio.run(llama_peer.sweep(server["base_url"], work,
                                            work.head_to_head_clients))


def run(checkpoint: str, gguf: str, binary: Path, work: Workload) -> dict[str, Any]:
    """Every turn's rows, by who ran: {"turns": [{"order": [...], "service": rows,
    "llama_server": rows}, ...]}."""
    turns = alternate(work.head_to_head_turns,
                      {OURS: lambda: _measure_ours(checkpoint, work),
                       PEER: lambda: _measure_peer(binary, gguf, work)}, _log)
    return {"turns": turns, "clients": list(work.head_to_head_clients)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="full")
    parser.add_argument("--checkpoint", required=True, help="the gguf checkpoint we serve")
    parser.add_argument("--gguf", required=True, help="the GGUF file llama-server reads")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    work = WORKLOADS[args.workload]
    binary = llama_peer.built_server_or_skip(args.output)
    if binary is None:
        return 0
    os.environ.pop("RAY_ADDRESS", None)  # a cluster of our own, never someone else's
    started = time.perf_counter()
    result = run(args.checkpoint, args.gguf, binary, work)
    result["seconds"] = time.perf_counter() - started
    Path(args.output).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
