"""The Ray Serve settings the project ships for small hosts (cluster/ray_tuning.env).

``make serve`` puts them in the environment of ``serve run``; the benchmark starts Ray
itself, so it applies them the same way before ``ray.init`` (Ray's processes read them at
start), to measure the service as shipped.
"""

from __future__ import annotations

import os
from pathlib import Path

RAY_TUNING_FILE = Path(__file__).resolve().parents[1] / "cluster" / "ray_tuning.env"


def ray_tuning_env(path: Path = RAY_TUNING_FILE) -> dict[str, str]:
    """``KEY=VALUE`` lines of ``path`` (``#`` comments and blank lines skipped)."""
    settings = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or " " in line:
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        settings[key] = value
    return settings


def apply_ray_tuning() -> dict[str, str]:
    """Put the shipped settings into this process's environment (a value already set
    there wins: a what-if run can override one); returns what is now in effect."""
    settings = ray_tuning_env()
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in settings}
