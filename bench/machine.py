"""The machine a benchmark ran on, how busy other processes kept it, and the processes the
benchmark starts.

The development machines are shared: ``measure_quietly`` records, over a measurement, the
CPU time the whole machine spent minus what the benchmark's process tree spent (rooted at
$BENCH_ROOT_PID, which ``bench.run`` sets to itself, else this process), in cores. A
server the benchmark did not start counts as other load. Near 0: a quiet machine; near the
core count, figures are not comparable with a quiet run.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib.metadata
import os
import platform
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

ROOT_PID_ENV = "BENCH_ROOT_PID"
# A measurement during which other processes used this many cores or more is disturbed: it
# is measured once more and the quieter attempt kept (the model runs one OpenMP thread per
# core, so a little other load costs a lot). --quick sets BENCH_MEASUREMENT_ATTEMPTS=1.
DISTURBED_CORES = 0.2


def quieter(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Of two measurements carrying ``foreign_cores``, the one taken on a quieter machine."""
    return b if a is None or b["foreign_cores"] < a["foreign_cores"] else a


def disturbed(measurement: dict[str, Any]) -> bool:
    return measurement["foreign_cores"] >= DISTURBED_CORES


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vm_hwm_bytes(pid: int | str = "self") -> int | None:
    """Peak resident set size of a process (VmHWM in /proc/PID/status), in bytes."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def stop_tree(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """End a process this benchmark started and every process below it, by PID: SIGTERM
    first (bench.service shuts Ray down on it), SIGKILL for what is left after the timeout."""
    try:
        root = psutil.Process(process.pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        root.send_signal(signal.SIGTERM)
    psutil.wait_procs([root], timeout=timeout_s)
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    process.wait()


def machine_info() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    versions = {}
    for package in ("torch", "ipex-llm", "transformers", "ray", "llama-cpp-python"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    return {"cpu_model": next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                               if line.startswith("Model name:")), "unknown"),
            "logical_cpus": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "git_commit": _git_commit(), "versions": versions}


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_seconds(root_pid: int) -> tuple[float, float, float]:
    """(now, CPU seconds the machine spent busy since boot, CPU seconds of our tree)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # not idle/iowait
    ours = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(root_pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                ours += sum(proc.cpu_times()[:2])
    return time.monotonic(), busy, ours


async def measure_quietly_async(measure: Callable[[], Awaitable[dict[str, Any]]]
                                ) -> dict[str, Any]:
    """``await measure()``, adding ``foreign_cores`` (the other load meanwhile; our processes
    that exit meanwhile count as other load) and ``attempts``: repeated once if the machine
    was busy, keeping the quieter attempt."""
    root = int(os.environ.get(ROOT_PID_ENV, os.getpid()))
    best: dict[str, Any] | None = None
    for attempt in range(1, int(os.environ.get("BENCH_MEASUREMENT_ATTEMPTS", "2")) + 1):
        before = _cpu_seconds(root)
        result = await measure()
        wall, busy, ours = (b - a for a, b in zip(before, _cpu_seconds(root), strict=True))
        result.update(foreign_cores=round(max(busy - ours, 0.0) / wall, 2), attempts=attempt)
        best = quieter(best, result)
        if not disturbed(result):
            break
    assert best is not None
    return best


def measure_quietly(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure_quietly_async`` for a plain function, run in the calling thread (torch's
    OpenMP pool belongs to it)."""
    async def in_this_thread() -> dict[str, Any]:
        return measure()

    return asyncio.run(measure_quietly_async(in_this_thread))


def emit_result(result: Any, out: Path | None) -> None:
    """A bench CLI's result model as JSON: into ``out`` when given, else on stdout."""
    text = result.model_dump_json(indent=1)
    if out:
        out.write_text(text + "\n")
    else:
        print(text)
