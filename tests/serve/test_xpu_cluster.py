"""Intel GPU tiles on a real multi-node Ray cluster (one machine, fake devices).

Two worker nodes declare 2 GPUs each, as cluster/start-node.sh does on a host with one Data
Center GPU Max 1550 (2 tiles). No dpctl is installed here, so Ray hands the GPU ids out
through its NVIDIA accelerator manager (CUDA_VISIBLE_DEVICES) and sets no Level Zero mask,
as on a GPU node without dpctl. ``torch.xpu`` is faked in every worker (tests.fake_xpu), the
device boundary and nothing else: the replicas are build_app's LLMServer (engine echo: the
model is not the point), and each records the mask it saw at its first XPU call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray import serve

from deployments.app import bind_app
from deployments.checkpoints import publish_checkpoint
from deployments.config import LLMConfig
from langchain_adapter import RayServeLLM
from tests.fake_xpu import DEVICE_NAME, RECORD_DIR_ENV
from tests.helpers import local_cluster, write_tiny_model

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
TILES_PER_NODE = 2
REPLICAS = 4
HEALTH_DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("first-xpu-calls")


@pytest.fixture(scope="module")
def gpu_node_ids(record_dir: Path) -> Iterator[list[str]]:
    # PYTHONPATH: the hook runs before Ray puts the job's code on the worker's path.
    runtime_env = {"worker_process_setup_hook": "tests.fake_xpu.install",
                   "env_vars": {RECORD_DIR_ENV: str(record_dir), "PYTHONPATH": str(REPO)}}
    nodes = [{"num_cpus": 1, "num_gpus": TILES_PER_NODE} for _ in range(2)]
    with local_cluster(nodes, runtime_env=runtime_env) as (_, workers):
        yield [node.node_id for node in workers]


def replica_healths(app: str, replicas: int) -> list[dict[str, Any]]:
    """``health()`` of each of the app's ``replicas`` LLMServer replicas (by pid)."""
    handle = serve.get_deployment_handle("LLMServer", app_name=app)
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + HEALTH_DEADLINE_S
    while len(seen) < replicas:
        assert time.monotonic() < deadline, f"reached {len(seen)} of {replicas} replicas"
        for health in [handle.health.remote() for _ in range(4 * replicas)]:
            result = health.result()
            seen[result["pid"]] = result
    return list(seen.values())


def test_each_xpu_replica_is_masked_to_its_own_tile_before_it_touches_the_runtime(
        gpu_node_ids: list[str], record_dir: Path) -> None:
    config = LLMConfig(engine="echo", device="xpu", checkpoint_path="/unused")
    serve.run(bind_app(config, server_options={"num_replicas": REPLICAS}), name="tiles",
              route_prefix=None)
    try:
        healths = replica_healths("tiles", REPLICAS)
    finally:
        serve.delete("tiles")

    every_tile = {(node, str(tile)) for node in gpu_node_ids for tile in range(TILES_PER_NODE)}
    records = [json.loads((record_dir / f"{h['pid']}.json").read_text()) for h in healths]
    assert {(r["node_id"], r["ZE_AFFINITY_MASK"]) for r in records} == every_tile
    assert {r["ONEAPI_DEVICE_SELECTOR"] for r in records} == {"level_zero:0"}
    slots = [h["slot"] for h in healths]
    assert {(s["node_id"], str(s["index"])) for s in slots} == every_tile
    assert {(s["kind"], s["device"], s["name"]) for s in slots} == {("xpu", "xpu:0", DEVICE_NAME)}
    for health in healths:
        env = health["pinning"]["env"]
        assert env["ZE_AFFINITY_MASK"] == str(health["slot"]["index"])
        assert env["SYCL_CACHE_PERSISTENT"] == "1"


def test_the_adapters_device_xpu_reaches_the_replicas(gpu_node_ids: list[str],
                                                       tmp_path: Path) -> None:
    """IpexLLM's ``model_kwargs={"device": "xpu"}``: the application's replicas run on tiles."""
    checkpoint = tmp_path / "tiny-sym_int4"
    publish_checkpoint(write_tiny_model, checkpoint, source="tiny", low_bit="sym_int4")
    app = "tiny-on-xpu"
    try:
        llm = RayServeLLM.from_model_id_low_bit(checkpoint, {"device": "xpu", "max_tokens": 3},
                                                app_name=app, app_args={"engine": "echo"})
        assert llm.invoke("say hello") == "hel"
        (health,) = replica_healths(app, 1)
    finally:
        serve.delete(app)

    assert (health["slot"]["kind"], health["slot"]["device"]) == ("xpu", "xpu:0")
    assert health["slot"]["node_id"] in gpu_node_ids
