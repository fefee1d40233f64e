"""What crosses the handles between the router, the model replicas and the engines, defined
once for all of them. Today: why a request got no answer (``ErrorKind``); typed request and
output messages are to follow.

Imports neither ray nor torch nor anything of HTTP.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.StrEnum):
    """Why a request got no answer, in the engine's terms. The router alone maps a kind to
    an HTTP status and OpenAI's error JSON; nothing below it knows HTTP."""

    INVALID_REQUEST = "invalid_request"  # the request cannot be served as asked
    MISCONFIGURED = "misconfigured"  # the engine, its options or its checkpoint are wrong
    UNAVAILABLE = "unavailable"  # the engine failed or is gone: retry, another replica may serve
    TIMEOUT = "timeout"  # the request's deadline passed before the model answered
