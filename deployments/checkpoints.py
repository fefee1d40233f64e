"""Low-bit checkpoints on a shared path: manifest, atomic publishing, verification, node cache.

A checkpoint is a folder holding the model files, the tokenizer files and ``manifest.json``
(format, source, low-bit type, library versions, every file with size and sha256). Two
formats, one set of rules: ``ipex_llm`` (``save_low_bit``'s output, read by IpexLLMRunner)
and ``gguf`` (one ``model.gguf``, read by LlamaCppRunner).

Layout of a published checkpoint called ``name`` under ``root``::

    <root>/<name>                         symlink -> .<name>.versions/<version id>
    <root>/.<name>.versions/<version id>/ immutable version folders, never changed once renamed in
    <root>/.<name>.tmp-<random>/          a build in progress (removed if the build fails)
    <root>/.<name>.lock                   file lock serialising publishers of <name>

A version id is ``<UTC timestamp>-<random hex>``, so ids sort by publishing time. Publishing
renames the finished build into place and then swaps the symlink with rename(2): a reader
sees the old version or the new one, never half of one, and a reader that resolved the name
before a swap keeps a complete folder (old versions are never deleted here; remove them by
hand once no replica uses them).

Only the standard library, pydantic, filelock and tqdm are imported: the ingress and the unit
tests use this module without the model stack installed.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tqdm import tqdm

from deployments.constants import (
    GGUF_MODEL_FILE,
    LOW_BITS,
    MANIFEST_FILE,
    MANIFEST_FORMAT_VERSION,
    CheckpointFormat,
)

# Libraries whose versions a checkpoint records, by format and manifest key: (distribution
# name, how many leading version parts must match the running one; 0: recorded only).
# save_low_bit pickles tensors laid out by ipex-llm's own transforms (merged qkv, its
# quantized formats) under transformers' module names, so those two must agree on
# major.minor; torch only has to read the file. GGUF is a versioned file format that
# llama.cpp checks itself when it loads one, and tokenizer.json is stable: recorded only.
_TRACKED_LIBRARIES: dict[str, dict[str, tuple[str, int]]] = {
    "ipex_llm": {
        "torch": ("torch", 1),
        "transformers": ("transformers", 2),
        "ipex_llm": ("ipex-llm", 2),
    },
    "gguf": {
        "llama_cpp_python": ("llama-cpp-python", 0),
        "transformers": ("transformers", 0),
    },
}
_HASH_CHUNK_BYTES = 4 << 20
# Errors of the file system being written to, whatever file they name.
_DESTINATION_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
logger = logging.getLogger(__name__)
# Files a checkpoint of each format cannot load without, and what the weights end with.
_REQUIRED_FILES: dict[str, tuple[str, ...]] = {"ipex_llm": ("config.json",),
                                               "gguf": (GGUF_MODEL_FILE,)}
_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".gguf")


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, corrupt or incompatible.

    The message is one line naming the checkpoint path and the problem, fit for a CLI's
    stderr or a replica's failed health check.
    """


class _Defect(Exception):
    """A problem found inside a checkpoint; verify_checkpoint prefixes the path once."""


class ManifestFile(BaseModel):
    """One file of a checkpoint, by path relative to the checkpoint folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _inside_folder(cls, value: str) -> str:
        # A crafted manifest must not make verify or copy look outside the checkpoint.
        parts = PurePosixPath(value).parts
        if not parts or value.startswith("/") or ".." in parts or value == MANIFEST_FILE:
            raise ValueError(f"{value!r} is not a relative path inside the checkpoint")
        return value


class Manifest(BaseModel):
    """What ``manifest.json`` records about a checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int
    name: str
    format: CheckpointFormat = Field(
        "ipex_llm", description="ipex_llm: save_low_bit output; gguf: one model.gguf file.")
    source: str = Field(description="The model it was converted from: folder, hub id or GGUF.")
    low_bit: str = Field(description="ipex-llm low-bit type (load_in_low_bit), or the GGUF "
                                     "file type (q4_1, q8_0, ...).")
    created_at: str = Field(description="UTC, ISO 8601.")
    versions: dict[str, str] = Field(description="Library versions that made it.")
    files: tuple[ManifestFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)


def installed_versions(checkpoint_format: CheckpointFormat = "ipex_llm") -> dict[str, str]:
    """Versions of the libraries tracked for a format that are installed here (read from
    metadata, not imported)."""
    found = {}
    for key, (distribution, _) in _TRACKED_LIBRARIES[checkpoint_format].items():
        try:
            found[key] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def write_manifest(folder: str | os.PathLike[str], *, source: str, low_bit: str,
                   name: str, checkpoint_format: CheckpointFormat = "ipex_llm") -> Manifest:
    """Hash every file under ``folder`` (recursively) and write ``folder/manifest.json``."""
    folder = Path(folder)
    sizes = {path: (folder / path).stat().st_size for path in _files_under(folder)}
    digests = _sha256_files(folder, sizes, desc=f"hashing {name}")
    manifest = Manifest(
        format_version=MANIFEST_FORMAT_VERSION,
        name=name,
        format=checkpoint_format,
        source=source,
        low_bit=low_bit,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        versions=installed_versions(checkpoint_format),
        files=tuple(ManifestFile(path=path, size=size, sha256=digests[path])
                    for path, size in sizes.items()),
    )
    (folder / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def gguf_file_type(path: str | os.PathLike[str]) -> str:
    """The quantization a GGUF file declares (``general.file_type``), e.g. ``q4_1``.

    Raises ValueError, worded for the user, if the file is not a readable GGUF file
    (truncated, or not GGUF at all) or declares no type. gguf is imported here, not at the
    top, as it is only needed for GGUF files.
    """
    import gguf

    try:
        field = gguf.GGUFReader(path).fields.get("general.file_type")
    except (ValueError, IndexError, OSError) as error:
        # gguf's reader fails with IndexError or ValueError on a truncated file.
        raise ValueError(f"not a readable GGUF file ({error})") from None
    if field is None:
        raise ValueError("declares no general.file_type")
    value = int(field.parts[field.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").lower()
    except ValueError:
        return f"file_type_{value}"


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The absolute, symlink-free version folder that ``path`` names.

    A published name is a symlink; resolving it once and using the result from then on keeps
    a reader on one immutable version even if a new one is published meanwhile.
    """
    given = Path(path).expanduser().absolute()
    if not os.path.lexists(given):
        raise CheckpointError(f"checkpoint {given}: does not exist")
    try:
        folder = given.resolve()
    except (RuntimeError, OSError):  # RuntimeError before Python 3.13
        raise CheckpointError(f"checkpoint {given}: is a symlink loop") from None
    if not folder.exists():
        raise CheckpointError(f"checkpoint {given}: points at {folder}, which does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {given}: is not a folder")
    return folder


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The manifest of the checkpoint ``path`` names, parsed but not checked against the
    files or this environment (to tell what a checkpoint is before deciding what to do).

    Raises CheckpointError naming the path if it is missing or unreadable.
    """
    folder = resolve_checkpoint(path)
    try:
        return _read_manifest(folder)
    except _Defect as defect:
        raise CheckpointError(f"checkpoint {Path(path).expanduser().absolute()}: "
                              f"{defect}") from None


def verify_checkpoint(path: str | os.PathLike[str], *,
                      supported_low_bits: Iterable[str] | None = None,
                      checkpoint_format: CheckpointFormat | None = None,
                      quick: bool = False) -> Manifest:
    """Check the checkpoint ``path`` names against its manifest and this environment.

    Checks, in order: the manifest exists and parses; its format is ``checkpoint_format``
    (when given: what the loading engine reads); it lists the format's model files; an
    ipex_llm checkpoint's low-bit type is one of ``supported_low_bits`` (default: every type
    ``llm-checkpoint`` makes); the libraries that made it are compatible with the installed
    ones; the folder holds exactly the listed files, each of the listed size and (unless
    ``quick``) sha256; a gguf checkpoint's model.gguf is of the manifest's type. ``quick``
    skips hashing, for callers that re-check a folder they verified before.

    Raises CheckpointError naming the path and the first problem found.
    """
    folder = resolve_checkpoint(path)
    given = Path(path).expanduser().absolute()
    label = str(given) if given == folder else f"{given} (version {folder})"
    try:
        manifest = _read_manifest(folder)
        if checkpoint_format is not None and manifest.format != checkpoint_format:
            raise _Defect(f"has format {manifest.format}, and this engine reads "
                          f"{checkpoint_format} checkpoints (see `engine` in the config)")
        _check_model_files_listed(manifest)
        if manifest.format == "ipex_llm":
            _check_low_bit(manifest.low_bit, tuple(supported_low_bits or LOW_BITS))
        _check_versions(manifest.versions, installed_versions(manifest.format),
                        _TRACKED_LIBRARIES[manifest.format])
        _check_files(folder, manifest.files, quick=quick)
        if manifest.format == "gguf":
            _check_gguf_type(folder / GGUF_MODEL_FILE, manifest.low_bit)
    except _Defect as defect:
        raise CheckpointError(f"checkpoint {label}: {defect}") from None
    return manifest


def publish_checkpoint(build: Callable[[Path], None], destination: str | os.PathLike[str], *,
                       source: str, low_bit: str, force: bool = False,
                       checkpoint_format: CheckpointFormat = "ipex_llm") -> Path:
    """Build a checkpoint in a temporary folder and publish it atomically as ``destination``.

    ``build(folder)`` writes the model files into an empty folder; this function adds the
    manifest, renames the folder to a new immutable version and points ``destination`` at it
    (see the module docstring for the layout). An existing ``destination`` is refused unless
    ``force``, which publishes a new version and leaves the old one in place for its readers.
    Concurrent publishers are serialised by a file lock; the last one to finish wins the
    name. If anything fails, the temporary folder is removed; a file-system error (a full
    disk, say) becomes a one-line CheckpointError.

    Returns the new version folder.
    """
    destination = Path(destination).expanduser().absolute()
    make_parent_folder(destination)
    _refuse_existing(destination, force=force)  # before a build that may take minutes
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-",
                                        dir=destination.parent))
    except OSError as error:
        raise _cannot_create(destination, error) from None
    try:
        staging.chmod(0o755)  # mkdtemp makes it 0700; replicas may run as other users
        build(staging)
        write_manifest(staging, source=source, low_bit=low_bit, name=destination.name,
                       checkpoint_format=checkpoint_format)
        with FileLock(destination.parent / f".{destination.name}.lock"):
            _refuse_existing(destination, force=force)
            version = _versions_folder(destination) / _new_version_id()
            version.parent.mkdir(exist_ok=True)
            staging.rename(version)
            staging = version  # unpublished until the pointer switches: still ours to remove
            _point(destination, version)
    except BaseException as error:
        # An interrupt can land just after the pointer switched: then the version is out.
        if os.path.realpath(destination) != os.path.realpath(staging):
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):  # a full disk, a lost mount: one line, not a traceback
            # (A full disk names whichever file the failing call had: maybe the source.)
            where = "" if error.errno in _DESTINATION_ERRNOS or not error.filename else \
                f" ({error.filename})"
            raise CheckpointError(
                f"cannot publish the checkpoint at {destination}: "
                f"{error.strerror or error}{where}; nothing was published and its partial "
                "build was removed (the name still points at its previous version, if "
                "any)") from None
        raise
    return version


def cached_copy(checkpoint: str | os.PathLike[str], cache_root: str | os.PathLike[str]) -> Path:
    """A verified node-local copy of the checkpoint's current version, made once per node.

    The copy lives in ``cache_root/<name>-<first 16 hex of the manifest's sha256>``: one
    folder per distinct version, whatever path it was reached by. The first caller copies
    (under a file lock in ``cache_root``, into a temporary folder, every file hashed against
    the manifest, then renamed); later callers reuse the copy only while its manifest's
    digest equals the source's and its files have the listed sizes, without hashing again
    and without a lock, so replicas on one node read and hash the network copy once. A
    copy that fails that check is made again. Nothing is written next to the source: a
    read-only checkpoint root is fine.
    """
    folder = resolve_checkpoint(checkpoint)
    manifest = verify_checkpoint(folder, quick=True)
    digest = manifest_digest(folder)
    key = f"{manifest.name}-{digest[:16]}"
    cache_root = Path(cache_root).expanduser().absolute()
    target = cache_root / key
    if _holds_copy(target, digest):
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_root / f".{key}.lock"):
        if _holds_copy(target, digest):  # another replica copied while we waited
            return target
        shutil.rmtree(target, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_root))
        try:
            shutil.copytree(folder, staging, dirs_exist_ok=True)
            verify_checkpoint(staging)
            if manifest_digest(staging) != digest:
                raise CheckpointError(f"checkpoint {folder}: its manifest changed while it "
                                      "was copied; retry")
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


@dataclass(frozen=True)
class ReplicaCheckpoint:
    """The checkpoint version a replica loads, and where that copy came from."""

    folder: Path  # a version folder (or node-local copy): never changes under the replica
    manifest: Manifest
    digest: str  # manifest_digest: tells versions apart
    hashes_verified: bool  # the files were hashed against the manifest on this node
    origin: str  # "shared", "local cache", or "local cache (shared path unreadable)"

    def describe(self) -> dict[str, str]:
        """What /health reports: which version this replica serves, and from where."""
        return {"name": self.manifest.name, "created_at": self.manifest.created_at,
                "manifest_sha256": self.digest, "folder": str(self.folder),
                "origin": self.origin}


def replica_checkpoint(checkpoint: str | os.PathLike[str],
                       cache_root: str | os.PathLike[str] | None = None) -> ReplicaCheckpoint:
    """The version a starting replica loads: the one ``checkpoint`` names now, resolved
    once (a later publish under the name reaches new replicas only), through the node-local
    cache when ``cache_root`` is set.

    If the shared path cannot be read (unmounted, gone, an I/O error) and ``cache_root``
    holds a verified copy of a checkpoint of that name, the newest such copy is used, so a
    node keeps starting replicas through a storage outage. A checkpoint that reads but is
    defective is never replaced by a cached one. Raises CheckpointError, one line naming
    the path and the problem, when there is nothing to load.
    """
    given = Path(checkpoint).expanduser().absolute()
    try:
        if cache_root:
            folder, origin = cached_copy(given, cache_root), "local cache"
        else:
            folder, origin = resolve_checkpoint(given), "shared"
        return ReplicaCheckpoint(folder, read_manifest(folder), manifest_digest(folder),
                                 hashes_verified=bool(cache_root), origin=origin)
    except (CheckpointError, OSError) as error:
        reason = str(error) if isinstance(error, CheckpointError) else \
            f"checkpoint {given}: cannot be read: {error.strerror or error}"
        if _readable(given) or not cache_root:
            raise CheckpointError(reason) from None
        fallback = newest_cached_copy(given.name, cache_root)
        if fallback is None:
            raise CheckpointError(f"{reason}; and local_cache_dir {cache_root} holds no "
                                  f"verified copy of {given.name}") from None
    logger.warning("%s; serving the node-local copy %s instead", reason, fallback)
    return ReplicaCheckpoint(fallback, read_manifest(fallback), manifest_digest(fallback),
                             hashes_verified=True,
                             origin="local cache (shared path unreadable)")


def newest_cached_copy(name: str, cache_root: str | os.PathLike[str]) -> Path | None:
    """The most recently published checkpoint called ``name`` among the finished copies in
    ``cache_root`` (by manifest; sizes checked), or None. ``created_at`` counts seconds, so
    two versions published within one second are told apart by which was copied last."""
    found: list[tuple[str, float, Path]] = []
    with contextlib.suppress(OSError):
        for folder in Path(cache_root).glob(f"{glob.escape(name)}-*"):
            with contextlib.suppress(OSError, CheckpointError):
                manifest = read_manifest(folder)
                if manifest.name == name and _holds_copy(folder, manifest_digest(folder)):
                    found.append((manifest.created_at, folder.stat().st_mtime_ns, folder))
    return max(found)[2] if found else None


def _readable(path: Path) -> bool:
    """Whether the checkpoint's storage answers: the name resolves and its manifest can be
    opened (a defect inside is then the checkpoint's, not the storage's)."""
    try:
        with open(path.resolve(strict=True) / MANIFEST_FILE, "rb"):
            return True
    except FileNotFoundError:
        return os.path.isdir(path.resolve())  # a folder without a manifest: a defect
    except (OSError, RuntimeError):
        return False


def manifest_digest(folder: str | os.PathLike[str]) -> str:
    """sha256 of a checkpoint folder's manifest file: it names the version's every file by
    hash, so equal digests mean equal checkpoints."""
    return hashlib.sha256((Path(folder) / MANIFEST_FILE).read_bytes()).hexdigest()


def _holds_copy(target: Path, digest: str) -> bool:
    """Whether ``target`` is a finished cache copy of the checkpoint whose manifest digest
    is ``digest`` (its files were hashed when it was made; sizes catch a damaged disk)."""
    try:
        if manifest_digest(target) != digest:
            return False
        verify_checkpoint(target, quick=True)
    except (OSError, CheckpointError):
        return False
    return True


# ---- verification steps: each raises _Defect ------------------------------------------------


def _read_manifest(folder: Path) -> Manifest:
    file = folder / MANIFEST_FILE
    if not file.is_file():
        raise _Defect(f"{MANIFEST_FILE} is missing (not a checkpoint, or an unfinished one)")
    try:
        document = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Defect(f"{MANIFEST_FILE} is unreadable: {error}") from None
    found_format = document.get("format_version") if isinstance(document, dict) else None
    if found_format != MANIFEST_FORMAT_VERSION:
        raise _Defect(f"{MANIFEST_FILE} has format_version {found_format!r}, this code reads "
                      f"{MANIFEST_FORMAT_VERSION}")
    try:
        return Manifest.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise _Defect(f"{MANIFEST_FILE} is malformed: {where}: {first['msg']}") from None


def _check_model_files_listed(manifest: Manifest) -> None:
    """A manifest without the model's files would verify an empty folder as a checkpoint."""
    listed = {entry.path for entry in manifest.files}
    for required in _REQUIRED_FILES[manifest.format]:
        if required not in listed:
            raise _Defect(f"{MANIFEST_FILE} lists no {required} (a {manifest.format} "
                          "checkpoint needs one)")
    if not any(path.endswith(_WEIGHT_SUFFIXES) for path in listed):
        raise _Defect(f"{MANIFEST_FILE} lists no weights file")


def _check_gguf_type(file: Path, low_bit: str) -> None:
    """The GGUF's own type must be the one the manifest records (what engines report)."""
    try:
        found = gguf_file_type(file)
    except ValueError as error:
        raise _Defect(f"file {GGUF_MODEL_FILE}: {error}") from None
    if found != low_bit:
        raise _Defect(f"file {GGUF_MODEL_FILE} is {found}, {MANIFEST_FILE} says {low_bit!r}")


def _check_low_bit(low_bit: str, supported: tuple[str, ...]) -> None:
    if low_bit not in supported:
        raise _Defect(f"low-bit type {low_bit!r} is not supported here "
                      f"(supported: {', '.join(supported)})")


def _check_versions(recorded: dict[str, str], running: dict[str, str],
                    tracked: dict[str, tuple[str, int]]) -> None:
    for key, here in running.items():
        parts = tracked[key][1]
        if parts == 0:
            continue
        made_with = recorded.get(key)
        if made_with is None:
            raise _Defect(f"{MANIFEST_FILE} records no {key} version")
        if _leading_parts(made_with, parts) != _leading_parts(here, parts):
            rule = "major.minor" if parts == 2 else "major version"
            raise _Defect(f"made with {key} {made_with}, incompatible with the installed {here} "
                          f"({rule} must match; convert it again)")


def _leading_parts(version: str, count: int) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:count])


def _check_files(folder: Path, entries: tuple[ManifestFile, ...], *, quick: bool) -> None:
    listed = {entry.path for entry in entries}
    for path in _files_under(folder):
        if path not in listed:
            raise _Defect(f"file {path} is not listed in {MANIFEST_FILE}")
    for entry in entries:
        file = folder / entry.path
        if not file.is_file():
            raise _Defect(f"file {entry.path} is missing")
        size = file.stat().st_size
        if size != entry.size:
            raise _Defect(f"file {entry.path} has {size} bytes, {MANIFEST_FILE} says "
                          f"{entry.size} (truncated or replaced)")
    if quick:
        return
    digests = _sha256_files(folder, {entry.path: entry.size for entry in entries},
                            desc=f"verifying {folder.name}")
    for entry in entries:
        if digests[entry.path] != entry.sha256:
            raise _Defect(f"file {entry.path} sha256 mismatch (manifest {entry.sha256[:12]}..., "
                          f"file {digests[entry.path][:12]}...): corrupt or modified")


# ---- files and hashes ------------------------------------------------------------------------


def _files_under(folder: Path) -> list[str]:
    """Relative POSIX paths of every file under ``folder`` but the manifest, sorted."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                  if path.is_file() and path != folder / MANIFEST_FILE)


def _sha256_files(folder: Path, sizes: dict[str, int], *, desc: str) -> dict[str, str]:
    """sha256 of each file, with one byte-counting progress bar (shown on terminals only)."""
    digests = {}
    with tqdm(total=sum(sizes.values()), desc=desc, unit="B", unit_scale=True,
              disable=None, leave=False) as progress:
        for path in sizes:
            digest = hashlib.sha256()
            with open(folder / path, "rb") as file:
                while chunk := file.read(_HASH_CHUNK_BYTES):
                    digest.update(chunk)
                    progress.update(len(chunk))
            digests[path] = digest.hexdigest()
    return digests


# ---- publishing ------------------------------------------------------------------------------


def make_parent_folder(destination: Path) -> None:
    """Create the folder ``destination`` will be published in.

    Raises CheckpointError if it cannot be made (a file in the way, no permission, a
    read-only or virtual file system), so callers report one line instead of an OSError.
    """
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cannot_create(destination, error) from None


def _cannot_create(destination: Path, error: OSError) -> CheckpointError:
    reason = error.strerror or str(error)
    return CheckpointError(f"cannot create the checkpoint at {destination}: {reason}")


def _refuse_existing(destination: Path, *, force: bool) -> None:
    if not os.path.lexists(destination):
        return
    if not destination.is_symlink():
        raise CheckpointError(f"checkpoint {destination}: exists and is not a published name "
                              "(a symlink to a version folder), so it cannot be replaced "
                              "atomically; remove it or choose another output")
    if not force:
        raise CheckpointError(f"checkpoint {destination}: already exists; use --force "
                              "(force=True) to publish a new version under this name")


def _versions_folder(destination: Path) -> Path:
    return destination.parent / f".{destination.name}.versions"


def _new_version_id() -> str:
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(4)}"


def _point(destination: Path, version: Path) -> None:
    """Make ``destination`` a symlink to ``version``, atomically replacing an older one.

    The target is relative, so the tree stays valid wherever the shared path is mounted.
    """
    link = destination.with_name(f".{destination.name}.link-{secrets.token_hex(4)}")
    os.symlink(os.path.relpath(version, destination.parent), link)
    try:
        os.replace(link, destination)
    except BaseException:
        link.unlink(missing_ok=True)
        raise
