"""Node loss under load, shared by the echo-engine test and the demo-model test.

A one-machine Ray cluster (tests.helpers.local_cluster): a head with the Serve proxy and
the router, pinned there by a resource only the head advertises (a router on the lost node
would take every connection with it; that is Serve's proxy/ingress failover, not ours), and
two worker nodes with one `cpu_socket` each, so serve_config.yaml's `llm` app with
`device: cpu` and two LLMServer replicas has one replica per worker node.

Losing a node, two ways; nothing tells the GCS, which notices by its own health checks:
- killed: its raylet and every process under it (the replica's worker, the agents)
  SIGKILLed together, as when a host loses power; their connections reset at once;
- frozen: the same processes stopped (SIGSTOP), as when a host hangs or drops off the
  network: connections stay open and nothing answers (killed for good afterwards).

Each request's outcome is one kind (``Outcome.kind``): completed, retried (completed after
the router retried it elsewhere: its Serve request id is in the router's "retrying" log
line), errored_stream (a stream that had begun ended with an error event, then [DONE]),
refused (a clean 503 with Retry-After and OpenAI's error JSON, streaming or not), hung (no
answer within HANG_S), bad (anything else: a 500, a stream without [DONE], wrong text).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import ray
import yaml
from ray._private import ray_constants
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from bench.ray_tuning import ray_tuning_env
from deployments.placement import CPU_SOCKET_RESOURCE
from tests.helpers import (
    app_status,
    free_port,
    local_cluster,
    replica_states,
    socket_nodes,
    sse_events,
    wait_for_app,
)

SERVE_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"
APP = "llm"
SERVER = "LLMServer"
ROUTER = "LLMRouter"
MODEL = "smollm2-135m-instruct"
HEAD_RESOURCE = "node_loss_head"  # only the head has it: the router runs there
HANG_S = 60.0  # a request without its answer by then counts as hung
POLL_S = 0.25
KINDS = ("completed", "retried", "errored_stream", "refused", "hung", "bad")


@dataclass
class Outcome:
    index: int
    stream: bool
    kind: str = "hung"
    status: int | None = None
    text: str = ""
    error: dict[str, Any] | None = None
    seconds: float = 0.0
    first_token_s: float | None = None  # when a stream's first token arrived
    request_id: str = ""  # its Serve request id (X-Request-Id)
    was_retried: bool = False  # the router retried it elsewhere (whatever came of it)

    def describe(self) -> str:
        retried = " (retried)" if self.was_retried and self.kind != "retried" else ""
        return (f"#{self.index} {'stream' if self.stream else 'whole'} {self.kind}{retried} "
                f"{self.status} {self.seconds:.1f}s {self.error or self.text[:40]!r}")


@dataclass
class Cluster:
    """The running cluster: Ray's Cluster, its two worker nodes, the proxy's base URL."""
    ray_cluster: Any
    nodes: list[Any]
    base_url: str


@dataclass
class NodeLossReport:
    outcomes: list[Outcome]
    lost_after_s: float  # when the node was lost, after the first request was sent
    node_dead_after_s: float | None  # when the GCS declared it dead, after it was lost

    def counts(self) -> dict[str, int]:
        counted = Counter(outcome.kind for outcome in self.outcomes)
        return {kind: counted.get(kind, 0) for kind in KINDS}

    def summary(self) -> str:
        by_stream = Counter((o.kind, o.stream) for o in self.outcomes)
        split = ", ".join(f"{kind} {by_stream[kind, True]}+{by_stream[kind, False]}"
                          for kind in KINDS)
        slowest = max(o.seconds for o in self.outcomes)
        dead = ("the GCS had not declared it dead when the last answer ended"
                if self.node_dead_after_s is None else
                f"the GCS declared it dead {self.node_dead_after_s:.1f} s later")
        return (f"node lost {self.lost_after_s:.1f} s into {len(self.outcomes)} requests "
                f"({dead}): "
                f"{self.counts()} (streaming+non-streaming: {split}); slowest "
                f"{slowest:.1f} s")


def start_cluster() -> Iterator[Cluster]:
    """The cluster for a module fixture (a generator: always shut down).

    Every node runs with the shipped Ray settings (cluster/ray_tuning.env, as `make serve`
    and the cluster docs give them), among them RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS=1
    (read by the Serve controller): a replica that fails its health checks is killed at once
    instead of being asked to drain for graceful_shutdown_timeout_s (130 s in
    serve_config.yaml). A replica on a hung node can drain nothing, and until it is killed
    (or the GCS declares its node dead, a minute later) Ray fails none of the calls it
    holds: those not begun would wait for their deadline (504) instead of being retried
    elsewhere."""
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in ray_tuning_env().items():
            patch.setenv(key, value)
        with local_cluster(socket_nodes(1), head_args={"resources": {HEAD_RESOURCE: 1}},
                           http_port=port) as (ray_cluster, nodes):
            yield Cluster(ray_cluster, nodes, f"http://127.0.0.1:{port}")


def deploy(args: dict[str, Any], timeout_s: float) -> None:
    """serve_config.yaml's `llm` app with ``args`` over its own, two LLMServer replicas (one
    per worker node, noticed dead within seconds), the router pinned to the head; deployed
    through the controller's config path, as `serve run` and `serve deploy` do."""
    document = yaml.safe_load(SERVE_CONFIG.read_text())
    (app,) = [a for a in document["applications"] if a["name"] == APP]
    app["args"].update(device="cpu", **args)
    deployments = {d["name"]: d for d in app["deployments"]}
    server = deployments[SERVER]
    server.pop("autoscaling_config", None)
    server.update(num_replicas=2, health_check_period_s=1, health_check_timeout_s=5)
    deployments[ROUTER]["ray_actor_options"] = {"num_cpus": 0,
                                               "resources": {HEAD_RESOURCE: 0.01}}
    config = ServeDeploySchema.model_validate({"applications": [app]})
    _get_global_client().deploy_apps(config)
    wait_for_app(lambda: replica_states() == {"RUNNING": 2} and app_status() == "RUNNING",
             timeout_s, "the app to run with two replicas",
             fail_if=lambda: app_status() == "DEPLOY_FAILED")


def sockets_in_use() -> float:
    total = ray.cluster_resources().get(CPU_SOCKET_RESOURCE, 0)
    return total - ray.available_resources().get(CPU_SOCKET_RESOURCE, 0)


def server_replica_nodes() -> dict[str, str]:
    """Each live LLMServer replica's actor name -> its node id."""
    actors = ray._private.state.actors().values()  # the GCS's table: no dashboard needed
    return {actor["Name"]: actor["Address"]["NodeID"] for actor in actors
            if actor["State"] == "ALIVE" and f"#{SERVER}#" in actor["Name"]}


def node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def node_processes(node: Any) -> list[psutil.Process]:
    """The node's raylet and every process under it (workers, agents)."""
    (raylet,) = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
    root = psutil.Process(raylet.process.pid)
    return [root, *root.children(recursive=True)]


def lose_node(cluster: Cluster, node: Any, family: list[psutil.Process]) -> None:
    """The node's processes (``family``) SIGKILLed at once; the GCS is not told."""
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(family, timeout=10)
    cluster.ray_cluster.remove_node(node, allow_graceful=False)  # bookkeeping; all dead
    cluster.nodes.remove(node)


def freeze_node(family: list[psutil.Process]) -> None:
    """The node's processes stopped (SIGSTOP): connections stay open and nothing answers,
    as when a host hangs or drops off the network."""
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.suspend()


def retried_request_ids(session_dir: Path) -> set[str]:
    """Serve request ids (our X-Request-Id) in the router's "retrying" log lines."""
    ids = set()
    for path in (session_dir / "logs" / "serve").glob(f"replica_{APP}_{ROUTER}_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if "replica lost before the first token; retrying" in line:
                ids.update(word for word in line.split() if word.startswith("nodeloss-"))
    return ids


async def _ask(client: httpx.AsyncClient, outcome: Outcome, body: dict[str, Any],
               started: float, first_tokens: asyncio.Queue[int]) -> None:
    headers = {"X-Request-Id": outcome.request_id}
    if not outcome.stream:
        response = await client.post("/v1/completions", json=body, headers=headers)
        outcome.status = response.status_code
        _read_error_or_text(outcome, response.status_code, response.headers, response.content,
                            lambda data: data["choices"][0]["text"])
        return
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True},
                             headers=headers) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            _read_error_or_text(outcome, response.status_code, response.headers,
                                await response.aread(), lambda data: "")
            return
        events: list[Any] = []
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
            if outcome.first_token_s is None and data != "[DONE]" and "error" not in events[-1]:
                outcome.first_token_s = time.monotonic() - started
                first_tokens.put_nowait(outcome.index)
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    outcome.text = "".join(e["choices"][0]["text"] for e in events
                           if isinstance(e, dict) and "choices" in e)
    if not events or events[-1] != "[DONE]" or len(errors) > 1 or \
            (errors and "error" not in events[-2]):
        outcome.kind, outcome.error = "bad", {"events": events[-3:]}
    elif errors:
        outcome.error = errors[0]
        ok = errors[0].get("type") == "service_unavailable_error"
        outcome.kind = "errored_stream" if ok else "bad"
    else:
        outcome.kind = "completed"


def _read_error_or_text(outcome: Outcome, status: int, headers: Any, content: bytes,
                        text_of: Callable[[Any], str]) -> None:
    try:
        data = json.loads(content)
    except ValueError:
        outcome.kind, outcome.error = "bad", {"body": content[:200].decode(errors="replace")}
        return
    if status == 200:
        outcome.kind, outcome.text = "completed", text_of(data)
    elif (status == 503 and headers.get("retry-after")
          and data.get("error", {}).get("type") == "service_unavailable_error"):
        outcome.kind, outcome.error = "refused", data["error"]
    else:
        outcome.kind, outcome.error = "bad", data


def run_node_loss(cluster: Cluster, bodies: list[dict[str, Any]], streams_before_loss: int,
                  then_s: float, hang_s: float = HANG_S, freeze: bool = False
                  ) -> NodeLossReport:
    """``bodies`` sent at once (even indices streaming); ``then_s`` after
    ``streams_before_loss`` streams have their first token, the first worker node is lost.
    Every request gets ``hang_s`` to finish. Completed answers are not checked here (the
    caller knows them)."""
    node = cluster.nodes[0]
    node_id = node.node_id
    family = node_processes(node)
    run = uuid.uuid4().hex[:8]
    outcomes = [Outcome(i, stream=i % 2 == 0, request_id=f"nodeloss-{run}-{i}")
                for i in range(len(bodies))]

    async def scenario() -> tuple[float, float | None]:
        first_tokens: asyncio.Queue[int] = asyncio.Queue()
        limits = httpx.Limits(max_connections=len(bodies) + 8)
        async with httpx.AsyncClient(base_url=cluster.base_url, limits=limits,
                                     timeout=hang_s + 5) as client:
            started = time.monotonic()

            async def one(outcome: Outcome, body: dict[str, Any]) -> None:
                try:
                    async with asyncio.timeout(hang_s):
                        await _ask(client, outcome, body, started, first_tokens)
                except TimeoutError:
                    outcome.kind = "hung"
                except httpx.HTTPError as error:  # the connection to the proxy broke
                    outcome.kind, outcome.error = "bad", {"exception": repr(error)}
                outcome.seconds = time.monotonic() - started

            tasks = [asyncio.ensure_future(one(o, b)) for o, b in zip(outcomes, bodies,
                                                                       strict=True)]
            async with asyncio.timeout(hang_s):
                for _ in range(streams_before_loss):
                    await first_tokens.get()
            await asyncio.sleep(then_s)
            lost_after_s = time.monotonic() - started
            if freeze:
                await asyncio.to_thread(freeze_node, family)
            else:
                await asyncio.to_thread(lose_node, cluster, node, family)
            lost_at = time.monotonic()

            async def declared_dead() -> float:
                while await asyncio.to_thread(node_alive, node_id):
                    await asyncio.sleep(POLL_S)
                return time.monotonic() - lost_at

            dead = asyncio.ensure_future(declared_dead())
            await asyncio.gather(*tasks)
            if freeze and not dead.done():  # it may take a minute: not worth waiting for
                dead.cancel()
                return lost_after_s, None
            async with asyncio.timeout(hang_s):
                return lost_after_s, await dead

    try:
        lost_after_s, dead_after_s = asyncio.run(scenario())
    finally:
        if node in cluster.nodes:  # frozen (or the scenario failed first): end it for good
            lose_node(cluster, node, family)
    retried = retried_request_ids(Path(cluster.ray_cluster.head_node.get_session_dir_path()))
    for outcome in outcomes:
        outcome.was_retried = outcome.request_id in retried
        if outcome.kind == "completed" and outcome.was_retried:
            outcome.kind = "retried"
    return NodeLossReport(outcomes, lost_after_s, dead_after_s)


def bring_node_back(cluster: Cluster, timeout_s: float) -> str:
    """Once the lost replica is gone, a node like the lost one joins; Serve starts the
    replacement replica there. Returns the replacement's actor name."""
    wait_for_app(lambda: replica_states().get("RUNNING") == 1, timeout_s,
             "the lost replica to be gone")
    node = cluster.ray_cluster.add_node(**socket_nodes(1)[0])
    cluster.nodes.append(node)
    wait_for_app(lambda: replica_states() == {"RUNNING": 2}, timeout_s,
             "a replacement replica on the new node")
    assert sockets_in_use() == 2
    (replacement,) = [name for name, node_id in server_replica_nodes().items()
                      if node_id == node.node_id]
    return replacement


async def ask_all(base_url: str, bodies: list[dict[str, Any]],
                  timeout_s: float = HANG_S) -> list[str]:
    """Each body's answer text (all sent at once, even indices streaming); anything but
    a complete answer fails."""
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as client:
        async def ask(i: int, body: dict[str, Any]) -> str:
            response = await client.post("/v1/completions", json={**body, "stream": i % 2 == 0})
            assert response.status_code == 200, response.text
            if i % 2:
                return response.json()["choices"][0]["text"]
            events = sse_events(response.text)
            assert events[-1] == "[DONE]", response.text
            return "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])

        return list(await asyncio.gather(*(ask(i, b) for i, b in enumerate(bodies))))


def finished_requests(cluster: Cluster, replica_actor_name: str) -> int:
    """Requests the replica's log records as finished (RequestTrace's request_end lines)."""
    suffix = replica_actor_name.rsplit("#", 1)[-1]
    session = Path(cluster.ray_cluster.head_node.get_session_dir_path())
    (log,) = (session / "logs" / "serve").glob(f"replica_{APP}_{SERVER}_{suffix}.log")
    return log.read_text(errors="replace").count('"status": "finished"')
