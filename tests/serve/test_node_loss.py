"""Losing a worker node under load, with the echo engine, and getting it back.

tests/node_loss.py builds the cluster (a head with the proxy and the router, two worker
nodes with one CPU socket and one LLMServer replica each), loses a node the way a host
loses power (or hangs), and sorts each request's outcome into one kind. The echo engine answers with
the prompt's last word repeated, one character per token, so every completed answer is
checked exactly; its steps take STEP_DELAY_S, so each replica runs a full batch of
MAX_BATCH_SIZE requests for about MAX_TOKENS * STEP_DELAY_S and queues as many more,
which have no token yet when the node goes.

Run with -s to see the counts per kind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.node_loss import (
    MODEL,
    Cluster,
    ask_all,
    bring_node_back,
    deploy,
    finished_requests,
    run_node_loss,
    server_replica_nodes,
    start_cluster,
)

pytestmark = pytest.mark.timeout(240)

STEP_DELAY_S = 0.05
MAX_BATCH_SIZE = 8
MAX_TOKENS = 60
REQUESTS = 4 * MAX_BATCH_SIZE  # two replicas, each a running batch and a queued one
ARGS: dict[str, Any] = {
    "engine": "echo", "checkpoint_path": "/unused", "max_batch_size": MAX_BATCH_SIZE,
    "engine_options": {"step_delay_s": STEP_DELAY_S}, "request_timeout_s": 30}
DEPLOY_TIMEOUT_S = 90.0
RECOVERY_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    yield from start_cluster()


def body(word: str, tokens: int = MAX_TOKENS) -> dict[str, Any]:
    return {"model": MODEL, "prompt": f"say {word}", "max_tokens": tokens}


def echo(word: str, tokens: int = MAX_TOKENS) -> str:
    return (word * tokens)[:tokens]


def lose_a_node_under_load(cluster: Cluster, *, freeze: bool) -> None:
    """The scenario and its checks; the lost replica's replacement then runs on a new node
    and serves."""
    assert set(server_replica_nodes().values()) == {node.node_id for node in cluster.nodes}
    # A third into the first batches: both replicas are streaming, and have as many queued.
    report = run_node_loss(cluster, [body(f"w{i}") for i in range(REQUESTS)],
                           streams_before_loss=MAX_BATCH_SIZE // 2,
                           then_s=MAX_TOKENS * STEP_DELAY_S / 3, freeze=freeze)
    print(f"echo engine, node {'frozen' if freeze else 'killed'}: {report.summary()}")
    described = [outcome.describe() for outcome in report.outcomes]
    counts = report.counts()
    assert counts["hung"] == 0, described
    assert counts["bad"] == 0, described
    for outcome in report.outcomes:
        if outcome.kind in ("completed", "retried"):
            assert outcome.text == echo(f"w{outcome.index}"), outcome.describe()
    # The lost replica's running batch fails (its answers had begun), and nothing more:
    # what it had queued, with no token yet, is retried on the survivor.
    failed = counts["errored_stream"] + counts["refused"]
    assert 0 < failed <= MAX_BATCH_SIZE, described
    assert counts["retried"] > 0, described

    # Meanwhile the survivor serves alone; the replacement waits for a node with a socket.
    words = [f"s{i}" for i in range(4)]
    assert asyncio.run(ask_all(cluster.base_url, [body(w, 5) for w in words])) == [
        echo(w, 5) for w in words]
    replacement = bring_node_back(cluster, RECOVERY_TIMEOUT_S)
    words = [f"b{i}" for i in range(2 * MAX_BATCH_SIZE)]  # more than one replica's batch
    assert asyncio.run(ask_all(cluster.base_url, [body(w, 5) for w in words])) == [
        echo(w, 5) for w in words]
    assert finished_requests(cluster, replacement) > 0


def test_a_node_killed_under_load_fails_only_started_answers_and_comes_back(
        cluster: Cluster) -> None:
    deploy(ARGS, DEPLOY_TIMEOUT_S)
    lose_a_node_under_load(cluster, freeze=False)


def test_a_node_frozen_under_load_fails_only_started_answers_and_comes_back(
        cluster: Cluster) -> None:
    """Serve's health checks find the frozen replica (health_check_timeout_s) and kill it;
    only then does Ray fail the calls it holds, and the router retries those not begun."""
    deploy(ARGS, DEPLOY_TIMEOUT_S)  # as it is: the first test's app, if it ran
    lose_a_node_under_load(cluster, freeze=True)
