"""The machine a benchmark ran on, and how busy other people's processes kept it.

The development machines are shared: ``ForeignLoad`` measures, over a measured interval,
the CPU time the whole machine spent minus what this benchmark's process tree spent, in
cores. A number near 0 means a quiet machine; near the core count, numbers are not
comparable with a quiet run. Every section records it next to its results.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.metadata
import os
import platform
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

# run.py exports its PID: every section's process tree hangs below it.
ROOT_PID_ENV = "BENCH_ROOT_PID"
# A measurement during which other processes used this many cores or more is disturbed:
# measured once more, and the quieter of the two attempts is kept. The model runs one
# OpenMP thread per core, so a little foreign load costs a lot: 0.1-0.2 cores of it slowed
# batch-8 decoding by about 15% in our probe.
# run.py sets BENCH_MEASUREMENT_ATTEMPTS=1 for --quick, which must stay short.
DISTURBED_CORES = 0.2
MEASUREMENT_ATTEMPTS = int(os.environ.get("BENCH_MEASUREMENT_ATTEMPTS", "2"))


def quieter(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Of two measurements carrying ``foreign_cores``, the one taken on a quieter machine."""
    return b if a is None or b["foreign_cores"] < a["foreign_cores"] else a


def disturbed(measurement: dict[str, Any]) -> bool:
    return measurement["foreign_cores"] >= DISTURBED_CORES


def machine_info() -> dict[str, object]:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                   check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    versions = {}
    for package in ("torch", "ipex-llm", "transformers", "ray", "llama-cpp-python"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": _git_commit(),
        "versions": versions,
    }


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _busy_seconds() -> float:
    """CPU time the whole machine spent outside idle/iowait since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    ticks = os.sysconf("SC_CLK_TCK")
    # guest time is already counted in user/nice
    return (sum(values[:8]) - idle) / ticks


def _tree_seconds(root_pid: int) -> float:
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


class ForeignLoad:
    """CPU cores used by processes outside our tree between ``start`` and ``stop``.

    Processes of our tree that exit meanwhile take their CPU time with them and count as
    foreign, so this errs towards reporting a busier machine, never a quieter one.
    """

    def __init__(self, root_pid: int | None = None):
        self._root = root_pid or int(os.environ.get(ROOT_PID_ENV, os.getpid()))
        self._started: tuple[float, float, float] | None = None

    def start(self) -> ForeignLoad:
        self._started = (time.monotonic(), _busy_seconds(), _tree_seconds(self._root))
        return self

    def stop(self) -> dict[str, float]:
        assert self._started is not None
        t0, busy0, ours0 = self._started
        wall = time.monotonic() - t0
        busy = _busy_seconds() - busy0
        ours = _tree_seconds(self._root) - ours0
        return {"foreign_cores": round(max(busy - ours, 0.0) / wall, 2) if wall > 0 else 0.0,
                "own_cores": round(ours / wall, 2) if wall > 0 else 0.0,
                "loadavg_1m": round(os.getloadavg()[0], 2)}


async def measure_quietly_async(measure: Callable[[], Awaitable[dict[str, Any]]]
                                ) -> dict[str, Any]:
    """``await measure()`` with the foreign load during it; repeated once if the machine was
    busy, keeping the quieter attempt (``attempts`` says how many ran)."""
    best: dict[str, Any] | None = None
    for attempt in range(1, MEASUREMENT_ATTEMPTS + 1):
        load = ForeignLoad().start()
        result = await measure()
        result.update(load.stop(), attempts=attempt)
        best = quieter(best, result)
        if not disturbed(result):
            break
    assert best is not None
    return best


def measure_quietly(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure_quietly_async`` for a plain function, from code that runs no event loop.
    ``measure`` runs in the calling thread (torch's OpenMP pool belongs to it)."""
    async def in_this_thread() -> dict[str, Any]:
        return measure()

    return asyncio.run(measure_quietly_async(in_this_thread))
