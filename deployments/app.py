"""build_app: the one wiring module. ``serve run serve_config.yaml`` calls it with the
application's ``args``; it validates them, decides where replicas may run, and binds the two
deployments, nothing more."""

from __future__ import annotations

from typing import Any

import ray
from ray.serve import Application

from deployments.config import LLMConfig
from deployments.ingress import LLMRouter
from deployments.placement import resolve_placement, replica_ray_options
from deployments.server import LLMServer


def build_app(args: dict[str, Any]) -> Application:
    """The application for ``args``.

    Replicas ask Ray for their slot's resource (one GPU, or one ``cpu_socket``), as
    ``device`` and the cluster's advertised resources decide, and no CPUs: the slot is
    the unit of capacity. An operator who sets ``ray_actor_options`` for LLMServer in
    serve_config.yaml replaces these and must name the resource there.
    """
    config = LLMConfig.model_validate(args or {})
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    server = LLMServer.options(ray_actor_options={
        "num_cpus": 0, **replica_ray_options(config.device, resources, config.accelerator_type)})
    return LLMRouter.bind(server.bind(config, resolve_placement(config.device, resources)),
                          config)
