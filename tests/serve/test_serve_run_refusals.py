"""`serve run` with a config Serve cannot build: refused with a message naming the problem,
before any model replica starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import stop_process_tree

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
SERVE_RUN_DEADLINE_S = 120.0


def test_serve_run_refuses_a_misspelt_option_before_a_replica_starts(tmp_path: Path) -> None:
    """What an operator sees: Serve fails to build the application, naming the option."""
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    app["args"].update(engine="echo", engine_options={"step_delay": 0.01})
    config["http_options"]["port"] = 0
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "serve-run.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "serve"), "run", str(path)], cwd=REPO,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    try:
        deadline = time.monotonic() + SERVE_RUN_DEADLINE_S
        while "engine_options.echo.step_delay" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
    finally:
        stop_process_tree(process)
    text = log.read_text()
    assert "Extra inputs are not permitted" in text
    assert "LLMServer" not in text  # no replica was ever started
