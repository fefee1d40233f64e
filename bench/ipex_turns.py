"""Engine ipex_llm's service and the in-process paths its targets compare it with, measured
in alternating turns.

The targets compare the service at 8 clients with the batched-generate ceiling at batch 8
(>= 0.9x) and with one request at a time (>= 1.9x). Sections ``inprocess`` and ``service``
measure those minutes apart, and this machine's speed drifts by 10-20% over minutes. Here
they take turns, as section head_to_head does for engine llama_cpp: the service (a fresh
Ray and replica, 8 closed-loop clients over HTTP) and the in-process paths (a fresh process
loading the same checkpoint, no Ray running) in the order A B, B A, A B, ...; each turn's
ratios, and their medians, are what the report judges.

    python -m bench.ipex_turns --workload full --checkpoint DIR --output out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.head_to_head import alternate
from bench.inprocess import TURN_BATCH_SIZE
from bench.loadgen import HttpTarget
from bench.service import Service, sweep
from bench.workload import WORKLOADS, Workload

SERVICE, INPROCESS = "service", "inprocess"
IN_PROCESS_LIMIT_S = 600.0


def _log(message: str) -> None:
    print(f"[ipex-turns] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr,
          flush=True)


def _measure_service(checkpoint: str, work: Workload) -> list[dict[str, Any]]:
    service = Service(checkpoint)
    try:
        return asyncio.run(sweep(
            service, lambda: HttpTarget(service.base_url, work.model_name, work.prompt),
            (TURN_BATCH_SIZE,), work, "ipex turns service"))
    finally:
        service.close()


def _measure_inprocess(checkpoint: str, work: Workload, scratch: Path) -> dict[str, Any]:
    from bench.run import run_child

    output = scratch / "inprocess-turn.json"
    return run_child("ipex-turn-inprocess", [
        "bench.inprocess", "--turn", "--workload", work.name, "--checkpoint", checkpoint,
        "--output", str(output)], output, IN_PROCESS_LIMIT_S, scratch)


def run(checkpoint: str, work: Workload, scratch: Path) -> dict[str, Any]:
    """Every turn's measurements: {"turns": [{"order": [...], "service": rows at 8
    clients, "inprocess": {"ceiling": [row at batch 8], "sequential": row}}, ...]}."""
    turns = alternate(work.ipex_turns,
                      {SERVICE: lambda: _measure_service(checkpoint, work),
                       INPROCESS: lambda: _measure_inprocess(checkpoint, work, scratch)}, _log)
    return {"turns": turns, "clients": TURN_BATCH_SIZE}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="full")
    parser.add_argument("--checkpoint", required=True, help="the ipex_llm checkpoint")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)  # a cluster of our own, never someone else's
    started = time.perf_counter()
    # The in-process turns' logs and JSON go beside this section's output (bench.run's
    # scratch folder, inside the repository).
    result = run(args.checkpoint, WORKLOADS[args.workload], Path(args.output).resolve().parent)
    result["seconds"] = time.perf_counter() - started
    Path(args.output).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
