"""ServiceError: every error a caller can act on, with its HTTP status and OpenAI JSON.

The router raises it for HTTP and handle callers alike; over HTTP it becomes OpenAI's
error JSON, through a handle (the LangChain adapter) it arrives as this exception (Ray
wraps it; ``ServiceError.from_exception`` unwraps). It pickles with all its fields, which
Ray needs to carry it between processes.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

# Where pydantic names the member of a union in an error's location: `str`,
# `list[constrained-int]`, a model's class name. Field names are snake_case.
_UNION_TAG = re.compile(r"[\[\-]|^(str|int|float|bool|bytes|none|list|dict)$|^[A-Z]")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ServiceError(Exception):
    def __init__(self, message: str, status_code: int = 400, param: str | None = None,
                 retry_after_s: int | None = None, code: str | None = None):
        super().__init__(message, status_code, param, retry_after_s, code)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.retry_after_s = retry_after_s
        self.code = code

    def __str__(self) -> str:
        return f"{self.status_code} {self.error_type}: {self.message}"

    @property
    def error_type(self) -> str:
        return _ERROR_TYPES.get(self.status_code, "invalid_request_error")

    @property
    def retriable(self) -> bool:
        return self.status_code in (429, 503)

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else {}

    @classmethod
    def from_validation(cls, error: ValidationError) -> ServiceError:
        errors = error.errors(include_url=False)
        # A union field fails once per form it may take: report the form that got furthest
        # (a value out of range beats a wrong type), located without pydantic's form tags.
        first = max((e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]),
                    key=lambda e: (not e["type"].endswith(("_type", "_parsing")), len(e["loc"])))
        location = ".".join(str(part) for part in first["loc"]
                            if not (isinstance(part, str) and _UNION_TAG.search(part)))
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "json_invalid":
            return cls(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                       .rstrip(": "))
        if location:
            message = f"{location}: {message}"
        return cls(message, param=location or None)

    @classmethod
    def from_exception(cls, error: BaseException) -> ServiceError | None:
        """The ServiceError inside ``error`` (a Ray wrapper or the error itself), if any."""
        seen = 0
        current: BaseException | None = error
        while current is not None and seen < 5:
            if isinstance(current, ServiceError):
                return cls(current.message, current.status_code, current.param,
                           current.retry_after_s, current.code)
            current = getattr(current, "cause", None) or current.__cause__
            seen += 1
        return None
