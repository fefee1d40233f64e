"""`make bench`: every benchmark section on the demo model, then bench/RESULTS.md and a plot.

    python -m bench.run            # full run (about 30 minutes on 2 quiet cores)
    python -m bench.run --quick    # smoke check (< 5 minutes): fewer levels, short answers
    python -m bench.run --sections service,llama   # a subset (report from what ran)

Each section runs as a child process of this one, with a time limit, and writes JSON; a
section that fails or overruns is reported as such and the run goes on. Sections:
``inprocess`` (batched-generate ceiling, one-at-a-time path, engine alone, decode-step
profile), ``coldstart`` (convert vs load, peak RSS), ``service`` (Ray Serve over HTTP and
the handle, mixed workload, py-spy), ``llama_cpp_engine`` and ``llama_cpp_service`` (the
same engine-alone and service measurements with engine llama_cpp on the gguf demo
checkpoint, serve_config.llama_cpp.yaml; skipped with a note if llama-cpp-python is not
installed), ``llama`` (llama.cpp's server; skipped with a note until
``python -m bench.build_llama_server`` has built it, or pass --build-llama), and
``head_to_head`` (engine llama_cpp's service and llama-server again, in alternating turns,
for the target that compares them). ``ipex_turns`` does the same for engine ipex_llm's
targets: its service at 8 clients, then the in-process ceiling and one-at-a-time path, in
alternating turns.

The full run writes bench/RESULTS.md, bench/results.json and bench/throughput.png; --quick
writes the same under bench/.cache/quick/ so the committed results stay the full ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.coldstart import median_load
from bench.machine import ROOT_PID_ENV, machine_info
from bench.workload import WORKLOADS, Workload

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SECTIONS = ("inprocess", "coldstart", "service", "ipex_turns", "llama_cpp_engine",
            "llama_cpp_service", "llama", "head_to_head")
# Sections that run engine llama_cpp (they need llama-cpp-python and the gguf checkpoint).
LLAMA_CPP_SECTIONS = ("llama_cpp_engine", "llama_cpp_service", "head_to_head")
# Per-section wall-clock limits (s), full / quick: generous for a loaded machine, but bounded.
TIME_LIMITS_S = {"inprocess": (900, 300), "coldstart": (300, 200), "service": (1800, 600),
                 "llama_cpp_engine": (600, 200), "llama_cpp_service": (1500, 500),
                 "llama": (600, 200), "head_to_head": (1200, 400),
                 "ipex_turns": (1200, 400)}


def _log(message: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def run_child(name: str, args: list[str], output: Path, limit_s: float,
              log_dir: Path) -> dict[str, Any]:
    """Run ``python -m bench.<module> ...`` with a time limit; its JSON, or why there is none."""
    from tests.helpers import stop_process_tree

    output.unlink(missing_ok=True)
    log_path = log_dir / f"{name}.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            stop_process_tree(process, timeout_s=30)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {}
    if output.exists():
        result = json.loads(output.read_text())
    if process.returncode != 0 or not result:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        reason = (f"over its {limit_s:.0f} s limit" if seconds >= limit_s
                  else f"exit status {process.returncode}")
        result["failed"] = f"{reason}; log {log_path.relative_to(REPO_ROOT)}: " + \
            " | ".join(tail)
        _log(f"{name} failed: {result['failed']}")
    result["section_seconds"] = round(seconds, 1)
    return result


def llama_cpp_missing() -> str | None:
    """Why engine llama_cpp cannot run here (``import llama_cpp`` fails, in a child process
    so that this one loads no llama.cpp), or None."""
    check = subprocess.run([sys.executable, "-c", "import llama_cpp"], cwd=REPO_ROOT,
                           capture_output=True, text=True)
    if check.returncode == 0:
        return None
    error = (check.stderr.strip().splitlines() or [f"exit status {check.returncode}"])[-1]
    return ("llama-cpp-python is not importable (" + error + "); install it with "
            "`pip install -e '.[llama-cpp]'` (or `make install`)")


def prepare_llama_cpp(sections: list[str]) -> tuple[str | None, str | None]:
    """The gguf demo checkpoint for the llama_cpp sections (built if needed, ~10 s), or why
    they are skipped (no llama-cpp-python) or failed (no checkpoint)."""
    if not set(sections) & set(LLAMA_CPP_SECTIONS):
        return None, None
    missing = llama_cpp_missing()
    if missing:
        _log(f"skipping {', '.join(LLAMA_CPP_SECTIONS)}: {missing}")
        return None, missing
    from deployments.constants import DEMO_GGUF_CHECKPOINT_DIR
    from deployments.convert import ensure_demo_checkpoint

    return str(ensure_demo_checkpoint(REPO_ROOT / DEMO_GGUF_CHECKPOINT_DIR,
                                      checkpoint_format="gguf",
                                      report=lambda m: _log(m))), None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks of the serving stack.")
    parser.add_argument("--quick", action="store_true",
                        help="reduced run for smoke checks (< 5 minutes)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--build-llama", action="store_true",
                        help="build llama-server first if it is not cached (~20 min)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="what-if: set an environment variable for every section (and "
                             "so for the Ray replica too), e.g. BIGDL_LLM_LINEAR_THRESHOLD=17;"
                             " results go to bench/.cache/env-.../, not bench/RESULTS.md")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    work: Workload = WORKLOADS["quick" if args.quick else "full"]
    extra_env = dict(item.split("=", 1) for item in args.env)
    os.environ.update(extra_env)
    variant = work.name + "".join(f"-{k}={v}" for k, v in sorted(extra_env.items()))
    if extra_env:
        out_dir = BENCH_DIR / ".cache" / f"env-{variant}"
    else:
        out_dir = BENCH_DIR / ".cache" / "quick" if args.quick else BENCH_DIR
    scratch = BENCH_DIR / ".cache" / "runs" / variant
    scratch.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ[ROOT_PID_ENV] = str(os.getpid())
    if args.quick:  # no second attempt at disturbed measurements: a smoke run stays short
        os.environ["BENCH_MEASUREMENT_ATTEMPTS"] = "1"
    os.environ.pop("RAY_ADDRESS", None)

    from deployments.constants import DEMO_CHECKPOINT_DIR
    from deployments.convert import demo_gguf_path, ensure_demo_checkpoint

    checkpoint = str(ensure_demo_checkpoint(REPO_ROOT / DEMO_CHECKPOINT_DIR,
                                            report=lambda m: _log(m)))
    gguf = str(demo_gguf_path())
    gguf_checkpoint: str | None = None
    llama_cpp_problem: dict[str, str] = {}
    try:
        gguf_checkpoint, skipped = prepare_llama_cpp(sections)
        if skipped:
            llama_cpp_problem = {"skipped": skipped}
    except Exception as error:  # a failed section, not a failed run
        llama_cpp_problem = {"failed": f"building the gguf demo checkpoint: {error}"}
        _log(llama_cpp_problem["failed"])
    if args.build_llama and {"llama", "head_to_head"} & set(sections):
        from bench.build_llama_server import build

        _log("building llama-server (nice -n 19) ...")
        build()

    command = "python -m bench.run" + (" --quick" if args.quick else "") + \
        (f" --sections {args.sections}" if args.sections != ",".join(SECTIONS) else "") + \
        "".join(f" --env {item}" for item in args.env)
    results: dict[str, Any] = {"command": command, "machine": machine_info(),
                               "workload": json.loads(work.to_json()),
                               "checkpoint": os.path.relpath(checkpoint, REPO_ROOT),
                               "gguf": gguf, "env": extra_env}
    if gguf_checkpoint:
        results["gguf_checkpoint"] = os.path.relpath(gguf_checkpoint, REPO_ROOT)
    index = 0 if not args.quick else 1
    started = time.perf_counter()
    for section in sections:
        limit = TIME_LIMITS_S[section][index]
        _log(f"section {section} (limit {limit} s) ...")
        if section == "coldstart":
            results["coldstart"] = {
                "load": median_load([run_child(f"coldstart-load-{start}", [
                    "bench.coldstart", "load", "--checkpoint", checkpoint, "--output",
                    str(scratch / "load.json")], scratch / "load.json", limit, scratch)
                    for start in range(1, work.ready_starts + 1)]),
                "convert": run_child("coldstart-convert", [
                    "bench.coldstart", "convert", "--gguf", gguf, "--output",
                    str(scratch / "convert.json")], scratch / "convert.json", limit, scratch)}
            continue
        if section in LLAMA_CPP_SECTIONS and (llama_cpp_problem or not gguf_checkpoint):
            results[section] = {**llama_cpp_problem, "section_seconds": 0.0}
            continue
        module = {"inprocess": "bench.inprocess", "service": "bench.service",
                  "llama_cpp_engine": "bench.inprocess", "llama_cpp_service": "bench.service",
                  "llama": "bench.llama_peer", "head_to_head": "bench.head_to_head",
                  "ipex_turns": "bench.ipex_turns"}[section]
        if section == "llama":
            source = ["--gguf", gguf]
        elif section == "head_to_head":
            source = ["--checkpoint", str(gguf_checkpoint), "--gguf", gguf]
        elif section in LLAMA_CPP_SECTIONS:
            source = ["--engine", "llama_cpp", "--checkpoint", str(gguf_checkpoint)]
        else:
            source = ["--checkpoint", checkpoint]
        output = scratch / f"{section}.json"
        results[section] = run_child(section, [module, "--workload", work.name, *source,
                                               "--output", str(output)],
                                     output, limit, scratch)
        _log(f"section {section} done in {results[section]['section_seconds']} s")
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["finished"] = machine_info()["date"]

    from bench.report import write_report

    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    paths = write_report(results, out_dir)
    _log(f"wrote {', '.join(str(p.relative_to(REPO_ROOT)) for p in paths)} "
         f"in {results['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
