"""Soak: 20,000 mixed requests through a running service, watching for leaks.

    python -m bench.soak [--url http://127.0.0.1:8000] [--start] [--requests 20000]
        [--concurrency 12] [--max-minutes M] [--out bench/soak.json] [--markdown FILE]

The mix (seeded, so two runs send the same requests): non-streaming completions, streamed
chat answers, streams the client hangs up on after their first chunk, requests whose own
``timeout`` is too short to finish (504, or a truncated answer marked by the deadline), and
bad input (400). Every ``--sample-every`` requests (a block run at ``--concurrency``) it
records the RSS and open file descriptors (/proc/PID/fd) of the model replica, the router,
the HTTP proxy and the Serve controller, and the Ray object store's bytes in use (the
raylet's store stats, read over its GCS without joining the cluster as a driver).

Reported: RSS growth of each process from the end of warm-up to the end (target below 5%).
Warm-up is ``--warmup`` requests and, beyond that, until the replica's prompt cache is full:
it fills up to a fixed bound by design (/health reports its bytes and bound), so growth
before then says nothing about leaks. Also: the replica's growth beyond its prompt cache,
fd counts after warm-up (flat: max - min), and the outcome of every request (an
unexpected outcome is any 5xx but a timed-out request's 504, or a broken connection).

``--start`` runs ``serve run serve_config.yaml`` (with cluster/ray_tuning.env, as ``make
serve``) in a session of its own, waits for /health, and stops it by PID at the end;
otherwise the service at ``--url`` must be running (``make serve``). Not part of ``make
test``: 20,000 requests take 10-20 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.machine import stop_tree

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
# Share of each kind in the mix, in this order.
MIX = (("completion", 0.30), ("stream", 0.30), ("cancelled", 0.10), ("timed_out", 0.10),
       ("bad_input", 0.20))
RSS_GROWTH_TARGET = 0.05
PROMPT_CACHE_FULL = 0.95  # of its bound: the replica's prompt cache has filled
BAD_BODIES: tuple[dict[str, Any], ...] = (
    {"model": MODEL, "prompt": "hi", "max_tokens": -1},
    {"model": MODEL, "prompt": "hi", "temperature": "hot"},
    # Not {"model": ...} alone: a completion without a prompt is valid (OpenAI's default).
    {"model": MODEL, "prompt": "hi", "max_tokens": "5"},
    # Not an unknown field: those are ignored (OpenAI's clients send fields servers lack), and
    # such a body is a valid request for default_max_tokens.
    {"model": MODEL, "prompt": "hi", "max_tokens": 1_000_000},  # past the context: 400
)
TOPICS = ("the sea", "a cat", "Paris", "rain", "numbers", "a train", "bread", "the moon")
HEALTH_TIMEOUT_S = 600.0
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"


def build_request(kind: str, rng: random.Random, max_tokens: int) -> dict[str, Any]:
    topic = rng.choice(TOPICS)
    if kind == "completion":
        return {"model": MODEL, "prompt": f"Write about {topic}.", "max_tokens": max_tokens}
    if kind == "stream" and rng.random() < 0.5:  # half of the streams are chats
        return {"model": MODEL, "stream": True, "max_tokens": 2 * max_tokens,
                "messages": [{"role": "user", "content": f"Tell me about {topic}."}]}
    if kind in ("stream", "cancelled"):
        return {"model": MODEL, "stream": True, "max_tokens": 2 * max_tokens,
                "prompt": f"Tell me about {topic}."}
    if kind == "timed_out":  # far more tokens than the deadline leaves time for
        return {"model": MODEL, "prompt": f"Describe {topic}.", "max_tokens": 200,
                "timeout": 0.1}
    return dict(rng.choice(BAD_BODIES))


async def send(client: httpx.AsyncClient, kind: str, body: dict[str, Any]) -> str:
    """One request; its outcome: "ok", "expected" (the refusal or cut its kind asks for),
    or "unexpected:<what>"."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    try:
        if body.get("stream"):
            async with client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    return f"unexpected:{response.status_code}"
                events = 0
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events += 1
                        if kind == "cancelled":
                            return "expected"  # hang up after the first chunk
                        if line == "data: [DONE]":
                            return "ok"
                return "unexpected:no [DONE]"
        response = await client.post(path, json=body)
    except httpx.HTTPError as error:
        return f"unexpected:{type(error).__name__}"
    status = response.status_code
    if kind == "bad_input":
        return "expected" if status == 400 else f"unexpected:{status}"
    if kind == "timed_out":
        if status == 504:
            return "expected"
        if status == 200:  # cut at the deadline after some tokens: a short answer
            used = response.json()["usage"]["completion_tokens"]
            return "expected" if used < body["max_tokens"] else "unexpected:not cut"
        return f"unexpected:{status}"
    return "ok" if status == 200 else f"unexpected:{status}"


async def run_block(client: httpx.AsyncClient, jobs: list[tuple[str, dict[str, Any]]],
                    concurrency: int, outcomes: Counter[str], deadline: float) -> int:
    """Send ``jobs`` (no new one after ``deadline``, time.monotonic()); how many were sent."""
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty() and time.monotonic() < deadline:
            kind, body = queue.get_nowait()
            outcome = await send(client, kind, body)
            outcomes[f"{kind}:{outcome}"] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(jobs) - queue.qsize()


# ---- the service's processes ---------------------------------------------------------------


def serve_processes(url: str) -> dict[str, psutil.Process]:
    """The replica (from /health), and the router, proxy and controller: Ray workers beside
    it under the same raylet (so another Ray instance on this machine is never measured)."""
    replica_pid = httpx.get(f"{url}/health", timeout=30).json()["replica"]["pid"]
    replica = psutil.Process(replica_pid)
    found = {"replica": replica}
    raylet = replica.parent()
    for child in raylet.children():
        with contextlib.suppress(psutil.Error):
            title = " ".join(child.cmdline())
            for role, marker in (("router", "LLMRouter"), ("proxy", "ProxyActor"),
                                 ("controller", "ServeController")):
                if marker in title:
                    found[role] = child
    found["raylet"] = raylet
    return found


def gcs_address(raylet: psutil.Process) -> str | None:
    for arg in raylet.cmdline():
        if arg.startswith("--gcs-address="):
            return arg.split("=", 1)[1]
    return None


def object_store_bytes(address: str | None) -> int | None:
    """Bytes in the node's object store, from its raylet (Ray's token auth: RAY_AUTH_TOKEN
    must be the cluster's; --start makes one); None if it cannot be read."""
    if address is None or not os.environ.get(AUTH_TOKEN_ENV):
        return None
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    try:
        reply = get_memory_info_reply(get_state_from_address(address), timeout_seconds=30)
    except Exception:  # a sample is optional; the soak goes on
        return None
    return int(reply.store_stats.object_store_bytes_used)


def replica_memory(url: str) -> dict[str, Any]:
    """From the replica's /health: the bytes its prompt cache holds now (None if it keeps
    none) and what its heap trimming has done so far."""
    try:
        replica = httpx.get(f"{url}/health", timeout=30).json()["replica"]
    except (httpx.HTTPError, KeyError, TypeError, ValueError):
        return {"prompt_cache_bytes": None}
    cache, trim = replica.get("prompt_cache"), replica.get("heap_trim") or {}
    return {"prompt_cache_bytes": None if cache is None else int(cache["bytes"]),
            "prompt_cache_capacity_bytes": None if cache is None else int(cache["capacity_bytes"]),
            "heap_trims": trim.get("trims"), "heap_trim_s": trim.get("seconds"),
            "heap_released_bytes": trim.get("released_bytes")}


def sample(processes: dict[str, psutil.Process], address: str | None, url: str, sent: int,
           elapsed_s: float) -> dict[str, Any]:
    point: dict[str, Any] = {"requests": sent, "elapsed_s": round(elapsed_s, 1),
                             "object_store_bytes": object_store_bytes(address),
                             **replica_memory(url)}
    for role, process in processes.items():
        if role == "raylet":
            continue
        try:
            point[f"{role}_rss_bytes"] = process.memory_info().rss
            point[f"{role}_fds"] = len(os.listdir(f"/proc/{process.pid}/fd"))
        except (psutil.Error, OSError):
            point[f"{role}_rss_bytes"] = point[f"{role}_fds"] = None
    return point


# ---- summary -------------------------------------------------------------------------------


def warmup_end(samples: list[dict[str, Any]], warmup: int) -> int:
    """The index of the sample that ends warm-up: ``warmup`` requests sent and the replica's
    prompt cache full. Until it is, the replica grows by design, up to the cache's bound;
    a leak shows as growth after that."""
    for index, point in enumerate(samples):
        cache, bound = point.get("prompt_cache_bytes"), point.get("prompt_cache_capacity_bytes")
        if point["requests"] >= warmup and (
                cache is None or bound is None or cache >= PROMPT_CACHE_FULL * bound):
            return index
    return len(samples) - 1


def summarize(samples: list[dict[str, Any]], warmup: int, roles: list[str]) -> dict[str, Any]:
    after = samples[warmup_end(samples, warmup):]
    summary: dict[str, Any] = {"warmup_requests": after[0]["requests"]}
    for role in roles:
        rss = [s[f"{role}_rss_bytes"] for s in after if s.get(f"{role}_rss_bytes")]
        fds = [s[f"{role}_fds"] for s in after if s.get(f"{role}_fds") is not None]
        if len(rss) < 2:
            continue
        summary[role] = {
            "rss_at_warmup_mb": round(rss[0] / 2**20, 1), "rss_end_mb": round(rss[-1] / 2**20, 1),
            "rss_max_mb": round(max(rss) / 2**20, 1),
            "rss_growth": round(rss[-1] / rss[0] - 1, 4),
            "fds_at_warmup": fds[0], "fds_end": fds[-1], "fds_spread": max(fds) - min(fds)}
    # The replica's prompt cache fills up to its bound by design (its /health gives its
    # bytes): what the replica holds beyond it is what must stay flat.
    cached = [(s["replica_rss_bytes"], s["prompt_cache_bytes"]) for s in after
              if s.get("replica_rss_bytes") and s.get("prompt_cache_bytes") is not None]
    if "replica" in summary and len(cached) >= 2:
        (rss_start, cache_start), (rss_end, cache_end) = cached[0], cached[-1]
        summary["replica"].update(
            prompt_cache_at_warmup_mb=round(cache_start / 2**20, 1),
            prompt_cache_end_mb=round(cache_end / 2**20, 1),
            rss_growth_beyond_prompt_cache=round(
                (rss_end - cache_end) / (rss_start - cache_start) - 1, 4))
    store = [s["object_store_bytes"] for s in after if s["object_store_bytes"] is not None]
    if store:
        summary["object_store"] = {"at_warmup_mb": round(store[0] / 2**20, 2),
                                   "end_mb": round(store[-1] / 2**20, 2),
                                   "max_mb": round(max(store) / 2**20, 2)}
    return summary


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['requests']} requests at concurrency {result['concurrency']} in "
             f"{result['elapsed_s'] / 60:.1f} min; unexpected outcomes: "
             f"{result['unexpected']}. Warm-up ended after "
             f"{result['summary']['warmup_requests']} requests (the replica's prompt cache "
             "full).", "",
             "| process | RSS after warm-up (MB) | RSS at end (MB) | growth | fds after "
             "warm-up | fds at end | fd spread |", "|---|---|---|---|---|---|---|"]
    for role, s in result["summary"].items():
        if not isinstance(s, dict) or role == "object_store":
            continue
        lines.append(f"| {role} | {s['rss_at_warmup_mb']} | {s['rss_end_mb']} | "
                     f"{s['rss_growth']:+.1%} | {s['fds_at_warmup']} | {s['fds_end']} | "
                     f"{s['fds_spread']} |")
    replica = result["summary"].get("replica", {})
    if "rss_growth_beyond_prompt_cache" in replica:
        lines += ["", f"Replica prompt cache (bounded, /health): "
                  f"{replica['prompt_cache_at_warmup_mb']} MB after warm-up, "
                  f"{replica['prompt_cache_end_mb']} MB at the end; replica RSS growth beyond "
                  f"it: {replica['rss_growth_beyond_prompt_cache']:+.1%}."]
    last = result["samples"][-1]
    if last.get("heap_trims") is not None:
        lines += ["", f"Replica heap trims (freed memory returned to the OS): "
                  f"{last['heap_trims']} taking {last['heap_trim_s']:.2f} s in all, "
                  f"{last['heap_released_bytes'] / 2**20:.0f} MB released."]
    store = result["summary"].get("object_store")
    if store:
        lines += ["", f"Object store in use: {store['at_warmup_mb']} MB after warm-up, "
                  f"{store['end_mb']} MB at the end (max {store['max_mb']} MB)."]
    return "\n".join(lines) + "\n"


# ---- main ----------------------------------------------------------------------------------


def start_service(url: str) -> subprocess.Popen:
    """``make serve``'s command, in a session of its own (stopped by PID)."""
    tuning = dict(line.split("=", 1) for line in
                  (REPO_ROOT / "cluster/ray_tuning.env").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    # A token of our own for the cluster `serve run` starts (Ray's token auth), so this
    # process can read its object store's stats.
    os.environ.setdefault(AUTH_TOKEN_ENV, secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    env = {**os.environ, **tuning}
    env.pop("RAY_ADDRESS", None)  # a cluster of our own, never someone else's
    log = open(Path(tempfile.gettempdir(), "soak.serve.log"), "w")  # noqa: SIM115
    process = subprocess.Popen([str(Path(sys.executable).with_name("serve")), "run",
                                "serve_config.yaml"], cwd=REPO_ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve run exited with {process.returncode}; see {log.name}")
        with contextlib.suppress(httpx.HTTPError, KeyError, TypeError):
            response = httpx.get(f"{url}/health", timeout=5)
            if response.status_code == 200 and response.json()["replica"]["pid"]:
                return process
        time.sleep(2)
    stop_tree(process)
    raise TimeoutError(f"{url}/health not ready after {HEALTH_TIMEOUT_S:.0f} s")


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    kinds, weights = zip(*MIX, strict=True)
    processes = serve_processes(args.url)
    address = gcs_address(processes["raylet"])
    roles = [role for role in processes if role != "raylet"]
    outcomes: Counter[str] = Counter()
    started = time.monotonic()
    samples = [sample(processes, address, args.url, 0, 0.0)]
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=args.url, timeout=120, limits=limits) as client:
        sent, deadline = 0, started + args.max_minutes * 60
        while sent < args.requests and time.monotonic() < deadline:
            jobs = []
            for _ in range(min(args.sample_every, args.requests - sent)):
                kind = rng.choices(kinds, weights)[0]
                jobs.append((kind, build_request(kind, rng, args.max_tokens)))
            sent += await run_block(client, jobs, args.concurrency, outcomes, deadline)
            point = sample(processes, address, args.url, sent, time.monotonic() - started)
            samples.append(point)
            print(json.dumps(point), file=sys.stderr, flush=True)
    unexpected = sum(n for key, n in outcomes.items() if ":unexpected" in key)
    return {"requests": samples[-1]["requests"], "requests_asked": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens, "warmup": args.warmup, "seed": args.seed,
            "elapsed_s": round(time.monotonic() - started, 1),
            "outcomes": dict(sorted(outcomes.items())), "unexpected": unexpected,
            "rss_growth_target": RSS_GROWTH_TARGET,
            "summary": summarize(samples, args.warmup, roles), "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--start", action="store_true",
                        help="start `serve run serve_config.yaml` first, stop it at the end")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=1,
                        help="of a completion; a stream asks for twice this")
    parser.add_argument("--sample-every", type=int, default=1_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=float("inf"),
                        help="send no request after this many minutes (a busy machine)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench/soak.json")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the service on either
    service = start_service(args.url) if args.start else None
    try:
        result = asyncio.run(soak(args))
    finally:
        if service is not None:
            stop_tree(service)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    growth = max((s["rss_growth"] for role, s in result["summary"].items()
                  if isinstance(s, dict) and role != "object_store"), default=0.0)
    return 0 if result["unexpected"] == 0 and growth < RSS_GROWTH_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
