"""The layering rules of docs/architecture.md, checked by parsing imports (no code runs)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "transformers", "ipex_llm", "intel_extension_for_pytorch"}


def top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (imports inside functions are lazy and allowed)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def all_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def roots(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("path", sorted((ROOT / "deployments").rglob("*.py")), ids=str)
def test_no_module_imports_the_model_stack_at_import_time(path):
    assert not roots(top_level_imports(path)) & HEAVY


@pytest.mark.parametrize("path", sorted((ROOT / "deployments" / "engine").glob("*.py")), ids=str)
def test_the_engine_knows_nothing_of_ray_or_http(path):
    imported = roots(all_imports(path))
    assert not imported & {"ray", "starlette", "fastapi", "httpx"}


def test_the_engine_protocol_imports_neither_ray_nor_torch():
    assert not roots(all_imports(ROOT / "deployments/engine/protocol.py")) & {"ray", *HEAVY}


def test_the_replica_knows_nothing_of_http():
    imported = roots(all_imports(ROOT / "deployments/server.py"))
    assert not imported & {"starlette", "fastapi"}


def test_the_router_never_touches_torch_or_engines():
    imported = all_imports(ROOT / "deployments/ingress.py")
    assert not roots(imported) & HEAVY
    assert not any(name.startswith("deployments.engine") for name in imported)


@pytest.mark.parametrize("path", sorted((ROOT / "langchain_adapter").rglob("*.py")), ids=str)
def test_the_adapter_never_imports_engines_or_torch(path):
    """Calls go through the handle; only from_model_id's conversion loads the model stack,
    lazily, on the client that converts."""
    assert not roots(top_level_imports(path)) & HEAVY
    assert not any(name.startswith("deployments.engine") for name in all_imports(path))


BELOW_THE_ROUTER = sorted([*(ROOT / "deployments" / "engine").glob("*.py"),
                           ROOT / "deployments" / "engine_loop.py",
                           ROOT / "deployments" / "server.py"])


@pytest.mark.parametrize("path", BELOW_THE_ROUTER, ids=str)
def test_below_the_router_nothing_knows_http_statuses(path):
    """Engines and the replica say why a request failed with an ErrorKind; the router alone
    maps kinds to HTTP statuses and OpenAI's error JSON."""
    text = path.read_text()
    assert "status_code" not in text and "HTTPException" not in text
    assert not roots(all_imports(path)) & {"starlette", "fastapi", "http"}
