"""Our application on a fresh local Ray with one fixed replica, until SIGINT or SIGTERM.

    python -m bench.service --engine ipex_llm|llama_cpp --checkpoint DIR --info FILE \\
        [--starts 3] [--port 8000]

Serves the shipped config's application (serve_config.yaml; serve_config.llama_cpp.yaml for
engine llama_cpp) as configured, but with one replica instead of autoscaling (a benchmark
must not change capacity mid-run) and a request deadline of 600 s (a deep closed-loop queue
then measures latency instead of timing out). Ray gets the shipped Ray Serve settings
(cluster/ray_tuning.env), as under ``make serve``. Never joins an existing cluster.

Start-up is timed ``--starts`` times (the application deleted in between): a trivial Ray
actor created and answering (the floor of any replica's start), and ``serve.run`` to the
application RUNNING (polled every 50 ms); medians, every start under ``*_runs_s``. FILE gets
the URL and these figures when the application is ready, and again at shutdown with the
replica's peak RSS. Point bench.loadgen at the URL.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.machine import free_port, vm_hwm_bytes
from bench.ray_tuning import apply_ray_tuning
from bench.stats import median

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "llm"
CONFIG_FILES = {"ipex_llm": "serve_config.yaml", "llama_cpp": "serve_config.llama_cpp.yaml"}


def shipped_options(checkpoint: str, config_file: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The application args and LLMServer options of a shipped config, one replica serving
    ``checkpoint`` with a 600 s request deadline."""
    config = yaml.safe_load((REPO_ROOT / config_file).read_text())
    app = next(a for a in config["applications"] if a["name"] == APP_NAME)
    args = {**app["args"], "checkpoint_path": checkpoint, "request_timeout_s": 600.0}
    server = next(d for d in app.get("deployments", []) if d["name"] == "LLMServer")
    options = {k: v for k, v in server.items() if k not in ("name", "autoscaling_config")}
    return args, {**options, "num_replicas": 1}


def bare_actor_start() -> float:
    """Seconds to create a trivial Ray actor and get its answer."""
    import ray

    @ray.remote(num_cpus=0)
    class Ping:
        def pid(self) -> int:
            return os.getpid()

    started = time.perf_counter()
    actor = Ping.remote()
    ray.get(actor.pid.remote())
    seconds = time.perf_counter() - started
    ray.kill(actor)
    return seconds


def run_until_running(app: Any, poll_s: float = 0.05) -> float:
    """``serve.run(app)``: seconds until Serve reports the application RUNNING (serve.run
    itself returns up to a second later: it polls once a second)."""
    from ray import serve

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        deploy = pool.submit(serve.run, app, name=APP_NAME, route_prefix="/")
        while not deploy.done():
            application = serve.status().applications.get(APP_NAME)
            if application is not None and application.status == "RUNNING":
                return time.perf_counter() - started
            time.sleep(poll_s)
        deploy.result()  # a failed deploy raises here
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=sorted(CONFIG_FILES), default="ipex_llm")
    parser.add_argument("--checkpoint", required=True, help="ipex_llm, or gguf for llama_cpp")
    parser.add_argument("--info", type=Path, required=True, help="JSON written when ready")
    parser.add_argument("--starts", type=int, default=1)
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)  # a cluster of our own, never someone else's
    for sig in (signal.SIGINT, signal.SIGTERM):  # shut Ray down on either, even when a
        signal.signal(sig, signal.default_int_handler)  # background shell ignored SIGINT
    info: dict[str, Any] = {"engine": args.engine, "config_file": CONFIG_FILES[args.engine],
                            "ray_tuning": apply_ray_tuning()}
    import ray
    from ray import serve

    from deployments.app import bind_app
    from deployments.config import LLMConfig

    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    info["ray_init_s"] = time.perf_counter() - started
    replica_pid = None
    try:
        actors = [bare_actor_start() for _ in range(args.starts)]
        port = args.port or free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config_args, options = shipped_options(args.checkpoint, info["config_file"])
        ready = []
        for start in range(args.starts):
            if start:
                serve.delete(APP_NAME)  # router and replica go; the next start makes both
            ready.append(run_until_running(bind_app(LLMConfig.model_validate(config_args),
                                                    server_options=options)))
        url = f"http://127.0.0.1:{port}"
        replica_pid = httpx.get(f"{url}/health", timeout=30).json()["replica"]["pid"]
        info.update(url=url, gcs_address=ray.get_runtime_context().gcs_address,
                    bare_actor_start_s=median(actors),
                    bare_actor_start_runs_s=[round(x, 3) for x in actors],
                    serve_run_to_ready_s=median(ready),
                    serve_run_to_ready_runs_s=[round(x, 3) for x in ready],
                    replica_rss_ready_bytes=vm_hwm_bytes(replica_pid))
        args.info.write_text(json.dumps(info, indent=1))
        print(f"[service] ready at {url}", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        if replica_pid is not None:
            info["replica_peak_rss_bytes"] = vm_hwm_bytes(replica_pid)
            args.info.write_text(json.dumps(info, indent=1))
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
