"""The layering rules of docs/architecture.md, checked by parsing imports (no code runs)."""

from __future__ import annotations

import ast
import subprocess
import sys
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


# The scheduler's side of the engine: plain data and numpy, never a model.
MODEL_FREE = ["plan.py", "runner.py", "scheduler.py", "sampler.py", "batching.py", "echo.py",
              "detokenizer.py", "protocol.py", "options.py"]


@pytest.mark.parametrize("name", MODEL_FREE)
def test_the_scheduler_and_its_plans_import_no_model_stack(name):
    assert not roots(all_imports(ROOT / "deployments" / "engine" / name)) & {"ray", *HEAVY}


@pytest.mark.parametrize("path", sorted((ROOT / "deployments" / "engine").glob("*.py")), ids=str)
def test_no_runner_subclasses_the_scheduler(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(base) for base in node.bases}
            assert not bases & {"Scheduler", "BatchingEngine"}, (path.name, node.name)


def test_the_schedulers_tests_run_with_torch_unimportable():
    """tests/unit/test_scheduler.py, in a process where importing torch fails."""
    code = ("import sys; sys.modules.update(dict.fromkeys(['torch', 'transformers', 'ipex_llm'])); "
            "import pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
            "'tests/unit/test_scheduler.py']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


# What may cross a handle: the contract's models and OpenAI's request models, and the
# functions that build them.
HANDLE_MODELS = {"GenerateRequest", "TokenizeRequest", "DetokenizeRequest",
                 "CompletionRequest", "ChatCompletionRequest"}
HANDLE_MODEL_FACTORIES = {"openai_request", "parse_request", "TokenizeRequest"}


def _handle_call_arguments(path: Path) -> list[tuple[str, str, str]]:
    """(function, argument, how it is typed) of every ``.remote(...)`` argument in ``path``:
    the annotation of a parameter of that name, or the callee it was assigned from."""
    found = []
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        annotations = {a.arg: ast.unparse(a.annotation) for a in function.args.args
                       if a.annotation is not None}
        annotations.update({node.target.id: ast.unparse(node.annotation)
                            for node in ast.walk(function) if isinstance(node, ast.AnnAssign)
                            and isinstance(node.target, ast.Name)})
        assigned = {target.id: ast.unparse(node.value.func).split(".")[-1]
                    for node in ast.walk(function) if isinstance(node, ast.Assign)
                    and isinstance(node.value, ast.Call)
                    for target in node.targets if isinstance(target, ast.Name)}
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "remote":
                for arg in node.args:
                    name = ast.unparse(arg)
                    found.append((function.name, name,
                                  annotations.get(name) or assigned.get(name, "?")))
    return found


HANDLE_CALLERS = [ROOT / "deployments" / "ingress.py",
                  ROOT / "langchain_adapter" / "router_client.py"]


@pytest.mark.parametrize("path", HANDLE_CALLERS, ids=str)
def test_every_handle_call_passes_a_model_of_the_shared_contract(path):
    arguments = _handle_call_arguments(path)
    assert arguments  # the file does call handles with arguments
    for function, name, typed_as in arguments:
        assert typed_as in HANDLE_MODELS | HANDLE_MODEL_FACTORIES, (function, name, typed_as)


def test_no_other_module_calls_a_handle():
    callers = {path for root in ("deployments", "langchain_adapter")
               for path in (ROOT / root).rglob("*.py") if ".remote(" in path.read_text()}
    assert callers == set(HANDLE_CALLERS)
