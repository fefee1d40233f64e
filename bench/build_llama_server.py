"""llama.cpp's `llama-server`, the peer a CPU user would pick: built once into bench/.cache/,
and run on loopback for the benchmark.

The source is the llama.cpp vendored in the llama-cpp-python sdist on PyPI (the only
package index these machines reach). A build takes about 20 minutes on 2 cores, so it
runs under `nice -n 19` (the machine is shared) and the result is cached: `bench.run`
uses the binary when it is there and skips llama-server with a note when not.

    python -m bench.build_llama_server          # build (no-op when the binary exists)
    python -m bench.build_llama_server --force  # rebuild
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx

from bench.machine import free_port, stop_tree, vm_hwm_bytes

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
SOURCE_DIR = CACHE_DIR / "src"
BUILD_DIR = CACHE_DIR / "llama-build"
LLAMA_SERVER_BIN = CACHE_DIR / "bin" / "llama-server"
# llama.cpp's quantizer, built beside the server: it makes the 1.1B model's GGUF Q4_0.
LLAMA_QUANTIZE_BIN = CACHE_DIR / "bin" / "llama-quantize"
BUILD_LOG = CACHE_DIR / "llama-build.log"

# Static, CPU-only, no network at build time (no HF UI download, no OpenSSL/curl), only
# what the server needs.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
)


def llama_server_path() -> Path | None:
    """The cached binary, or None when it has not been built."""
    binaries = (LLAMA_SERVER_BIN, LLAMA_QUANTIZE_BIN)
    if all(path.is_file() and os.access(path, os.X_OK) for path in binaries):
        return LLAMA_SERVER_BIN
    return None


def _run(cmd: list[str], log: TextIO) -> None:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def _source_tree(log: TextIO) -> Path:
    tree = SOURCE_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    SOURCE_DIR.mkdir(parents=True, exist_ok=True)
    sdist = SOURCE_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(SOURCE_DIR)], log)
    with tarfile.open(sdist) as tar:
        tar.extractall(SOURCE_DIR, filter="data")
    return tree


def build(force: bool = False, jobs: int | None = None) -> Path:
    """Download, configure and build llama-server; return the cached binary's path."""
    if not force and (existing := llama_server_path()):
        return existing
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    started = time.monotonic()
    with open(BUILD_LOG, "a") as log:
        tree = _source_tree(log)
        nice = ["nice", "-n", "19"]
        generator = "Ninja" if shutil.which("ninja") else "Unix Makefiles"
        _run([*nice, "cmake", "-S", str(tree), "-B", str(BUILD_DIR), "-G", generator,
              *CMAKE_OPTIONS], log)
        _run([*nice, "cmake", "--build", str(BUILD_DIR), "--target", "llama-server",
              "llama-quantize", "-j", str(jobs)], log)
        for binary in (LLAMA_QUANTIZE_BIN, LLAMA_SERVER_BIN):
            binary.parent.mkdir(parents=True, exist_ok=True)
            staging = binary.with_suffix(".tmp")
            shutil.copy2(BUILD_DIR / "bin" / binary.name, staging)
            os.replace(staging, binary)  # readers never see a half-copied binary
        log.write(f"\nbuilt {LLAMA_SERVER_BIN} in {time.monotonic() - started:.0f} s\n")
    return LLAMA_SERVER_BIN


@contextlib.contextmanager
def running(gguf: str, slots: int = 8, ready_timeout_s: float = 120.0, *,
            threads: int | None = None, spare_cpus: list[int] | None = None,
            compute_cpus: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """The built llama-server on a free loopback port (``threads`` compute threads, by
    default a thread per CPU this process may use, as engine llama_cpp runs; ``slots``
    parallel slots of 512 context tokens; continuous batching; prompt cache at its default,
    on) until the block ends: ``url``, ``command``, ``pid``, ``ready_s``, and after the block
    ``peak_rss_bytes``.

    With ``spare_cpus`` and ``compute_cpus``, the server starts on the spare CPUs and, once
    ready, its main thread, which runs every decode (the first of its compute threads), moves
    to the compute CPUs; its HTTP threads stay spare. Meant for one compute thread."""
    binary = llama_server_path()
    if binary is None:
        raise FileNotFoundError("llama-server is not built: python -m bench.build_llama_server")
    port, threads = free_port(), threads or len(os.sched_getaffinity(0))
    command = [str(binary), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
               "-t", str(threads), "-tb", str(threads), "-np", str(slots),
               "-c", str(512 * slots), "-cb", "--no-webui", "--log-disable"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True,
                               preexec_fn=(lambda: os.sched_setaffinity(0, spare_cpus))
                               if spare_cpus else None)
    info: dict[str, Any] = {"url": f"http://127.0.0.1:{port}", "command": " ".join(command),
                            "pid": process.pid}
    started = time.perf_counter()
    try:
        while "ready_s" not in info:
            if process.poll() is not None or time.perf_counter() - started > ready_timeout_s:
                raise RuntimeError(f"llama-server exited ({process.returncode}) or not ready")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{info['url']}/health", timeout=5).status_code == 200:
                    info["ready_s"] = time.perf_counter() - started
            time.sleep(0.1)
        if compute_cpus:
            os.sched_setaffinity(process.pid, compute_cpus)  # the main thread only
            info["compute_cpus"], info["spare_cpus"] = compute_cpus, spare_cpus
        yield info
        info["peak_rss_bytes"] = vm_hwm_bytes(process.pid)
    finally:
        stop_tree(process, timeout_s=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs")
    args = parser.parse_args(argv)
    print(f"building llama-server (log: {BUILD_LOG}) ...", flush=True)
    try:
        path = build(force=args.force, jobs=args.jobs)
    except subprocess.CalledProcessError as exc:
        print(f"build failed ({exc}); see {BUILD_LOG}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
