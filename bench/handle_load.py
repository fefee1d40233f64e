"""bench.loadgen's closed loop through the router's deployment handle instead of HTTP.

    python -m bench.handle_load --address GCS_ADDRESS --clients 8,16 [--max-tokens 128] \\
        [--min-requests 12] [--app llm] [--out run.json]

Connects to the Ray cluster at GCS_ADDRESS as a driver and streams completions through the
application's router handle (langchain_adapter's RouterClient: the path LangChain chains
take), the same requests and summaries as over HTTP. Output: bench.loadgen's ``Run`` with
``url`` ``handle://<app>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from bench.loadgen import PROMPT, Run, completion_body, consume, measure_levels
from bench.machine import emit_result, machine_info
from bench.stats import RequestRecord


class HandleTarget:
    """The router's ``completions_stream`` method; ``issue(max_tokens)`` sends one request."""

    def __init__(self, app_name: str, prompt: str):
        from langchain_adapter.router_client import RouterClient

        self._client = RouterClient(app_name)
        self.model = self._client.model_names[0]
        self._prompt = prompt

    async def issue(self, max_tokens: int) -> RequestRecord:
        record = RequestRecord(started=time.perf_counter())
        body = completion_body(self.model, self._prompt, max_tokens)
        try:
            return await consume(self._client.astream("completions_stream", body), record,
                                 max_tokens)
        except Exception as error:  # a failed request is a row of the result, not a crash
            record.error = f"{type(error).__name__}: {error}"[:200]
            record.finished = time.perf_counter()
            return record


async def run(app_name: str, clients: list[int], *, max_tokens: int, min_requests: int) -> Run:
    info = machine_info()
    target = HandleTarget(app_name, PROMPT)
    levels = await measure_levels(target, clients, max_tokens=max_tokens,  # type: ignore[arg-type]
                                  min_requests=min_requests)
    return Run(url=f"handle://{app_name}", model=target.model, date=info["date"],
               commit=info["git_commit"], machine=info, prompt=PROMPT, levels=levels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the Ray cluster's GCS address")
    parser.add_argument("--app", default="llm")
    parser.add_argument("--clients", default="8,16")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--min-requests", type=int, default=12)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    # A local cluster started by ray.init() uses token authentication; a driver joining it
    # by address must say so (the token itself is in ~/.ray).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    ray.init(address=args.address, log_to_driver=False)
    try:
        result = asyncio.run(run(args.app, [int(c) for c in args.clients.split(",")],
                                 max_tokens=args.max_tokens, min_requests=args.min_requests))
    finally:
        ray.shutdown()
    emit_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
