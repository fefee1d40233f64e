"""Like for like: every system gets the same compute core(s) and the same spare core(s).

The split is the one `reserved_cores: 1` makes (deployments.core_reservation): the lowest
physical core is spare, the others compute (on a 2-core host: core 0 spare, core 1
compute). Per engine, for one model:

- the engine alone (bench.engine) with its threads on the compute cores only;
- our service started through the core reservation (Ray, Serve's proxy and controller, the
  router and the replica's other threads on the spare core, the model's compute threads on
  the others), measured over HTTP (bench.loadgen, the mixed workload included) and through
  the router's handle (bench.handle_load), with the serving cost: the CPU the service's
  processes spend outside the model's compute threads, idle and per generated token;
- llama-server on the GGUF with one compute thread per compute core: started on the spare
  core, its main thread (which runs every decode: ``-t`` compute threads, the first of them
  the main thread itself) then moved to the compute core, its HTTP threads left on the
  spare one.

The load generators run on the spare core too (this process moves itself there), as a
client of a real host would not, but as every system here gets alike.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil

from bench import build_llama_server

if TYPE_CHECKING:
    from bench.run import Bench

IDLE_WINDOW_S = 30.0
COST_CLIENTS = 8


def cpu_split() -> tuple[list[int], list[int]]:
    """(spare CPUs, compute CPUs) of this host, as `reserved_cores: 1` splits them."""
    from deployments.core_reservation import choose_reserved_cpus

    cpus = sorted(os.sched_getaffinity(0))
    spare = list(choose_reserved_cpus(1, cpus))
    return spare, [cpu for cpu in cpus if cpu not in spare]


@contextlib.contextmanager
def on_cpus(cpus: list[int]) -> Iterator[None]:
    """This process (its calling thread and the threads and children it starts) on ``cpus``."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _tree_cpu_s(root_pid: int) -> float:
    """CPU seconds of a process and every process below it (live ones)."""
    total = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(root_pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
    return total


def _threads_cpu_s(pid: int, tids: list[int]) -> float:
    """CPU seconds of some threads of ``pid`` (utime + stime of /proc/PID/task/TID/stat)."""
    total = 0
    for tid in tids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def thread_placement(pid: int) -> dict[str, str]:
    """{tid: CPUs it may run on} of every thread of ``pid``, for the record."""
    placement = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list"):
                    placement[task.name] = line.split(":", 1)[1].strip()
    return placement


class StackMeter:
    """CPU of a service's process tree outside the model's compute threads."""

    def __init__(self, root_pid: int, url: str):
        replica = httpx.get(f"{url}/health", timeout=30).json()["replica"]
        self.root_pid, self.replica_pid = root_pid, int(replica["pid"])
        self.compute_tids = [int(tid) for tid in replica["cores"]["compute_threads"]]
        self.cores = replica["cores"]

    def sample(self) -> tuple[float, float, float]:
        """(monotonic time, CPU s of the tree, CPU s of the compute threads)."""
        return (time.monotonic(), _tree_cpu_s(self.root_pid),
                _threads_cpu_s(self.replica_pid, self.compute_tids))

    @staticmethod
    def outside_s(before: tuple[float, float, float], after: tuple[float, float, float]
                  ) -> tuple[float, float]:
        """(wall seconds, CPU seconds outside the compute threads) between two samples."""
        return after[0] - before[0], (after[1] - before[1]) - (after[2] - before[2])


def measure_service(bench: Bench, engine: str, checkpoint: str, clients: list[int],
                    with_mixed: bool, spare: list[int]) -> dict[str, Any]:
    """Our service on the core reservation: idle cost, HTTP levels (and the mixed workload),
    the serving cost at COST_CLIENTS clients, and the handle levels."""
    result: dict[str, Any] = {}
    with bench.service(engine, checkpoint=checkpoint, reserved=True) as info:
        meter = StackMeter(info["pid"], info["url"])
        result["cores"] = meter.cores
        bench.load(info["url"], [COST_CLIENTS])  # warm: every shape of the batch, caches
        before = meter.sample()
        time.sleep(IDLE_WINDOW_S)
        wall, idle_cpu = meter.outside_s(before, meter.sample())
        result["idle_cores"] = round(idle_cpu / wall, 4)
        run = bench.load(info["url"], clients, with_mixed=with_mixed)
        result["http"] = run.model_dump(exclude={"machine"})
        before = meter.sample()
        cost_run = bench.load(info["url"], [COST_CLIENTS])
        wall, busy_cpu = meter.outside_s(before, meter.sample())
        tokens = cost_run.levels[0].completion_tokens
        result["cost"] = {"clients": COST_CLIENTS, "tokens": tokens, "wall_s": round(wall, 2),
                          "outside_cpu_s": round(busy_cpu, 3),
                          "cpu_ms_per_token": round(1000 * busy_cpu / tokens, 3)
                          if tokens else None,
                          "tokens_per_s": cost_run.levels[0].tokens_per_s}
        with on_cpus(spare):
            result["handle"] = bench.child(f"handle-{engine}", [
                "bench.handle_load", "--address", info["gcs_address"],
                "--clients", ",".join(map(str, clients)),
                "--max-tokens", str(bench.work["max_tokens"]),
                "--min-requests", str(bench.work["min_requests"])])
        result["replica_threads"] = thread_placement(meter.replica_pid)
    result["startup"] = {k: info.get(k) for k in ("serve_run_to_ready_s",
                                                  "replica_peak_rss_bytes")}
    return result


def measure_llama_server(bench: Bench, gguf: str, clients: list[int], spare: list[int],
                         compute: list[int]) -> dict[str, Any]:
    with build_llama_server.running(gguf, threads=len(compute), spare_cpus=spare,
                                    compute_cpus=compute) as server:
        run = bench.load(server["url"], clients)
        server["threads"] = thread_placement(server["pid"])
    return {**server, "run": run.model_dump(exclude={"machine"})}


def section(bench: Bench, checkpoints: dict[str, str], *, with_mixed: bool) -> dict[str, Any]:
    """The like-for-like comparison for one model: {engine: {alone, service}, llama_server}.

    ``checkpoints``: ``ipex_llm`` and ``llama_cpp`` (published checkpoints) and ``gguf``
    (the GGUF file itself, for llama-server)."""
    spare, compute = cpu_split()
    clients = bench.work["turn_clients"]
    result: dict[str, Any] = {"spare_cpus": spare, "compute_cpus": compute}
    with on_cpus(spare):
        for engine in ("ipex_llm", "llama_cpp"):
            if engine not in checkpoints:
                result[engine] = {"skipped": f"no {engine} checkpoint"}
                continue
            alone = bench.child(f"engine-{engine}-pinned", [
                "bench.engine", "--engine", engine, "--checkpoint", checkpoints[engine],
                "--batch", ",".join(map(str, clients)), "--max-tokens",
                str(bench.work["max_tokens"])], cpus=compute)
            result[engine] = {"alone": alone, "service": measure_service(
                bench, engine, checkpoints[engine], clients, with_mixed, spare)}
        if build_llama_server.llama_server_path() is None:
            result["llama_server"] = {"skipped": "llama-server is not built"}
        else:
            result["llama_server"] = measure_llama_server(bench, checkpoints["gguf"], clients,
                                                          spare, compute)
    return result
