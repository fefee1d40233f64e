"""Storage faults under a running service: the shared checkpoint path lost, a full disk while
publishing, and a checkpoint replaced under running replicas.

The engine is echo (the model is not the point), with ``local_cache_dir`` set so replicas
resolve and copy a published checkpoint as a real engine's would (echo reads no checkpoint
otherwise). The shared path is a tmpfs mounted for the test, so "lost" is real: ``umount -l``
takes it away from every process on the machine, Ray's workers included (root only, as
tests/helpers.read_only_view; CI and the development machines run tests as root).

Each replica reports the checkpoint version it loaded (manifest sha256, origin) in its
health answer; the tests tell old replicas from new ones by it, through the LLMServer handle.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from deployments.checkpoints import (
    CheckpointError,
    manifest_digest,
    publish_checkpoint,
    replica_checkpoint,
    verify_checkpoint,
)
from deployments.convert import demo_gguf_path
from tests.helpers import ClientThreads, free_port, sse_events, write_tiny_model

pytestmark = pytest.mark.timeout(240)

APP = "llm"
MODEL = "smollm2-135m-instruct"
STEP_DELAY_S = 0.02
MAX_TOKENS = 10
SERVER_OPTIONS: dict[str, Any] = {
    "max_ongoing_requests": 32, "health_check_period_s": 1, "health_check_timeout_s": 10,
    "graceful_shutdown_timeout_s": 30}
DEPLOY_TIMEOUT_S = 90.0
LOAD_THREADS = 4
REPO_ROOT = Path(__file__).resolve().parents[2]


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``mount_point``; lazily unmounted on exit if still mounted."""
    needs_root()
    mount_point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                   check=True)
    try:
        yield mount_point
    finally:
        if os.path.ismount(mount_point):
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def publish(root: Path, *, force: bool = False, payload: bytes = b"weights") -> Path:
    def build(folder: Path) -> None:
        write_tiny_model(folder)
        (folder / "model.safetensors").write_bytes(payload)

    return publish_checkpoint(build, root / "tiny", source="test", low_bit="sym_int4",
                              force=force)


# ---- no Ray: a publish that runs out of space ----------------------------------------------


def test_a_publish_that_runs_out_of_space_leaves_the_previous_version_and_no_partial_folder(
    tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "root", "256k") as root:
        first = publish(root)
        with pytest.raises(CheckpointError) as raised:
            publish(root, force=True, payload=b"x" * (1 << 20))  # 1 MiB into 256 KiB
        message = str(raised.value)
        assert "\n" not in message and "No space left on device" in message, message
        assert str(root / "tiny") in message
        assert (root / "tiny").resolve() == first  # the name still points at the old one
        verify_checkpoint(root / "tiny")
        leftovers = [p.name for p in root.iterdir() if ".tmp-" in p.name]
        assert leftovers == []
        assert [p.name for p in (root / ".tiny.versions").iterdir()] == [first.name]

        # The CLI: one line on stderr, exit status 1, the same state after.
        run = subprocess.run(
            [str(REPO_ROOT / ".venv/bin/llm-checkpoint"), "convert", "--source",
             str(demo_gguf_path()), "--format", "gguf", "--output", str(root / "tiny"),
             "--force"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 1, run
        errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0], run.stderr
        assert "Traceback" not in run.stderr
        assert (root / "tiny").resolve() == first
        assert [p.name for p in root.iterdir() if ".tmp-" in p.name] == []
        print(f"CLI on a full disk: exit {run.returncode}: {errors[0]}")


def test_a_replica_falls_back_to_the_newest_node_copy_only_when_storage_is_unreadable(
    tmp_path: Path
) -> None:
    root, cache = tmp_path / "models", tmp_path / "node-cache"
    publish(root)
    first = replica_checkpoint(root / "tiny", cache)
    publish(root, force=True, payload=b"v2")
    second = replica_checkpoint(root / "tiny", cache)
    assert (first.origin, second.origin) == ("local cache", "local cache")
    assert first.digest != second.digest

    # The shared checkpoint's manifest is lost but its folder reads: a defect, no fallback.
    manifest = (root / "tiny").resolve() / "manifest.json"
    manifest.rename(tmp_path / "manifest.json")
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        replica_checkpoint(root / "tiny", cache)
    (tmp_path / "manifest.json").rename(manifest)

    (root / "tiny").unlink()  # the storage is gone: the newest copy serves
    fallback = replica_checkpoint(root / "tiny", cache)
    assert fallback.origin == "local cache (shared path unreadable)"
    assert fallback.digest == second.digest and fallback.hashes_verified
    with pytest.raises(CheckpointError, match="holds no verified copy of tiny"):
        replica_checkpoint(root / "tiny", tmp_path / "other-cache")
    with pytest.raises(CheckpointError, match=r"does not exist$"):
        replica_checkpoint(root / "tiny")  # no cache configured


# ---- the served application ------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """A fresh local Ray with Serve's HTTP proxy; each test deploys its own app."""
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


@pytest.fixture
def delete_app(base_url: str) -> Iterator[None]:
    yield
    with contextlib.suppress(Exception):
        serve.delete(APP)


def deploy(checkpoint: Path, cache_dir: Path, *, replicas: int = 1, blocking: bool = True,
           **args: Any) -> None:
    """The echo app through Serve's config path (as `serve deploy` / `serve run CONFIG`):
    a change of num_replicas alone is then a lightweight update that keeps the running
    replicas, and a change of ``args`` a rolling redeploy."""
    app = {"name": APP, "route_prefix": "/", "import_path": "deployments.app:build_app",
           "args": {"engine": "echo", "checkpoint_path": str(checkpoint),
                    "local_cache_dir": str(cache_dir), "max_batch_size": 8,
                    "engine_options": {"step_delay_s": STEP_DELAY_S}, **args},
           "deployments": [{"name": "LLMServer", "num_replicas": replicas, **SERVER_OPTIONS}]}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
    if blocking:
        wait_for(lambda: app_ready(replicas), "the deploy")


def app_ready(replicas: int) -> bool:
    status = serve.status().applications.get(APP)
    assert status is None or status.status.value != "DEPLOY_FAILED", status
    return (status is not None and status.status.value == "RUNNING"
            and status.deployments["LLMServer"].replica_states == {"RUNNING": replicas})


def server_status() -> Any:
    return serve.status().applications[APP].deployments["LLMServer"]


def wait_for(condition: Callable[[], bool], what: str,
             timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}: " \
                                            f"{serve.status().applications.get(APP)}"
        time.sleep(0.25)


def replica_checkpoints(want: int, timeout_s: float = 30) -> dict[int, dict[str, Any]]:
    """pid -> the checkpoint each LLMServer replica reports, once ``want`` replicas answered."""
    handle = serve.get_deployment_handle("LLMServer", app_name=APP)
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < want and time.monotonic() < deadline:
        health = handle.health.remote().result(timeout_s=30)
        seen[health["pid"]] = health["checkpoint"]
    assert len(seen) == want, seen
    return seen


def ask(client: httpx.Client, word: str, stream: bool) -> str:
    """The answer's text, or the error that ended it."""
    body = {"model": MODEL, "prompt": f"say {word}", "max_tokens": MAX_TOKENS, "stream": stream}
    try:
        response = client.post("/v1/completions", json=body)
    except httpx.HTTPError as error:
        return f"{type(error).__name__}: {error}"
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    if not stream:
        return response.json()["choices"][0]["text"]
    events = sse_events(response.text)
    if events[-1] != "[DONE]":
        return f"stream without [DONE]: {response.text[-200:]}"
    return "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])


class Load(ClientThreads):
    """LOAD_THREADS clients sending requests back to back over HTTP until stopped; every
    answer is checked against the echo engine's."""

    def __init__(self, base_url: str) -> None:
        super().__init__(LOAD_THREADS)
        self._base_url = base_url
        self.completed = 0
        self.errors: list[str] = []

    def _run(self, name: str) -> None:
        with httpx.Client(base_url=self._base_url, timeout=60) as client:
            sent = 0
            while not self._stop.is_set():
                word = f"{name}n{sent}"
                text = ask(client, word, stream=sent % 2 == 0)
                sent += 1
                with self._lock:
                    if text == (word * MAX_TOKENS)[:MAX_TOKENS]:
                        self.completed += 1
                    else:
                        self.errors.append(text)


@pytest.mark.usefixtures("delete_app")
def test_lost_shared_storage_running_replicas_serve_new_ones_fail_or_use_the_node_copy(
    base_url: str, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "shared", "16m") as shared:
        publish(shared)
        checkpoint, cache = shared / "tiny", tmp_path / "node-cache"
        deploy(checkpoint, cache)
        (before,) = replica_checkpoints(want=1).values()
        assert before["origin"] == "local cache"
        assert before["manifest_sha256"] == manifest_digest(checkpoint)

        subprocess.run(["umount", "-l", str(shared)], check=True)  # the NFS server is gone
        assert not checkpoint.exists()
        (copy,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
        with Load(base_url) as load:
            # Scale up on a node without a copy (moved aside): the new replica's start fails
            # with the reason, one line, in Serve's status; the running replica serves on.
            copy.rename(tmp_path / "aside")
            deploy(checkpoint, cache, replicas=2, blocking=False)
            reason = (f"deployments.checkpoints.CheckpointError: checkpoint {checkpoint}: "
                      f"does not exist; and local_cache_dir {cache} holds no verified copy "
                      "of tiny")
            wait_for(lambda: reason in server_status().message.splitlines(),
                     "the failed start's reason in serve.status()")
            print(f"serve.status() says: {server_status().message.splitlines()[0]} ... "
                  f"{reason}")
            assert server_status().replica_states.get("RUNNING") == 1
            served_during_failure = load.completed
            wait_for(lambda: load.completed > served_during_failure + 10,
                     "answers from the old replica while new ones fail")

            # With the node copy back, the next attempt starts from it.
            (tmp_path / "aside").rename(copy)
            wait_for(lambda: server_status().replica_states.get("RUNNING") == 2,
                     "the second replica, from the node copy")
            replicas = replica_checkpoints(want=2)
        origins = sorted(c["origin"] for c in replicas.values())
        assert origins == ["local cache", "local cache (shared path unreadable)"], replicas
        assert {c["manifest_sha256"] for c in replicas.values()} == {before["manifest_sha256"]}
        print(f"storage lost: {load.completed} answered, {len(load.errors)} errors")
        assert load.errors == []
        assert load.completed > 0


@pytest.mark.usefixtures("delete_app")
def test_a_replaced_checkpoint_reaches_new_replicas_only_and_a_rolling_redeploy_drops_none(
    base_url: str, tmp_path: Path
) -> None:
    root, cache = tmp_path / "models", tmp_path / "node-cache"
    publish(root)
    checkpoint = root / "tiny"
    deploy(checkpoint, cache)
    (old,) = replica_checkpoints(want=1).values()

    publish(root, force=True, payload=b"new weights")  # `llm-checkpoint convert ... --force`
    new_digest = manifest_digest(checkpoint)
    assert new_digest != old["manifest_sha256"]
    (still,) = replica_checkpoints(want=1).values()
    assert still == old  # the running replica keeps its version

    deploy(checkpoint, cache, replicas=2)  # scale up: the new replica loads the new version
    digests = sorted(c["manifest_sha256"] for c in replica_checkpoints(want=2).values())
    assert digests == sorted([old["manifest_sha256"], new_digest])

    # A rolling redeploy (any change of the app's args) to the new version, under load.
    with Load(base_url) as load:
        wait_for(lambda: load.completed >= 20, "load before the redeploy", 30)
        started = load.completed
        deploy(checkpoint, cache, replicas=2, default_max_tokens=17)
        during = load.completed - started
        after_deploy = load.completed
        wait_for(lambda: load.completed >= after_deploy + 20, "load after the redeploy", 30)
    replicas = replica_checkpoints(want=2)
    assert {c["manifest_sha256"] for c in replicas.values()} == {new_digest}
    print(f"rolling redeploy: {load.completed} completed ({during} during the redeploy), "
          f"{len(load.errors)} errored")
    assert load.errors == []
    assert during > 0
