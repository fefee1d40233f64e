"""Shared test plumbing: a Ray + Serve instance per test module, free ports, SSE parsing."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import httpx
import psutil
import pytest
import ray
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from deployments.app import bind_app
from deployments.config import LLMConfig
from deployments.placement import CPU_SOCKET_RESOURCE

# Below the kernel's ephemeral range and above Ray's worker ports (10002-19999 by default).
SERVER_PORTS = range(20_000, 32_768)


def free_port() -> int:
    """A TCP port free now, for a server a test is about to start.

    Not the kernel's pick (bind to port 0): that comes from the ephemeral range, from which
    every outgoing connection takes its source port, so between this call and the server's
    bind another process's connection (a GCS opening its Redis pool, say) could hold it,
    and a `ray start` refuses a busy dashboard port for good. Ports below that range are
    taken only by servers that ask for them."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = range(SERVER_PORTS.start, min(SERVER_PORTS.stop, first_ephemeral))
    for port in random.sample(ports, k=min(len(ports), 200)):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # an unusual port range: the kernel's pick after all
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(args: dict[str, Any], *, server_options: dict[str, Any] | None = None,
              num_cpus: int = 2) -> Iterator[str]:
    """Run the app (Ray real) on a fresh local Ray; yields its base URL; always shuts down."""
    port = free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = bind_app(LLMConfig.model_validate(args), server_options=server_options)
        serve.run(app, name="llm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def sse_events(text: str) -> list[Any]:
    """The JSON payloads of an SSE body, with the final [DONE] as the string "[DONE]"."""
    events = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def scrape(base_url: str) -> dict[tuple[str, frozenset], float]:
    """The service's /metrics samples: (name, labels) -> value."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= lab)


def server_stats() -> dict[str, Any]:
    return serve.get_deployment_handle("LLMServer", app_name="llm").stats.remote().result()


def stop_process_tree(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """End a process we started and every process below it, by PID (never by name).

    `serve run` shuts Ray down on SIGINT/SIGTERM; whatever is left after the timeout is
    killed. Ray workers live in sessions of their own, so they are found as descendants.
    """
    try:
        root = psutil.Process(process.pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        root.send_signal(signal.SIGINT)
    _, alive = psutil.wait_procs([root], timeout=timeout_s)
    for proc in [*alive, *family]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(family, timeout=10)


def wait_until_healthy(base_url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve run exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise TimeoutError(f"{base_url}/health not ready after {timeout_s} s")


REPO_ROOT = Path(__file__).resolve().parents[1]


def _without_ray_address() -> dict[str, str]:
    """serve run must start its own local cluster, never join one named in the environment."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


@contextlib.contextmanager
def serve_run(config_file: str, tmp_path: Path, *, launcher: Sequence[str] = (),
              ready_timeout_s: float = 240) -> Iterator[str]:
    """``serve run`` of a shipped config, changed only to a free port (run through
    ``launcher``, e.g. the core reservation's, when given); yields the base URL."""
    config = yaml.safe_load((REPO_ROOT / config_file).read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config_path = tmp_path / config_file
    config_path.write_text(yaml.safe_dump(config))
    serve_cli = Path(sys.executable).parent / "serve"
    log_path = tmp_path / "serve-run.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([*launcher, str(serve_cli), "run", str(config_path)],
                                   cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=_without_ray_address())
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_healthy(base, process, timeout_s=ready_timeout_s)
        except (RuntimeError, TimeoutError) as error:
            tail = log_path.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"{error}; its log ends:\n" + "\n".join(tail)) from None
        yield base
    finally:
        stop_process_tree(process)


@contextlib.contextmanager
def read_only_view(source: Path, mount_point: Path) -> Iterator[Path]:
    """``source`` bind-mounted read-only at ``mount_point`` (as a replica's NFS mount is):
    every write under it fails with EROFS, for root too, so chmod cannot fake it. Needs
    root (CI and the development machines run tests as root); unmounted on exit."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    mount_point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(mount_point)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount_point)], check=True)
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def write_tiny_model(folder: Path) -> None:
    """What an ipex_llm checkpoint must list (config and weights; the echo engine reads
    neither): a publish_checkpoint build for tests that serve the echo engine."""
    (folder / "config.json").write_text('{"bigdl_transformers_low_bit": "sym_int4"}')
    (folder / "model.safetensors").write_bytes(b"weights")


def socket_nodes(cpus: int) -> list[dict[str, Any]]:
    """Two worker nodes that advertise one CPU socket each, as start-node.sh does."""
    return [{"num_cpus": cpus, "resources": {CPU_SOCKET_RESOURCE: 1}} for _ in range(2)]


@contextlib.contextmanager
def local_cluster(workers: Sequence[dict[str, Any]], *,
                  runtime_env: dict[str, Any] | None = None,
                  head_args: dict[str, Any] | None = None,
                  http_port: int | None = None
                  ) -> Iterator[tuple[Any, list[Any]]]:
    """A one-machine Ray cluster: a head with 2 CPUs and no slot (no GPU, no socket; more
    ``Cluster`` head arguments in ``head_args``) and one worker node per entry of
    ``workers`` (``Cluster.add_node`` arguments), connected with ``runtime_env``, with Serve
    started (no HTTP, or a proxy on the head at 127.0.0.1:``http_port``); always shut down.
    Yields the cluster and its worker nodes."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        # Cluster records its address in /tmp/ray/ray_current_cluster, where a plain
        # ray.init() of anyone else on this machine would find it, and deletes that file on
        # shutdown even when it names someone else's cluster: keep out of the shared file.
        patch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        patch.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "num_gpus": 0, "include_dashboard": False, **(head_args or {})})
        try:
            nodes = [cluster.add_node(**node) for node in workers]
            ray.init(address=cluster.address, runtime_env=runtime_env)
            if http_port is None:
                serve.start(proxy_location="Disabled")
            else:
                serve.start(proxy_location="HeadOnly",
                            http_options={"host": "127.0.0.1", "port": http_port})
            yield cluster, nodes
        finally:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
            cluster.shutdown()


def app_status(app: str = "llm") -> str | None:
    """The Serve application's status (RUNNING, DEPLOY_FAILED, ...), None if it is absent."""
    status = serve.status().applications.get(app)
    return None if status is None else status.status.value


def replica_states(app: str = "llm", deployment: str = "LLMServer") -> dict[str, int]:
    """{replica state: count} of one deployment of the application ({} while it is absent)."""
    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    # ReplicaState members are str enums; keys compare by their value either way.
    return {str(getattr(state, "value", state)): count
            for state, count in status.deployments[deployment].replica_states.items()}


class ClientThreads:
    """``count`` daemon threads running ``self._run(name)`` between ``with`` and its end;
    the end stops them and fails if one is still running after ``join_timeout_s`` (a hung
    client). Subclasses loop in ``_run`` until ``self._stop`` is set."""

    def __init__(self, count: int, join_timeout_s: float = 90) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._join_timeout_s = join_timeout_s
        self._threads = [threading.Thread(target=self._run, args=(f"w{i}",), daemon=True)
                         for i in range(count)]

    def _run(self, name: str) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self._join_timeout_s)
        assert not any(thread.is_alive() for thread in self._threads), "a client hung"


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"not within {timeout_s} s"
        time.sleep(poll_s)
    return time.monotonic() - started


def wait_for_app(condition: Callable[[], bool], timeout_s: float, what: str,
                 fail_if: Callable[[], bool] = lambda: False, *, app: str = "llm",
                 poll_s: float = 0.25) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` and the application's status
    when ``fail_if`` holds first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        details = f"{serve.status().applications.get(app)}"
        assert not fail_if(), f"gave up waiting for {what}: {details}"
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}: {details}"
        time.sleep(poll_s)


# ---- long prompts (the demo model's context is 8192 tokens) -------------------------------

LONG_PROMPT_SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today. "


def long_prompt(client: httpx.Client, model: str, tokens: int) -> str:
    """A prompt of about ``tokens`` tokens of the served model (within 1%), counted by its
    /tokenize."""
    def count(text: str) -> int:
        return client.post("/tokenize", json={"model": model, "prompt": text}).json()["count"]

    # Repeats merge at their seams (". The"): count a repeat inside the text, not alone.
    per_repeat = (count(LONG_PROMPT_SENTENCE * 11) - count(LONG_PROMPT_SENTENCE)) / 10
    prompt = LONG_PROMPT_SENTENCE * round(tokens / per_repeat)
    assert abs(count(prompt) - tokens) < tokens / 100
    return prompt


def ask_8k(client: httpx.Client, model: str, **fields: Any) -> tuple[httpx.Response, float]:
    """An ~7900-token completion (the context is 8192) and its seconds."""
    prompt = long_prompt(client, model, 7900)
    started = time.monotonic()
    response = client.post("/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, **fields})
    return response, time.monotonic() - started


def assert_too_long_is_refused_naming_the_context(client: httpx.Client, model: str) -> None:
    response = client.post("/v1/completions", json={
        "model": model, "prompt": long_prompt(client, model, 8300), "max_tokens": 4})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "8192" in error["message"] and error["type"] == "invalid_request_error", error
