"""Scheduling by the cpu_socket resource on a real multi-node Ray cluster (one machine).

Two worker nodes advertise one socket each, as cluster/start-node.sh does on a one-socket
host. A trivial deployment (not the LLM) gets its ray_actor_options from
replica_ray_options("cpu", ...), claims its slot like an LLM replica, and reports it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
from ray import serve
from ray.serve.api import RunTarget

from deployments.placement import CPU_SOCKET_RESOURCE, claim_slot, replica_ray_options
from tests.helpers import local_cluster, socket_nodes

pytestmark = pytest.mark.timeout(180)

CALL_S = 0.3
PENDING_OBSERVATION_S = 4.0
RUNNING_TIMEOUT_S = 60.0


@serve.deployment(max_ongoing_requests=1)
class SlotReporter:
    """Claims a CPU socket as an LLM replica would, and tells which one it got, where."""

    def __init__(self, lock_dir: str) -> None:
        node_id = ray.get_runtime_context().get_node_id()
        self._claim = claim_slot("cpu_socket", node_id=node_id, lock_dir=lock_dir)

    def __call__(self) -> dict:
        time.sleep(CALL_S)  # keeps each replica busy, so concurrent calls reach both
        return self._claim.slot.to_dict()


@pytest.fixture(scope="module")
def worker_node_ids() -> Iterator[list[str]]:
    """A head without sockets (but with CPUs to spare) and two one-socket worker nodes."""
    with local_cluster(socket_nodes(2)) as (_, workers):
        yield [node.node_id for node in workers]


def reporter(num_replicas: int, lock_dir: Path):
    options = replica_ray_options("cpu", ray.cluster_resources())
    return SlotReporter.options(num_replicas=num_replicas, ray_actor_options=options).bind(
        str(lock_dir)
    )


def replica_states(app: str) -> dict[str, int]:
    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return dict(status.deployments["SlotReporter"].replica_states)


def test_socket_replicas_land_on_different_nodes(
    worker_node_ids: list[str], tmp_path: Path
) -> None:
    handle = serve.run(reporter(2, tmp_path), name="two-sockets", route_prefix=None)
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            slots = list(pool.map(lambda _: handle.remote().result(), range(6)))
    finally:
        serve.delete("two-sockets")

    assert {slot["node_id"] for slot in slots} == set(worker_node_ids)
    assert {(slot["kind"], slot["index"]) for slot in slots} == {("cpu", 0)}


def test_third_socket_replica_stays_pending(worker_node_ids: list[str], tmp_path: Path) -> None:
    serve.run_many(
        [RunTarget(reporter(3, tmp_path), name="three-replicas", route_prefix=None)],
        wait_for_applications_running=False,
    )
    try:
        deadline = time.monotonic() + RUNNING_TIMEOUT_S
        while replica_states("three-replicas").get("RUNNING", 0) < 2:
            assert time.monotonic() < deadline, replica_states("three-replicas")
            time.sleep(0.5)
        time.sleep(PENDING_OBSERVATION_S)  # the third replica must not start meanwhile

        states = replica_states("three-replicas")
        app = serve.status().applications["three-replicas"]
        assert states.get("RUNNING") == 2, states
        assert sum(states.values()) == 3, states
        assert app.status != "RUNNING"
        assert app.deployments["SlotReporter"].status == "UPDATING"
        assert ray.available_resources().get(CPU_SOCKET_RESOURCE, 0) == 0
        assert ray.available_resources().get("CPU", 0) >= 1  # CPUs were not what blocked it
    finally:
        serve.delete("three-replicas")
