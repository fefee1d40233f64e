"""Fixtures of the tests that run the real demo model (marked `model`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.constants import DEMO_CHECKPOINT_DIR, DEMO_GGUF_CHECKPOINT_DIR
from deployments.convert import ensure_demo_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The verified version folder of the demo checkpoint (SmolLM2-135M-Instruct, sym_int4).

    Reuses the repository's DEMO_CHECKPOINT_DIR when it verifies, else converts it there
    first (about 30 s on 2 cores), so test sessions after the first start at once.
    Read-only: tests that damage a checkpoint work on a copy.
    """
    return ensure_demo_checkpoint(REPO_ROOT / DEMO_CHECKPOINT_DIR)


@pytest.fixture(scope="session")
def gguf_checkpoint() -> Path:
    """The verified version folder of the demo's gguf checkpoint (the GGUF's own q4_1), for
    engine llama_cpp; built like ``demo_checkpoint`` (about 10 s)."""
    return ensure_demo_checkpoint(REPO_ROOT / DEMO_GGUF_CHECKPOINT_DIR, checkpoint_format="gguf")
