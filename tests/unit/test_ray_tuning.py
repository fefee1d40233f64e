"""The shipped Ray settings (cluster/ray_tuning.env) name settings Ray Serve or Ray's
dashboard agent reads."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ray_tuning import ray_tuning_env

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_read_by_ray_serve_and_takes_effect() -> None:
    settings = ray_tuning_env()
    assert settings, "cluster/ray_tuning.env is empty"
    modules = ("ray.serve._private.constants", "ray.dashboard.modules.reporter.reporter_consts")
    source = "".join(Path(importlib.import_module(m).__file__).read_text() for m in modules)
    for key in settings:
        assert f'"{key}"' in source, f"Ray no longer reads {key}"
    # In a fresh interpreter with the settings, each one changes one of those modules'
    # constants to its value (compared with an interpreter without them).
    probe = ("import importlib, json; print(json.dumps({f'{m}.{k}': v for m in "
             f"{list(modules)!r} for k, v in vars(importlib.import_module(m)).items() if "
             "k.isupper() and isinstance(v, (int, float))}))")  # bools too: True == 1

    def constants(env: dict[str, str]) -> dict[str, float]:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env=env, check=True).stdout
        return json.loads(out)

    plain_env = {k: v for k, v in os.environ.items() if k not in settings}
    plain, tuned = constants(plain_env), constants({**plain_env, **settings})
    changed = {tuned[k] for k in tuned if tuned[k] != plain.get(k)}
    for key, value in settings.items():
        assert float(value) in changed, f"{key}={value} changed no Ray constant"


def test_make_serve_runs_with_the_settings() -> None:
    dry_run = subprocess.run(["make", "-n", "serve", "serve-llama-cpp"],
                             cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    serve_lines = [line for line in dry_run.splitlines() if "serve run" in line]
    assert len(serve_lines) == 2
    for line in serve_lines:
        for key, value in ray_tuning_env().items():
            assert f"{key}={value}" in line


def test_a_malformed_line_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "ray.env"
    bad.write_text("# fine\nRAY_SERVE_X=1\nnot a setting\n")
    with pytest.raises(ValueError, match=r"ray.env:3: expected KEY=VALUE"):
        ray_tuning_env(bad)
