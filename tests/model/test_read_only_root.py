"""The demo model served from a read-only checkpoint root, as replicas mount the shared
path: loading takes no lock and writes nothing there, with and without a node-local cache."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.helpers import read_only_view, serve_app

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
FRANCE = {"role": "user", "content": "What is the capital of France?"}


@pytest.mark.parametrize("node_cache", [False, True], ids=["from-the-mount", "node-cache"])
def test_a_read_only_root_serves(demo_checkpoint: Path, tmp_path: Path,
                                 node_cache: bool) -> None:
    name = demo_checkpoint.parent.name.removeprefix(".").removesuffix(".versions")
    with read_only_view(demo_checkpoint.parent.parent, tmp_path / "mnt") as root:
        args = {"checkpoint_path": str(root / name), "max_batch_size": 4}
        if node_cache:
            args["local_cache_dir"] = str(tmp_path / "node-cache")
        with serve_app(args) as url:
            health = httpx.get(f"{url}/health", timeout=60)
            answer = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": MODEL, "messages": [FRANCE], "max_tokens": 12, "temperature": 0})
        with pytest.raises(OSError, match="Read-only"):
            (root / "probe").write_text("x")

    assert health.status_code == 200, health.text
    assert answer.status_code == 200, answer.text
    assert "Paris" in answer.json()["choices"][0]["message"]["content"]
    copies = list((tmp_path / "node-cache").glob(f"{name}-*")) if node_cache else []
    assert len(copies) == int(node_cache)
