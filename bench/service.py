"""Our service on the demo model: start-up, closed-loop sweeps over HTTP and through the
handle, the mixed short/long workload, replica memory, and where the CPU goes.

Runs in a process of its own (``bench.run`` starts it), which starts a fresh local Ray
cluster (never joins one) and shuts it down at the end; every Ray process is a descendant.

    python -m bench.service --workload full --checkpoint DIR --output out.json
    python -m bench.service --engine llama_cpp --checkpoint GGUF_DIR --output out.json

``--engine llama_cpp`` serves serve_config.llama_cpp.yaml's application (engine llama_cpp)
from a ``gguf`` checkpoint instead of serve_config.yaml's; everything else is the same.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from bench.coldstart import vm_hwm_bytes
from bench.loadgen import HandleTarget, HttpTarget, closed_loop, mixed
from bench.machine import ForeignLoad, measure_quietly_async
from bench.ray_tuning import apply_ray_tuning
from bench.stats import RequestRecord, median, percentile, ratio, summarize
from bench.workload import WORKLOADS, Workload

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "llm"
# The shipped config of each engine (serve_config.llama_cpp.yaml is rendered from the other).
CONFIG_FILES = {"ipex_llm": "serve_config.yaml", "llama_cpp": "serve_config.llama_cpp.yaml"}
IDLE_TIMEOUT_S = 120.0


def _log(message: str) -> None:
    print(f"[service] {message}", file=sys.stderr, flush=True)


# ---- configuration ----------------------------------------------------------------------


def shipped_options(checkpoint: str, config_file: str = CONFIG_FILES["ipex_llm"]
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A shipped config's (serve_config.yaml by default) application args and LLMServer
    options, for one fixed replica serving ``checkpoint``.

    Autoscaling is replaced by one replica: this host is one slot, and a benchmark must not
    change its capacity mid-run. The request deadline is raised so a deep closed-loop queue
    on a loaded machine measures latency instead of timing out.
    """
    config = yaml.safe_load((REPO_ROOT / config_file).read_text())
    app = next(a for a in config["applications"] if a["name"] == APP_NAME)
    args = {**app["args"], "checkpoint_path": checkpoint, "request_timeout_s": 600.0}
    server = next(d for d in app.get("deployments", []) if d["name"] == "LLMServer")
    options = {k: v for k, v in server.items() if k not in ("name", "autoscaling_config")}
    options["num_replicas"] = 1
    return args, options


# ---- process accounting -----------------------------------------------------------------


def _label(proc: psutil.Process) -> str:
    try:
        title = proc.cmdline()[0] if proc.cmdline() else proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]  # Ray appends the running method
    if proc.pid == os.getpid():
        return "benchmark client (driver)"
    return Path(title).name


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process and every descendant (Ray's processes included)."""
    me = psutil.Process()
    result = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            result[proc.pid] = (_label(proc), times.user + times.system)
        except psutil.NoSuchProcess:
            continue
    return result


def cpu_shares(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
               seconds: float) -> dict[str, float]:
    """Cores used per process kind between two snapshots (largest first, >= 0.01)."""
    shares: collections.Counter[str] = collections.Counter()
    for pid, (label, spent) in after.items():
        shares[label] += spent - before.get(pid, (label, 0.0))[1]
    return {k: round(v / seconds, 3) for k, v in shares.most_common() if v / seconds >= 0.01}


# ---- the service ------------------------------------------------------------------------


class Service:
    """The shipped application on a fresh local Ray, deployed ``starts`` times (deleted in
    between) to time start-up; start-up figures are medians, with every start's value
    under the same key + ``_runs``."""

    def __init__(self, checkpoint: str, config_file: str = CONFIG_FILES["ipex_llm"],
                 starts: int = 1):
        import ray
        from ray import serve

        from tests.helpers import free_port

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.startup: dict[str, Any] = {}
        self.startup["ray_tuning"] = apply_ray_tuning()  # as `make serve` runs it
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        self.startup["ray_init_s"] = time.perf_counter() - t0
        self._record_runs("bare_actor_start_s",
                          [self._bare_actor_start() for _ in range(starts)])
        # A runtime_env rules out Ray's prestarted idle workers: the actor waits for a new
        # worker process (why bind_app hands the replicas their metrics directory instead).
        self.startup["bare_actor_with_runtime_env_start_s"] = self._bare_actor_start(
            {"env_vars": {"BENCH_FRESH_WORKER": str(time.time_ns())}})
        t0 = time.perf_counter()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.startup["serve_start_s"] = time.perf_counter() - t0
        args, options = shipped_options(checkpoint, config_file)
        self.config_args, self.server_options = args, options
        llm_config, app = self._bind()
        self.startup["max_stream_chunks_per_s"] = llm_config.max_stream_chunks_per_s
        runs = [_run_until_running(app)]
        for _ in range(starts - 1):
            serve.delete(APP_NAME)  # router and replica go; the next start makes both anew
            runs.append(_run_until_running(self._bind()[1]))
        self._record_runs("serve_run_to_ready_s", [ready for ready, _ in runs])
        self._record_runs("serve_run_returned_s", [returned for _, returned in runs])
        self._record_runs("replica_constructor_s", _replica_ready_log_seconds())
        health = self.health()
        self.replica_pid = int(health["replica"]["pid"])
        self.startup["replica_pid"] = self.replica_pid
        self.startup["replica_vm_hwm_ready_bytes"] = vm_hwm_bytes(self.replica_pid)
        self.startup["replica_pinning"] = health["replica"].get("pinning")
        self._server = serve.get_deployment_handle("LLMServer", app_name=APP_NAME)

    def _record_runs(self, key: str, runs: list[float]) -> None:
        self.startup[f"{key[:-2]}_runs_s"] = [round(run, 3) for run in runs]
        self.startup[key] = median(runs) if runs else None

    @staticmethod
    def _bare_actor_start(runtime_env: dict[str, Any] | None = None) -> float:
        """A trivial Ray actor, created and answering: the floor of any replica's start."""
        import ray

        @ray.remote(num_cpus=0)
        class Ping:
            def pid(self) -> int:
                return os.getpid()

        t0 = time.perf_counter()
        actor = Ping.options(runtime_env=runtime_env).remote() if runtime_env \
            else Ping.remote()
        ray.get(actor.pid.remote())
        seconds = time.perf_counter() - t0
        ray.kill(actor)
        return seconds

    def _bind(self, **overrides: Any) -> tuple[Any, Any]:
        """The shipped application (its LLMConfig and the bound app), some args changed."""
        from deployments.app import bind_app
        from deployments.config import LLMConfig

        config = LLMConfig.model_validate({**self.config_args, **overrides})
        return config, bind_app(config, server_options=self.server_options)

    def redeploy(self, **overrides: Any) -> None:
        """The same application with some args changed (``serve.run`` returns when the new
        replica is ready; the old one is gone)."""
        from ray import serve

        serve.run(self._bind(**overrides)[1], name=APP_NAME, route_prefix="/")
        self.replica_pid = int(self.health()["replica"]["pid"])

    def health(self) -> dict[str, Any]:
        response = httpx.get(f"{self.base_url}/health", timeout=30)
        response.raise_for_status()
        return response.json()

    async def wait_idle(self) -> None:
        """Until the replica runs and queues nothing (aborted requests leave at a step)."""
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        async with httpx.AsyncClient(timeout=30) as client:
            while time.monotonic() < deadline:
                response = await client.get(f"{self.base_url}/health")
                replica = response.json().get("replica", {})
                if response.status_code == 200 and not replica.get("running") \
                        and not replica.get("waiting"):
                    return
                await asyncio.sleep(0.2)
        _log("replica still busy after the idle timeout; continuing")

    async def batch_sizes(self) -> collections.Counter[int]:
        stats = await self._server.stats.remote()
        return collections.Counter({int(k): v for k, v in stats["batch_sizes"].items()})

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _run_until_running(app: Any, poll_s: float = 0.05) -> tuple[float, float]:
    """``serve.run(app)`` (the first deploy of APP_NAME): seconds until Serve reported the
    application RUNNING (every deployment's replicas ready), polled every ``poll_s``, and
    until ``serve.run`` returned. serve.run polls once a second (Ray's
    CLIENT_POLLING_INTERVAL_S), so its return rounds start-up up by as much as a second."""
    from ray import serve

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        deploy = pool.submit(serve.run, app, name=APP_NAME, route_prefix="/")
        running = None
        while running is None and not deploy.done():
            application = serve.status().applications.get(APP_NAME)
            if application is not None and application.status == "RUNNING":
                running = time.perf_counter() - started
            else:
                time.sleep(poll_s)
        deploy.result()  # a failed deploy raises here
        returned = time.perf_counter() - started
    return (returned if running is None else running), returned


def _replica_ready_log_seconds() -> list[float]:
    """Each LLMServer constructor's own "ready in X s" (slot claim, pinning, engine load),
    from this Ray session's replica logs, oldest first."""
    import ray

    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path())
    except AttributeError:
        return []
    found = []
    logs = session.glob("logs/serve/replica_*LLMServer*.log")
    for log in sorted(logs, key=lambda path: path.stat().st_mtime):
        match = re.search(r"LLMServer ready in ([0-9.]+) s", log.read_text(errors="replace"))
        if match:
            found.append(float(match.group(1)))
    return found


def _mean_batch(before: collections.Counter[int], after: collections.Counter[int]
                ) -> float | None:
    steps = {k: after[k] - before.get(k, 0) for k in after}
    total = sum(steps.values())
    return round(sum(k * v for k, v in steps.items()) / total, 2) if total else None


def _level_timeout(work: Workload, clients: int, max_tokens: int) -> float:
    """Generous: every token at 5 tok/s, plus a minute."""
    return 60 + work.rounds(clients) * clients * max_tokens / 5


# Server-side histograms (deployments.metrics) whose mean per level the report shows next to
# the client's view: the gap between the two is transport (Ray, proxy, router, client).
_SERVER_HISTOGRAMS = {"ttft": "llm_time_to_first_token_seconds",
                      "queue": "llm_request_queue_time_seconds",
                      "itl": "llm_inter_token_latency_seconds",
                      "e2e": "llm_e2e_request_latency_seconds"}


def parse_histogram_sums(text: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each server histogram in a Prometheus exposition, over all series."""
    totals = {key: [0.0, 0.0] for key in _SERVER_HISTOGRAMS}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        for key, metric in _SERVER_HISTOGRAMS.items():
            if name == f"{metric}_sum":
                totals[key][0] += float(value)
            elif name == f"{metric}_count":
                totals[key][1] += float(value)
    return {k: (v[0], v[1]) for k, v in totals.items()}


def server_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
                 ) -> dict[str, float | None]:
    means: dict[str, float | None] = {}
    for key in _SERVER_HISTOGRAMS:
        total = after[key][0] - before[key][0]
        count = after[key][1] - before[key][1]
        means[f"server_{key}_mean_s"] = total / count if count > 0 else None
    return means


async def _scrape(service: Service) -> dict[str, tuple[float, float]]:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"{service.base_url}/metrics")
    return parse_histogram_sums(response.text)


async def sweep(service: Service, make_target: Any, clients_list: tuple[int, ...],
                work: Workload, label: str) -> list[dict[str, Any]]:
    rows = []
    async with make_target() as target:
        for clients in clients_list:
            await service.wait_idle()
            await closed_loop(target.issue, clients=clients, rounds=1, max_tokens=4,
                              timeout_s=120)  # warm: this batch size's shapes, connections

            async def measure(clients: int = clients) -> dict[str, Any]:
                await service.wait_idle()
                batches_before = await service.batch_sizes()
                metrics_before = await _scrape(service)
                cpu_before = cpu_by_process()
                started = time.perf_counter()
                records = await closed_loop(
                    target.issue, clients=clients, rounds=work.rounds(clients),
                    max_tokens=work.max_tokens,
                    timeout_s=_level_timeout(work, clients, work.max_tokens))
                seconds = time.perf_counter() - started
                cpu = cpu_shares(cpu_before, cpu_by_process(), seconds)
                good = [r for r in records if r.ok]
                return {**summarize(records, clients).as_dict(),
                        "ttft_mean_s": sum(r.ttft for r in good) / len(good) if good else None,
                        **server_means(metrics_before, await _scrape(service)),
                        "mean_engine_batch": _mean_batch(batches_before,
                                                         await service.batch_sizes()),
                        "cpu_cores_by_process": cpu,
                        "first_errors": [r.error for r in records if not r.ok][:3]}

            row = await measure_quietly_async(measure)
            rows.append(row)
            _log(f"{label} clients={clients}: {row['tokens_per_s']:.1f} tok/s, "
                 f"ttft p50 {row['ttft_p50_s']:.3f} s (server mean "
                 f"{row['server_ttft_mean_s'] or 0:.3f}), errors {row['errors']}, "
                 f"foreign {row['foreign_cores']} (attempts {row['attempts']})")
    return rows


def _latencies(records: list[RequestRecord]) -> dict[str, float]:
    good = [r for r in records if r.ok]
    return {"requests": len(good), "errors": len(records) - len(good),
            "e2e_p50_s": percentile([r.e2e for r in good], 50),
            "e2e_p99_s": percentile([r.e2e for r in good], 99),
            "ttft_p50_s": percentile([r.ttft for r in good], 50)}


async def mixed_workload(service: Service, work: Workload) -> dict[str, Any]:
    """Short requests' latency alone, then next to long ones, over HTTP."""
    async with HttpTarget(service.base_url, work.model_name, work.prompt) as target:
        await closed_loop(target.issue, clients=work.mixed_short_clients, rounds=1,
                          max_tokens=4, timeout_s=120)

        async def measure() -> dict[str, Any]:
            await service.wait_idle()
            load = ForeignLoad().start()
            alone = await closed_loop(target.issue, clients=work.mixed_short_clients,
                                      rounds=work.mixed_short_requests_per_client,
                                      max_tokens=work.mixed_short_tokens, timeout_s=600)
            alone_load = load.stop()
            await service.wait_idle()
            long_alone = await closed_loop(target.issue, clients=work.mixed_long_clients,
                                           rounds=1, max_tokens=work.mixed_long_tokens,
                                           timeout_s=600)
            await service.wait_idle()
            load = ForeignLoad().start()
            short, long = await mixed(
                target.issue, long_clients=work.mixed_long_clients,
                long_tokens=work.mixed_long_tokens, short_clients=work.mixed_short_clients,
                short_tokens=work.mixed_short_tokens,
                short_rounds=work.mixed_short_requests_per_client, timeout_s=900)
            mixed_load = load.stop()
            await service.wait_idle()
            # The long requests that were running when the first short one came: next to
            # short ones for much of their life.
            first_short = min((r.started for r in short), default=math.inf)
            return {"short_alone": {**_latencies(alone), **alone_load},
                    "short_mixed": {**_latencies(short), **mixed_load},
                    "long_alone": _latencies(long_alone),
                    "long_mixed": _latencies([r for r in long if r.started < first_short])}

        result = await measure_quietly_async(measure)

    for kind in ("short", "long"):
        result[f"{kind}_p50_ratio"] = ratio(result[f"{kind}_mixed"]["e2e_p50_s"],
                                            result[f"{kind}_alone"]["e2e_p50_s"])
        _log(f"mixed: {kind} p50 {result[f'{kind}_alone']['e2e_p50_s']:.2f} s alone, "
             f"{result[f'{kind}_mixed']['e2e_p50_s']:.2f} s mixed "
             f"({result[f'{kind}_p50_ratio']:.2f}x)")
    return result


# ---- py-spy -----------------------------------------------------------------------------

# Categories of the replica's busy samples, by engine: a stack counts for the innermost
# frame that matches one (function name and file).
_SHARED_CATEGORIES = (
    ("engine step bookkeeping", "step", "deployments/engine/batching.py"),
    ("engine loop (inbox, hand-off)", "_run", "deployments/engine_loop.py"),
    ("replica event loop: generate_stream", "generate_stream", "deployments/server.py"),
)
_REPLICA_CATEGORIES = (
    ("low-bit matmul (ggml)", "ggml_matmul_src1_x_src0_t", "low_bit_linear.py"),
    ("low-bit matmul (dequant + sgemm)", "ggml_int4_convert_fp32", "low_bit_linear.py"),
    ("attention: repeat_kv (GQA copies)", "repeat_kv", "ipex_llm/transformers/models"),
    ("model forward, other", "_forward", "deployments/engine/ipex_llm.py"),
    ("sampling", "_sample", "deployments/engine/ipex_llm.py"),
    ("detokenize + stop strings", "_decode_text", "deployments/engine/ipex_llm.py"),
    ("KV join", "_join_pending", "deployments/engine/ipex_llm.py"),
    ("KV drop rows", "_drop_rows", "deployments/engine/ipex_llm.py"),
    ("prefill (rest)", "_prefill", "deployments/engine/ipex_llm.py"),
    *_SHARED_CATEGORIES,
)
# LlamaCppEngine: the model is one native llama_decode per step, inside _run (py-spy without
# --native stops at that Python frame).
_LLAMA_CPP_REPLICA_CATEGORIES = (
    ("model forward (llama_decode, in _run)", "_run", "deployments/engine/llama_cpp.py"),
    ("sampling", "_sample", "deployments/engine/llama_cpp.py"),
    ("detokenize + stop strings", "_decode_text", "deployments/engine/llama_cpp.py"),
    ("slot release (KV seq_rm)", "_release", "deployments/engine/llama_cpp.py"),
    ("prefill (rest)", "_prefill", "deployments/engine/llama_cpp.py"),
    ("decode (rest)", "_decode", "deployments/engine/llama_cpp.py"),
    *_SHARED_CATEGORIES,
)
REPLICA_CATEGORIES = {"ipex_llm": _REPLICA_CATEGORIES, "llama_cpp": _LLAMA_CPP_REPLICA_CATEGORIES}


def _pyspy_record(pid: int, seconds: int, output: Path) -> subprocess.Popen | None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return None
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "50",
         "--format", "raw", "--output", str(output), "--nonblocking", "--threads"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def summarize_pyspy(raw: str, categories: tuple[tuple[str, str, str], ...] = (),
                    thread: str | None = None) -> dict[str, Any]:
    """Busy samples of a ``py-spy record --format raw`` profile (of the threads whose name
    contains ``thread``, if given): the share of each category (a stack counts for the
    innermost frame that matches one: function name and file), and the top leaf functions."""
    total = 0
    by_category: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if thread is not None and thread not in frames[0]:
            continue
        count = int(count_text)
        total += count
        leaves[frames[-1]] += count
        by_category[_category(frames, categories)] += count
    if not total:
        return {"samples": 0}
    return {"samples": total,
            "by_category": {k: round(v / total, 3) for k, v in by_category.most_common()},
            "top_leaves": [(k, round(v / total, 3)) for k, v in leaves.most_common(8)]}


def _category(frames: list[str], categories: tuple[tuple[str, str, str], ...]) -> str:
    for frame in reversed(frames):
        qualified, _, location = frame.partition(" (")
        function = qualified.rsplit(".", 1)[-1]  # py-spy shows Class.method
        for name, wanted, file in categories:
            if function == wanted and file in location:
                return name
    return "other"


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` (/proc/PID/task/TID/stat utime + stime)."""
    ticks = os.sysconf("SC_CLK_TCK")
    result = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        result[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return result


def pyspy_thread_names(raw: str) -> dict[int, str]:
    """Thread ids and names from the root frames of ``py-spy record --threads`` output."""
    names = {}
    for match in re.finditer(r"^thread \((\d+)\)(?:: ([^;]*))?;", raw, re.MULTILINE):
        names[int(match.group(1))] = match.group(2) or "?"
    return names


async def pyspy_profile(service: Service, work: Workload, clients: int,
                        categories: tuple[tuple[str, str, str], ...] = _REPLICA_CATEGORIES
                        ) -> dict[str, Any]:
    """py-spy on the replica and the router while ``clients`` HTTP clients run (unmeasured:
    sampling costs CPU), and the CPU each replica thread used meanwhile (/proc: py-spy's
    own idle detection counts some waiting Ray threads as busy)."""
    router_pid = next((pid for pid, (label, _) in cpu_by_process().items()
                       if label.endswith("LLMRouter")), None)
    scratch = Path(tempfile.mkdtemp(prefix="bench-pyspy-"))
    procs = {}
    async with HttpTarget(service.base_url, work.model_name, work.prompt) as target:
        await closed_loop(target.issue, clients=clients, rounds=1, max_tokens=4, timeout_s=120)
        await service.wait_idle()
        threads_before = thread_cpu_seconds(service.replica_pid)
        started = time.perf_counter()
        for name, pid in (("replica", service.replica_pid), ("router", router_pid)):
            if pid is not None:
                procs[name] = _pyspy_record(pid, work.pyspy_seconds, scratch / f"{name}.txt")
        if not any(procs.values()):
            return {"note": "py-spy not found"}
        stop_at = time.monotonic() + work.pyspy_seconds + 2
        while time.monotonic() < stop_at:
            await closed_loop(target.issue, clients=clients, rounds=1,
                              max_tokens=work.max_tokens, timeout_s=300)
        seconds = time.perf_counter() - started
        threads_after = thread_cpu_seconds(service.replica_pid)
    result: dict[str, Any] = {"clients": clients, "seconds": work.pyspy_seconds}
    for name, proc in procs.items():
        if proc is None:
            continue
        _, stderr = proc.communicate(timeout=120)
        path = scratch / f"{name}.txt"
        if not path.exists():
            result[name] = {"note": f"py-spy failed: {stderr.strip()[-300:]}"}
            continue
        raw = path.read_text()
        if name == "replica":
            result[name] = summarize_pyspy(raw, categories, thread="llm-engine-loop")
            names = pyspy_thread_names(raw)
            cores = {tid: (after - threads_before.get(tid, 0.0)) / seconds
                     for tid, after in threads_after.items()}
            result["replica_threads_cores"] = [
                (names.get(tid, "native (OpenMP/ggml worker or Ray C++)"), round(c, 3))
                for tid, c in sorted(cores.items(), key=lambda kv: -kv[1]) if c >= 0.005]
        else:
            result[name] = summarize_pyspy(raw)
    shutil.rmtree(scratch, ignore_errors=True)
    await service.wait_idle()
    return result


# ---- main -------------------------------------------------------------------------------


async def run(service: Service, work: Workload, engine: str = "ipex_llm") -> dict[str, Any]:
    result: dict[str, Any] = {}
    result["http"] = await sweep(
        service, lambda: HttpTarget(service.base_url, work.model_name, work.prompt),
        work.http_clients, work, "http")
    result["handle"] = await sweep(
        service, lambda: HandleTarget(APP_NAME, work.model_name, work.prompt),
        work.handle_clients, work, "handle")
    result["mixed"] = await mixed_workload(service, work)
    if work.pyspy_seconds:
        result["pyspy"] = await pyspy_profile(service, work, clients=8,
                                              categories=REPLICA_CATEGORIES[engine])
    result["replica_vm_hwm_end_bytes"] = vm_hwm_bytes(service.replica_pid)
    if engine == "llama_cpp" and work.pacing_clients:
        result["per_token_chunks"] = await per_token_chunks(service, work)
    return result


async def per_token_chunks(service: Service, work: Workload) -> list[dict[str, Any]]:
    """What the replica's chunk pacing buys: the same HTTP levels with a chunk per engine
    step (``max_stream_chunks_per_s: null``), on a redeployed replica."""
    service.redeploy(max_stream_chunks_per_s=None)
    return await sweep(
        service, lambda: HttpTarget(service.base_url, work.model_name, work.prompt),
        work.pacing_clients, work, "http, per-token chunks")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="full")
    parser.add_argument("--checkpoint", required=True,
                        help="an ipex_llm checkpoint, or a gguf one for --engine llama_cpp")
    parser.add_argument("--engine", choices=sorted(CONFIG_FILES), default="ipex_llm",
                        help="which shipped config to serve: " +
                             ", ".join(f"{k}: {v}" for k, v in CONFIG_FILES.items()))
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    work = WORKLOADS[args.workload]
    config_file = CONFIG_FILES[args.engine]
    configured = shipped_options(args.checkpoint, config_file)[0].get("engine", "ipex_llm")
    if configured != args.engine:
        parser.error(f"{config_file} runs engine {configured}, not {args.engine}")
    os.environ.pop("RAY_ADDRESS", None)  # a cluster of our own, never someone else's
    started = time.perf_counter()
    service = Service(args.checkpoint, config_file, starts=work.ready_starts)
    result: dict[str, Any] = {"engine": args.engine, "config_file": config_file,
                              "startup": service.startup,
                              "config_args": service.config_args,
                              "server_options": service.server_options}
    _log(f"started: {service.startup}")
    try:
        result.update(asyncio.run(run(service, work, args.engine)))
        result["startup"]["replica_vm_hwm_end_bytes"] = result.pop("replica_vm_hwm_end_bytes", None)
    finally:
        result["seconds"] = time.perf_counter() - started
        Path(args.output).write_text(json.dumps(result, indent=1, default=str))
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
