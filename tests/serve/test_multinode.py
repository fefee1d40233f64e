"""The `llm` application on a multi-node Ray cluster on one machine: a head and two workers.

Each worker node advertises one CPU socket, as cluster/start-node.sh does on a one-socket
host, and the head none (as on a real cluster). The app is serve_config.yaml's `llm`
application, deployed the way `serve run`, `serve deploy` and KubeRay deploy it (the
controller's config path, ServeDeploySchema), with the echo engine, `device: cpu` (so each
LLMServer replica holds one socket: at most one replica per worker node), a checkpoint
published in a shared checkpoint root, and short autoscaling delays.

The node-local cache, honestly: the three "nodes" share this machine's filesystem, and
`local_cache_dir` is one path for every replica, so separate per-node caches cannot exist
here. Both worker nodes therefore use one cache root, which is exactly the case the cache is
for (N replicas on one node): replicas starting together on both nodes must leave one
verified copy, made once under the file lock. On a real cluster the path is on each host's
own disk, which makes that one copy per node.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from deployments.checkpoints import publish_checkpoint, verify_checkpoint
from deployments.placement import CPU_SOCKET_RESOURCE
from tests.helpers import (
    ClientThreads,
    app_status,
    local_cluster,
    replica_states,
    socket_nodes,
    wait_for_app,
)

pytestmark = pytest.mark.timeout(240)

SERVE_CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"
APP = "llm"
SERVER = "LLMServer"
STEP_DELAY_S = 0.05  # each engine step: a request of MAX_TOKENS takes about 1.5 s
MAX_TOKENS = 30
LOAD_CONCURRENCY = 6  # in flight, against target_ongoing_requests=2: wants 3 replicas, gets 2
DEPLOY_TIMEOUT_S = 90.0
SCALE_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head without sockets and two worker nodes with one socket each; always shut down."""
    with local_cluster(socket_nodes(1)) as (cluster, _):
        yield cluster


@pytest.fixture
def checkpoint_root(tmp_path: Path) -> Path:
    """A shared checkpoint root holding `tiny`, published as llm-checkpoint does."""
    root = tmp_path / "models"

    def build(folder: Path) -> None:
        (folder / "config.json").write_text('{"model_type": "echo"}\n')
        (folder / "model.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB

    publish_checkpoint(build, root / "tiny", source="test", low_bit="sym_int4")
    return root


def deploy(server_options: dict[str, Any], checkpoint_root: Path, cache_dir: Path) -> None:
    """serve_config.yaml's `llm` app with the echo engine; LLMServer options replaced."""
    document = yaml.safe_load(SERVE_CONFIG.read_text())
    (app,) = [a for a in document["applications"] if a["name"] == APP]
    app["args"].update(engine="echo", engine_options={"step_delay_s": STEP_DELAY_S},
                       checkpoint_path=str(checkpoint_root / "tiny"),
                       local_cache_dir=str(cache_dir), device="cpu")
    (server,) = [d for d in app["deployments"] if d["name"] == SERVER]
    server.pop("num_replicas", None)
    server.pop("autoscaling_config", None)
    server.update(server_options)
    config = ServeDeploySchema.model_validate({"applications": [app]})
    # What `serve run serve_config.yaml` does after starting Serve (ray/serve/scripts.py).
    _get_global_client().deploy_apps(config)
    wait_for_app(lambda: app_status() == "RUNNING", DEPLOY_TIMEOUT_S, "the app to run",
             fail_if=lambda: app_status() == "DEPLOY_FAILED")


@pytest.fixture
def delete_app(cluster: Cluster) -> Iterator[None]:
    yield
    serve.delete(APP)


def running_replicas() -> int:
    return replica_states().get("RUNNING", 0)


def sockets_in_use() -> float:
    total = ray.cluster_resources().get(CPU_SOCKET_RESOURCE, 0)
    return total - ray.available_resources().get(CPU_SOCKET_RESOURCE, 0)


def complete(word: str) -> str:
    body = {"model": "smollm2-135m-instruct", "prompt": f"say {word}", "max_tokens": MAX_TOKENS}
    response = serve.get_app_handle(APP).completions.remote(body).result(timeout_s=60)
    return response["choices"][0]["text"]


def echo_of(word: str) -> str:
    """The echo engine's answer: the prompt's last word, repeated, MAX_TOKENS characters."""
    return (word * MAX_TOKENS)[:MAX_TOKENS]


class SustainedLoad(ClientThreads):
    """LOAD_CONCURRENCY threads, each sending one request after another until stopped."""

    def __init__(self) -> None:
        super().__init__(LOAD_CONCURRENCY)
        self.completed = 0
        self.wrong: list[str] = []

    def _run(self, word: str) -> None:
        while not self._stop.is_set():
            try:
                text = complete(word)
            except Exception as error:  # recorded and asserted on, not swallowed
                text = f"{type(error).__name__}: {error}"
            with self._lock:
                if text == echo_of(word):
                    self.completed += 1
                else:
                    self.wrong.append(text)


@pytest.mark.usefixtures("delete_app")
def test_replicas_on_both_nodes_share_one_cached_checkpoint_copy(
    checkpoint_root: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "node-cache"
    deploy({"num_replicas": 2}, checkpoint_root, cache_dir)

    assert running_replicas() == 2
    wait_for_app(lambda: sockets_in_use() == 2, 10, "both sockets to be held")
    # Two replicas, one socket per worker node, both held: one replica on each node.
    assert complete("hello") == echo_of("hello")

    assert cache_dir.is_dir(), "no replica populated local_cache_dir"
    copies = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    leftovers = [p.name for p in cache_dir.iterdir() if ".tmp-" in p.name]
    assert len(copies) == 1, copies
    assert leftovers == []
    (copy,) = copies
    assert copy.is_dir() and not copy.is_symlink()
    source = verify_checkpoint(checkpoint_root / "tiny")
    assert verify_checkpoint(copy) == source  # hash-verified, same manifest as the source


@pytest.mark.usefixtures("delete_app")
def test_sustained_load_adds_a_replica_on_the_other_node_and_removes_it_after(
    checkpoint_root: Path, tmp_path: Path
) -> None:
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 1,
        "downscale_delay_s": 3,
        "look_back_period_s": 2,
        "metrics_interval_s": 0.5,  # how often handles report queue lengths (default 10 s)
    }
    deploy({"autoscaling_config": autoscaling}, checkpoint_root, tmp_path / "node-cache")
    assert replica_states() == {"RUNNING": 1}
    assert sockets_in_use() == 1

    started = time.monotonic()
    with SustainedLoad() as load:
        wait_for_app(lambda: running_replicas() == 2, SCALE_TIMEOUT_S, "a second replica")
        upscaled_after_s = time.monotonic() - started
        wait_for_app(lambda: sockets_in_use() == 2, 10, "the second node's socket to be held")
        served_before = load.completed
        wait_for_app(lambda: load.completed >= served_before + 2 * LOAD_CONCURRENCY,
                 SCALE_TIMEOUT_S, "requests served by two replicas")
    assert load.wrong == []
    assert replica_states() == {"RUNNING": 2}  # max_replicas holds although 6 > 2 x 2

    idle_since = time.monotonic()
    wait_for_app(lambda: replica_states() == {"RUNNING": 1}, SCALE_TIMEOUT_S,
             "the extra replica to go")
    downscaled_after_s = time.monotonic() - idle_since
    assert downscaled_after_s >= autoscaling["downscale_delay_s"] - 1
    wait_for_app(lambda: sockets_in_use() == 1, 10, "the second socket to be released")
    assert complete("after") == echo_of("after")
    print(f"upscaled after {upscaled_after_s:.1f} s of load, "
          f"downscaled after {downscaled_after_s:.1f} s idle, {load.completed} requests")
