"""build_app: the one wiring module. ``serve run serve_config.yaml`` calls it with the
application's ``args``; it validates them, decides where replicas may run, and binds the two
deployments, nothing more."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

import ray
from ray.serve import Application

from deployments.config import LLMConfig
from deployments.ingress import LLMRouter
from deployments.placement import replica_ray_options, resolve_placement
from deployments.server import LLMServer


def build_app(args: dict[str, Any]) -> Application:
    """The application for ``args`` (serve_config.yaml's application args)."""
    return bind_app(LLMConfig.model_validate(args or {}))


def bind_app(config: LLMConfig, *, server_options: dict[str, Any] | None = None) -> Application:
    """The application for ``config``; ``server_options`` are LLMServer deployment options
    (what serve_config.yaml's ``deployments:`` section sets), for Python callers and tests.

    Replicas ask Ray for their slot's resource (one GPU, or one ``cpu_socket``), as
    ``device`` and the cluster's advertised resources decide, and no CPUs: the slot is
    the unit of capacity. Where nothing is advertised the slot is a whole host, reserved
    as a node's CPUs. Both deployments get a fresh prometheus-client multiprocess
    directory (per node, per deploy) as a constructor argument, so the router's /metrics
    aggregates every replica process of its node. An operator who sets
    ``ray_actor_options`` in serve_config.yaml replaces the placement options and must
    carry them over.
    """
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    slot_placement = resolve_placement(config.device, resources, cpu_only=config.cpu_only)
    metrics_dir = str(Path(tempfile.gettempdir()) / "ipex-llm-serve-metrics" / uuid.uuid4().hex)
    server = LLMServer.options(ray_actor_options={
        "num_cpus": _host_cpus() if slot_placement == "host" and config.engine != "echo" else 0,
        **replica_ray_options(config.device, resources, config.accelerator_type,
                              cpu_only=config.cpu_only)},
        **(server_options or {}))
    router = LLMRouter.options(ray_actor_options={"num_cpus": 0})
    return router.bind(server.bind(config, slot_placement, metrics_dir), config, metrics_dir)


def _host_cpus() -> float:
    """CPUs a whole-host replica reserves: a node's CPUs (the smallest node's), so that a
    second model replica waits in Ray's queue instead of sharing the host's cores. The
    model-free echo engine owns no hardware and reserves nothing."""
    if not ray.is_initialized():
        return 0
    counts = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    return min((c for c in counts if c > 0), default=0)
