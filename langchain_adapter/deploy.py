"""Deploy (or reuse) a Serve application for a model, the way IpexLLM's constructors load one.

``from_model_id`` converts a model once, with the checkpoint CLI's code, into the checkpoint
root; ``from_model_id_low_bit`` publishes a folder ipex-llm's ``save_low_bit`` wrote (or uses
a published checkpoint as it is). Both then run ``build_app`` as a Serve application named
after the checkpoint, unless it already runs. A file lock in the checkpoint root keeps two
clients from converting the same model twice; reusing a published checkpoint takes no lock
and writes nothing, so a read-only mount of the root serves. A node-local lock keeps two
clients on one machine from deploying the same application twice.

The checkpoint root must be a path the cluster's nodes read at the same place (a shared
mount), since the replicas load the checkpoint from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from ray import serve
from ray.serve.schema import ApplicationStatus

from deployments.checkpoints import (
    CheckpointError,
    make_parent_folder,
    publish_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from deployments.constants import DEMO_CHECKPOINT_DIR, MANIFEST_FILE
from deployments.convert import convert_checkpoint
from langchain_adapter.router_client import connect_ray

CHECKPOINT_ROOT_ENV = "LLM_CHECKPOINT_ROOT"
# Where `make serve` keeps the demo checkpoint: the root when neither argument nor env names one.
DEFAULT_CHECKPOINT_ROOT = Path(DEMO_CHECKPOINT_DIR).parent
# config.json key in which ipex-llm's save_low_bit records the low-bit type.
_SAVED_LOW_BIT_KEY = "bigdl_transformers_low_bit"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_REUSABLE = (ApplicationStatus.RUNNING, ApplicationStatus.DEPLOYING)
# Deploy locks are this machine's business, never the (possibly read-only) checkpoint root's.
DEPLOY_LOCK_DIR = Path(tempfile.gettempdir()) / "ipex-llm-serve-deploy"


@dataclass(frozen=True)
class Deployment:
    app_name: str
    model_name: str


def resolve_checkpoint_root(root: str | os.PathLike[str] | None) -> Path:
    """``root``, else $LLM_CHECKPOINT_ROOT, else ``checkpoints`` (relative to this process)."""
    chosen = root or os.environ.get(CHECKPOINT_ROOT_ENV) or DEFAULT_CHECKPOINT_ROOT
    return Path(chosen).expanduser().absolute()


def deploy_model(model_id: str, *, low_bit: str, trust_remote_code: bool, root: Path,
                 app_name: str | None, app_args: Mapping[str, Any] | None,
                 route_prefix: str | None) -> Deployment:
    """``model_id`` (hub id, model folder or .gguf file) converted once and served."""
    local = Path(model_id).expanduser()
    if local.exists():
        source = str(local.absolute())
        name = f"{_slug(local.stem)}-{_digest(local.absolute())}-{low_bit}"
        model_name = local.stem
    else:
        source = model_id
        name = f"{_slug(model_id.replace('/', '--'))}-{low_bit}"
        model_name = model_id
    output = root / name

    def convert(force: bool) -> Path:
        return convert_checkpoint(source, output, low_bit=low_bit,
                                  trust_remote_code=trust_remote_code, force=force)

    version = _publish_once(output, source=source, low_bit=low_bit, publish=convert)
    return _serve(version, model_name, app_name or f"llm-{name}", app_args, route_prefix)


def deploy_low_bit(path: str | os.PathLike[str], *, tokenizer_id: str | None,
                   trust_remote_code: bool, root: Path, app_name: str | None,
                   app_args: Mapping[str, Any] | None, route_prefix: str | None) -> Deployment:
    """A published checkpoint served as it is, or a ``save_low_bit`` folder published first
    (with the tokenizer of ``tokenizer_id`` when given) and then served."""
    given = Path(path).expanduser().absolute()
    if tokenizer_id is None:
        try:
            manifest = verify_checkpoint(given, quick=True)
        except CheckpointError:
            pass  # not published by llm-checkpoint: publish a copy below
        else:  # served under its name without the low-bit suffix, as serve_config.yaml does
            model_name = manifest.name.removesuffix(f"-{manifest.low_bit}")
            return _serve(resolve_checkpoint(given), model_name, app_name or
                          f"llm-{manifest.name}", app_args, route_prefix)
    low_bit = _saved_low_bit(given)
    name = f"{_slug(given.name)}-{_digest(given)}"
    output = root / name

    def build(folder: Path) -> None:
        shutil.copytree(given, folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(MANIFEST_FILE))
        if tokenizer_id is not None:
            from transformers import AutoTokenizer  # the model stack, only for this case

            AutoTokenizer.from_pretrained(tokenizer_id, trust_remote_code=trust_remote_code
                                          ).save_pretrained(str(folder))
        elif not any((folder / file).is_file() for file in _TOKENIZER_FILES):
            raise CheckpointError(f"{given} holds no tokenizer files; pass tokenizer_id")

    def publish(force: bool) -> Path:
        return publish_checkpoint(build, output, source=str(given), low_bit=low_bit,
                                  force=force)

    version = _publish_once(output, source=str(given), low_bit=low_bit, publish=publish)
    return _serve(version, given.name, app_name or f"llm-{name}", app_args, route_prefix)


def _publish_once(output: Path, *, source: str, low_bit: str,
                  publish: Callable[[bool], Path]) -> Path:
    """The version folder published as ``output`` from ``source``: reused when it verifies
    (sizes only; replicas hash it when they load or cache it), else published now.

    Reuse is tried first without a lock, so a read-only root serves what it holds; only
    publishing takes the root's lock (and checks again under it: another client may have
    published meanwhile)."""
    reusable = _reusable(output, source=source, low_bit=low_bit)
    if reusable is not None:
        return reusable
    make_parent_folder(output)  # a CheckpointError naming the root if it cannot be made
    with FileLock(output.parent / f".{output.name}.adapter.lock"):
        reusable = _reusable(output, source=source, low_bit=low_bit)
        return reusable or publish(os.path.lexists(output))


def _reusable(output: Path, *, source: str, low_bit: str) -> Path | None:
    """``output``'s version folder if it holds ``source`` at ``low_bit`` and verifies, else
    None (absent, incomplete, another source, or made by other library versions)."""
    if not os.path.lexists(output):
        return None
    try:
        manifest = verify_checkpoint(output, quick=True)
    except CheckpointError:
        return None
    if manifest.source != source or manifest.low_bit != low_bit:
        return None
    return resolve_checkpoint(output)


def _serve(version: Path, model_name: str, app_name: str, app_args: Mapping[str, Any] | None,
           route_prefix: str | None) -> Deployment:
    """Run the application unless it runs (or is starting) already.

    It is deployed from the immutable version folder, so publishing a newer version later
    never changes what a running replica reloads. Serve, if it does not run yet, starts
    without HTTP proxies when nobody asked for a route: no port is opened for nothing.
    """
    from deployments.app import build_app  # the serving package, only when deploying

    connect_ray()
    if route_prefix is None:
        serve.start(proxy_location="Disabled")  # no-op when Serve runs already
    args = {**(app_args or {}), "model_name": model_name, "checkpoint_path": str(version)}
    DEPLOY_LOCK_DIR.mkdir(parents=True, exist_ok=True)
    with FileLock(DEPLOY_LOCK_DIR / f"{_slug(app_name)}.lock"):
        status = serve.status().applications.get(app_name)
        if status is None or status.status not in _REUSABLE:
            serve.run(build_app(args), name=app_name, route_prefix=route_prefix)
    return Deployment(app_name, model_name)


def _saved_low_bit(folder: Path) -> str:
    config = folder / "config.json"
    try:
        low_bit = json.loads(config.read_text()).get(_SAVED_LOW_BIT_KEY)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: not a low-bit model folder ({error})") from None
    if not low_bit:
        raise CheckpointError(f"{folder}: config.json has no {_SAVED_LOW_BIT_KEY}; not saved by "
                              "ipex-llm's save_low_bit (use from_model_id for other models)")
    return str(low_bit)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "model"


def _digest(path: Path) -> str:
    """Eight hex digits of where a local source is: same-named folders get distinct names."""
    return hashlib.sha256(str(path).encode()).hexdigest()[:8]
