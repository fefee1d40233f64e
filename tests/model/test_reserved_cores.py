"""Reserved cores on a real `serve run`: the serving stack on one core, the model on another.

`python -m deployments.core_reservation --cores 1 -- serve run ...` (what `make serve` and
cluster/start-node.sh run) on this 2-CPU machine: every thread of every process the command
starts (Ray's GCS, raylet and agents, Serve's controller and proxy, the router, the replica's
own threads) must run on the reserved CPU, except the model's compute threads, which run on
the other one; /health shows both sets. Both engines, on the demo model.
"""

from __future__ import annotations

import os
import sys

import httpx
import psutil
import pytest

from bench.pinned import thread_placement
from deployments.core_reservation import choose_reserved_cpus
from deployments.placement import format_cpulist
from tests.helpers import serve_run

pytestmark = [pytest.mark.model, pytest.mark.timeout(420),
              pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")]

LAUNCHER = (sys.executable, "-m", "deployments.core_reservation", "--cores", "1", "--")


def _serving_processes() -> list[psutil.Process]:
    """Every process this test started: `serve run` and everything below it."""
    return psutil.Process().children(recursive=True)


def _check_split(base: str, question: str) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    reserved = format_cpulist(choose_reserved_cpus(1, cpus))
    compute = format_cpulist(c for c in cpus if str(c) not in reserved.split(","))
    answer = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "model": "smollm2-135m-instruct", "prompt": question, "max_tokens": 8,
        "temperature": 0})
    assert answer.status_code == 200 and "Paris" in answer.json()["choices"][0]["text"]

    replica = httpx.get(f"{base}/health", timeout=30).json()["replica"]
    cores = replica["cores"]
    assert (cores["reserved_cpus"], cores["compute_cpus"], cores["source"]) == (
        reserved, compute, "node")
    compute_threads = {int(tid): cpu for tid, cpu in cores["compute_threads"].items()}
    assert compute_threads and set(compute_threads.values()) == {int(compute.split(",")[0])}

    processes = _serving_processes()
    names = " ".join(" ".join(p.cmdline()[:2]) for p in processes)
    for needed in ("gcs_server", "raylet", "ServeController", "ProxyActor", "LLMServer"):
        assert needed in names or any(needed in p.name() for p in processes), needed
    elsewhere = []
    for process in processes:
        try:
            threads = {int(tid): cpus for tid, cpus in thread_placement(process.pid).items()}
        except OSError:
            continue
        for tid, allowed in threads.items():
            if process.pid == replica["pid"] and tid in compute_threads:
                assert allowed == str(compute_threads[tid]), (tid, allowed)
            elif allowed != reserved:
                elsewhere.append((process.pid, " ".join(process.cmdline()[:2]), tid, allowed))
    assert not elsewhere, elsewhere  # every other thread of the stack is on the reserved CPU


def test_ipex_llm_replica_computes_on_its_core_and_the_stack_stays_on_the_reserved_one(
        demo_checkpoint, tmp_path):
    with serve_run("serve_config.yaml", tmp_path, launcher=LAUNCHER) as base:
        _check_split(base, "The capital of France is")


def test_llama_cpp_replica_computes_on_its_core_and_the_stack_stays_on_the_reserved_one(
        gguf_checkpoint, tmp_path):
    pytest.importorskip("llama_cpp", reason="the llama-cpp extra (make test installs it)")
    with serve_run("serve_config.llama_cpp.yaml", tmp_path, launcher=LAUNCHER) as base:
        _check_split(base, "The capital of France is")
