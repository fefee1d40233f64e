"""Shared test plumbing: a Ray + Serve instance per test module, free ports, SSE parsing."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import ray
from ray import serve

from deployments.app import build_app


def free_port() -> int:
    with socket.socket() as sock:
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
        app = _with_server_options(args, server_options) if server_options else build_app(args)
        serve.run(app, name="llm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def _with_server_options(args: dict[str, Any], options: dict[str, Any]) -> Any:
    """build_app with LLMServer options changed, as serve_config.yaml's deployments: does."""
    from deployments.config import LLMConfig
    from deployments.ingress import LLMRouter
    from deployments.server import LLMServer

    config = LLMConfig.model_validate(args)
    return LLMRouter.bind(LLMServer.options(**options).bind(config), config)


def sse_events(text: str) -> list[Any]:
    """The JSON payloads of an SSE body, with the final [DONE] as the string "[DONE]"."""
    events = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def server_stats() -> dict[str, Any]:
    return serve.get_deployment_handle("LLMServer", app_name="llm").stats.remote().result()
