"""`make bench`: every measurement on the demo model, then RESULTS.md and the plot.

    python -m bench.run                # full run (about 30 minutes on 2 quiet cores)
    python -m bench.run --quick        # smoke check, into bench/.cache/quick/
    python -m bench.run --sections service_ipex_llm,llama_server   # a subset

Sections (SECTIONS): each engine alone (bench.engine; ipex_llm also with ipex-llm's
batched generate), cold start (bench.coldstart), our service on each engine (bench.service,
measured over HTTP by bench.loadgen, the mixed workload included), llama.cpp's server on
the same GGUF (once ``python -m bench.build_llama_server`` has built it, or with
--build-llama), and alternating turns: engine llama_cpp's service vs llama-server, and
engine ipex_llm's service at 8 clients vs ipex-llm's generate at batch 8 and 1. Every
server starts afresh for its section or turn, alone on the machine. A section that cannot
run here is skipped with the reason, one that fails is recorded as failed; the run goes on.
results.json holds summaries only (bench.loadgen's and bench.engine's models, start-up
figures); bench.report renders RESULTS.md and throughput.png from it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import build_llama_server, loadgen, pinned
from bench.coldstart import median_load
from bench.engine import EngineRun
from bench.machine import ROOT_PID_ENV, machine_info, stop_tree
from bench.report import write_report

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SECTIONS = ("engine_ipex_llm", "engine_llama_cpp", "coldstart", "service_ipex_llm",
            "service_llama_cpp", "llama_server", "turns_llama_cpp", "turns_ipex_llm",
            "structured", "pinned_demo", "pinned_1b")
# The 1.1B model decodes ~8x slower than the demo model: shorter answers keep its section
# within minutes (lengths stay fixed with ignore_eos).
WORK_1B = {"max_tokens": 32, "min_requests": 8}
WORKLOADS = {
    "full": {"max_tokens": 128, "clients": [1, 8, 16], "min_requests": 12,
             "engine_batches": [1, 4, 8, 16], "generate": [1, 8, 16], "mixed_clients": 4,
             "mixed_rounds": 8, "turns": 3, "turn_clients": [8, 16], "starts": 3},
    "quick": {"max_tokens": 16, "clients": [1, 8], "min_requests": 4,
              "engine_batches": [1, 8], "generate": [1, 8], "mixed_clients": 2,
              "mixed_rounds": 2, "turns": 1, "turn_clients": [8], "starts": 1},
}
CHILD_LIMIT_S = 900.0  # any one child process (engine, cold start, service start-up)


def _log(message: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class Bench:
    """One run's settings, and the processes it starts (logs under ``scratch``)."""

    def __init__(self, work: dict[str, Any], scratch: Path, checkpoints: dict[str, str]):
        self.work, self.scratch, self.checkpoints = work, scratch, checkpoints
        self.node_cpus = sorted(os.sched_getaffinity(0))  # before any section narrows it

    def child(self, name: str, args: list[str], cpus: list[int] | None = None
              ) -> dict[str, Any]:
        """``python -m <args> --out FILE`` (on ``cpus``, one thread each, when given), within
        CHILD_LIMIT_S: its JSON."""
        out, log = self.scratch / f"{name}.json", self.scratch / f"{name}.log"
        out.unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(len(cpus))} if cpus else None
        with open(log, "w") as log_file:
            process = subprocess.Popen([sys.executable, "-m", *args, "--out", str(out)],
                                       cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=env,
                                       preexec_fn=(lambda: os.sched_setaffinity(0, cpus))
                                       if cpus else None)
            try:
                process.wait(timeout=CHILD_LIMIT_S)
            except subprocess.TimeoutExpired:
                stop_tree(process)
        if process.returncode != 0 or not out.exists():
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise RuntimeError(f"{name}: exit status {process.returncode}; "
                               f"{log.relative_to(REPO_ROOT)}: {tail}")
        return json.loads(out.read_text())

    def engine(self, engine: str, batches: list[int], generate: list[int]) -> dict[str, Any]:
        return self.child(f"engine-{engine}", [
            "bench.engine", "--engine", engine, "--checkpoint", self.checkpoints[engine],
            "--batch", ",".join(map(str, batches)), "--generate", ",".join(map(str, generate)),
            "--max-tokens", str(self.work["max_tokens"])])

    @contextlib.contextmanager
    def service(self, engine: str, starts: int = 1, checkpoint: str | None = None,
                reserved: bool = False) -> Iterator[dict[str, Any]]:
        """bench.service until the block ends: its start-up figures and ``pid`` (the
        replica's peak RSS added after the block). ``reserved``: started through the core
        reservation (one core for the serving stack)."""
        info_path = self.scratch / f"service-{engine}.json"
        info_path.unlink(missing_ok=True)
        launcher = [sys.executable, "-m", "deployments.core_reservation", "--cores", "1",
                    "--"] if reserved else []
        with open(self.scratch / f"service-{engine}.log", "w") as log:
            process = subprocess.Popen(
                [*launcher, sys.executable, "-m", "bench.service", "--engine", engine,
                 "--checkpoint", checkpoint or self.checkpoints[engine], "--starts",
                 str(starts), "--info", str(info_path)],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=lambda: os.sched_setaffinity(0, self.node_cpus))
        info: dict[str, Any] = {"pid": process.pid}
        try:
            deadline = time.monotonic() + CHILD_LIMIT_S
            while not info_path.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bench.service ({engine}) did not start; see "
                                       f"{log.name} in {self.scratch.relative_to(REPO_ROOT)}")
                time.sleep(0.5)
            info.update(json.loads(info_path.read_text()))
            yield info
        finally:
            stop_tree(process, timeout_s=60)
            if info_path.exists():
                info.update(json.loads(info_path.read_text()))

    def load(self, url: str, clients: list[int], with_mixed: bool = False) -> loadgen.Run:
        w = self.work
        return asyncio.run(loadgen.run(
            url, loadgen.served_model(url), clients, max_tokens=w["max_tokens"],
            min_requests=w["min_requests"], with_mixed=with_mixed,
            mixed_clients=w["mixed_clients"], mixed_rounds=w["mixed_rounds"]))

    def served_side(self, engine: str) -> Callable[[], loadgen.Side]:
        def measure() -> loadgen.Side:
            with self.service(engine) as info:
                return loadgen.side_of(self.load(info["url"], self.work["turn_clients"]).levels)
        return measure

    def llama_side(self) -> loadgen.Side:
        with build_llama_server.running(self.checkpoints["gguf"]) as server:
            return loadgen.side_of(self.load(server["url"], self.work["turn_clients"]).levels)

    def generate_side(self) -> loadgen.Side:
        run = EngineRun(**self.engine("ipex_llm", [], [1, 8]))
        return loadgen.Side(tokens_per_s={str(r.batch): r.tokens_per_s for r in run.generate},
                            foreign_cores=max(r.foreign_cores for r in run.generate))

    def section(self, name: str) -> dict[str, Any]:
        w = self.work
        if name.startswith("engine_"):
            engine = name.removeprefix("engine_")
            return self.engine(engine, w["engine_batches"],
                               w["generate"] if engine == "ipex_llm" else [])
        if name == "coldstart":
            load = median_load([self.child(f"coldstart-load-{start}", [
                "bench.coldstart", "load", "--checkpoint", self.checkpoints["ipex_llm"]])
                for start in range(w["starts"])])
            return {"load": load, "convert": self.child("coldstart-convert", [
                "bench.coldstart", "convert", "--gguf", self.checkpoints["gguf"]])}
        if name == "structured":
            return self.child("structured", [
                "bench.structured", "--checkpoint", self.checkpoints["ipex_llm"],
                "--rounds", str(w["turns"]), "--max-tokens", str(w["max_tokens"])])
        if name == "pinned_demo":
            return pinned.section(self, self.checkpoints, with_mixed=True)
        if name == "pinned_1b":
            bench_1b = Bench({**w, **WORK_1B}, self.scratch, self.checkpoints)
            bench_1b.node_cpus = self.node_cpus
            return {"model": "tinyllama-1.1b (random weights)", "workload": WORK_1B,
                    **pinned.section(bench_1b, model_1b_checkpoints(), with_mixed=False)}
        if name.startswith("service_"):
            with self.service(name.removeprefix("service_"), w["starts"]) as startup:
                run = self.load(startup["url"], w["clients"], with_mixed=True)
            return {"startup": startup, "run": run.model_dump(exclude={"machine"})}
        if name == "llama_server":
            with build_llama_server.running(self.checkpoints["gguf"]) as server:
                run = self.load(server["url"], w["clients"])
            return {**server, "run": run.model_dump(exclude={"machine"})}
        clients = [str(c) for c in w["turn_clients"]]
        if name == "turns_llama_cpp":
            return loadgen.interleave(w["turns"], ("service", self.served_side("llama_cpp")),
                                      ("llama_server", self.llama_side),
                                      pairs=[(c, c) for c in clients]).model_dump()
        assert name == "turns_ipex_llm"
        return loadgen.interleave(w["turns"], ("service", self.served_side("ipex_llm")),
                                  ("generate", self.generate_side),
                                  pairs=[("8", "8"), ("8", "1")]).model_dump()


def compact_json(value: Any, depth: int = 0) -> str:
    """JSON with each object or list of plain values (a level, a row) on one line."""
    pad = " " * depth
    if isinstance(value, dict) and any(isinstance(v, dict | list) for v in value.values()):
        return "{\n" + ",\n".join(f"{pad} {json.dumps(k)}: {compact_json(v, depth + 1)}"
                                   for k, v in value.items()) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return "[\n" + ",\n".join(f"{pad} {compact_json(v, depth + 1)}"
                                   for v in value) + f"\n{pad}]"
    return json.dumps(value)


def model_1b_checkpoints() -> dict[str, str]:
    """The 1.1B model's checkpoints (bench.model_1b builds them once, cached)."""
    from bench import model_1b

    return model_1b.ensure_checkpoints()


def skipped(name: str) -> str | None:
    """Why section ``name`` cannot run here, or None."""
    if "llama_cpp" in name and subprocess.run([sys.executable, "-c", "import llama_cpp"],
                                              capture_output=True).returncode != 0:
        return "llama-cpp-python is not installed (`pip install -e '.[llama-cpp]'`)"
    if name in ("llama_server", "turns_llama_cpp", "pinned_1b") and \
            build_llama_server.llama_server_path() is None:
        return "llama-server is not built (`python -m bench.build_llama_server`, ~20 min)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke check (< 5 minutes)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--merge", action="store_true",
                        help="keep the sections of the existing results.json not run now")
    parser.add_argument("--build-llama", action="store_true",
                        help="build llama-server first if it is not (~20 min)")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    mode = "quick" if args.quick else "full"
    out_dir = BENCH_DIR / ".cache" / "quick" if args.quick else BENCH_DIR
    scratch = BENCH_DIR / ".cache" / "runs" / mode
    for folder in (out_dir, scratch):
        folder.mkdir(parents=True, exist_ok=True)
    os.environ[ROOT_PID_ENV] = str(os.getpid())  # children's CPU is ours, not other load
    if args.quick:  # a smoke run stays short: no second attempt at disturbed measurements
        os.environ["BENCH_MEASUREMENT_ATTEMPTS"] = "1"
    os.environ.pop("RAY_ADDRESS", None)
    if args.build_llama:
        _log("building llama-server (nice -n 19) ...")
        build_llama_server.build()

    from deployments.constants import DEMO_CHECKPOINT_DIR, DEMO_GGUF_CHECKPOINT_DIR
    from deployments.convert import demo_gguf_path, ensure_demo_checkpoint

    checkpoints = {"ipex_llm": ensure_demo_checkpoint(REPO_ROOT / DEMO_CHECKPOINT_DIR,
                                                      report=_log),
                   "gguf": demo_gguf_path()}
    if any("llama_cpp" in s or s.startswith("pinned") for s in sections) and \
            skipped("engine_llama_cpp") is None:
        checkpoints["llama_cpp"] = ensure_demo_checkpoint(
            REPO_ROOT / DEMO_GGUF_CHECKPOINT_DIR, checkpoint_format="gguf", report=_log)
    bench = Bench(WORKLOADS[mode], scratch, {k: str(v) for k, v in checkpoints.items()})
    results: dict[str, Any] = {
        "command": "python -m bench.run" + (" --quick" if args.quick else "")
        + (f" --sections {args.sections}" if sections != list(SECTIONS) else "")
        + (" --merge" if args.merge else ""),
        "machine": machine_info(), "workload": {"name": mode, **bench.work},
        "checkpoints": {k: str(v.relative_to(REPO_ROOT) if v.is_relative_to(REPO_ROOT) else v)
                        for k, v in checkpoints.items()},
        "sections": {}}
    started = time.perf_counter()
    for name in sections:
        section_started = time.perf_counter()
        if reason := skipped(name):
            results["sections"][name] = {"skipped": reason}
            _log(f"{name}: skipped, {reason}")
            continue
        _log(f"{name} ...")
        try:
            results["sections"][name] = bench.section(name)
        except Exception as error:  # a failed section, not a failed run
            results["sections"][name] = {"failed": f"{type(error).__name__}: {error}"[:500]}
            _log(f"{name} failed: {results['sections'][name]['failed']}")
        results["sections"][name]["seconds"] = round(time.perf_counter() - section_started)
        _log(f"{name} done in {results['sections'][name]['seconds']} s")
    results.update(total_seconds=round(time.perf_counter() - started),
                   finished=machine_info()["date"])
    if args.merge and (out_dir / "results.json").exists():
        previous = json.loads((out_dir / "results.json").read_text())
        kept = {name: {**section, "from_run": section.get("from_run") or previous.get("finished")}
                for name, section in previous.get("sections", {}).items()
                if name not in results["sections"]}
        results["sections"] = {**kept, **results["sections"]}
    (out_dir / "results.json").write_text(compact_json(results) + "\n")
    paths = write_report(results, out_dir)
    _log(f"wrote {', '.join(str(p.relative_to(REPO_ROOT)) for p in paths)} in "
         f"{results['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
