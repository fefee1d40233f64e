"""build_app: the one wiring module. ``serve run serve_config.yaml`` calls it with the
application's ``args``; it validates them and binds the two deployments, nothing more."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.config import LLMConfig
from deployments.ingress import LLMRouter
from deployments.server import LLMServer


def build_app(args: dict[str, Any]) -> Application:
    config = LLMConfig.model_validate(args or {})
    return LLMRouter.bind(LLMServer.bind(config), config)
