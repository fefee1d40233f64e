"""Cold-start costs, each in a fresh interpreter (so imports count as they do in a replica).

    python -m bench.coldstart convert --gguf FILE --output out.json   # GGUF -> checkpoint
    python -m bench.coldstart load --checkpoint DIR --output out.json # checkpoint -> engine

``convert`` is what a replica that converts at start-up would pay (deployments.convert's
``convert_checkpoint``, into a scratch folder); ``load`` splits ``IpexLLMEngine.load`` into
the model stack's imports, manifest verification (sha256 of every file), ipex-llm's bare
``load_low_bit`` and the tokenizer. Both report their peak RSS (VmHWM). The bare
``load_low_bit`` imports ``torch._dynamo`` (its meta ``torch.cat``), which our engine's load
avoids (deployments/engine/ipex_meta_merge.py): that import is timed on its own first, as
``dynamo_import_s``, and counts in the bare path.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_STARTED = time.perf_counter()  # before any heavy import


def vm_hwm_bytes(pid: int | str = "self") -> int | None:
    """Peak resident set size of a process (VmHWM in /proc/PID/status), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_convert(gguf: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    import ipex_llm.transformers  # noqa: F401  (the import a converting replica pays too)

    from deployments.convert import convert_checkpoint

    imported = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as scratch:
        convert_checkpoint(gguf, Path(scratch) / "model", force=True, report=lambda _: None)
        converted = time.perf_counter()
    return {"import_s": imported - t0, "convert_s": converted - imported,
            "total_s": converted - _STARTED, "peak_rss_bytes": vm_hwm_bytes()}


def measure_load(checkpoint: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch
    from ipex_llm.transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    from deployments.checkpoints import resolve_checkpoint, verify_checkpoint
    from deployments.engine.ipex_llm import IpexLLMEngine, _weights_only_torch_load

    imported = time.perf_counter()
    folder = resolve_checkpoint(checkpoint)
    verify_checkpoint(folder)
    verified = time.perf_counter()
    import torch._dynamo  # what load_low_bit would import next

    dynamo_imported = time.perf_counter()
    with _weights_only_torch_load():
        model = AutoModelForCausalLM.load_low_bit(str(folder), trust_remote_code=False)
    model = model.to("cpu").eval()
    loaded = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenized = time.perf_counter()
    engine = IpexLLMEngine(model, tokenizer, device="cpu", max_batch_size=1,
                           max_prefill_tokens_per_step=512)
    with torch.inference_mode():
        model(input_ids=torch.tensor([engine.encode("Hello")]))
    first_forward = time.perf_counter()
    return {"process_start_to_import_s": t0 - _STARTED, "import_s": imported - t0,
            "verify_s": verified - imported, "dynamo_import_s": dynamo_imported - verified,
            "load_low_bit_s": loaded - dynamo_imported,
            "tokenizer_s": tokenized - loaded, "first_forward_s": first_forward - tokenized,
            # IpexLLMEngine.load's work: verify + load_low_bit + tokenizer (no dynamo import)
            "engine_load_s": (verified - imported) + (tokenized - dynamo_imported),
            "total_s": first_forward - _STARTED, "peak_rss_bytes": vm_hwm_bytes()}


def bare_load_s(load: dict[str, Any]) -> float:
    """The bare path a replica's start is judged against: imports + ``load_low_bit`` (with
    the ``torch._dynamo`` import it makes; runs before that split have no such key)."""
    return load["import_s"] + load.get("dynamo_import_s", 0.0) + load["load_low_bit_s"]


def median_load(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of several ``load`` runs (each a fresh process), the one whose bare path is the
    median (the lower middle of an even count), with every run's bare path under
    ``bare_load_runs_s``: one start on a shared machine can be an outlier. Failed runs
    (a ``failed`` key) are skipped; with none left, the first failure is the result."""
    ok = [run for run in runs if "failed" not in run]
    if not ok:
        return runs[0]
    ranked = sorted(ok, key=bare_load_s)
    return {**ranked[(len(ranked) - 1) // 2],
            "bare_load_runs_s": [round(bare_load_s(run), 3) for run in ok]}


def checkpoint_bytes(checkpoint: str) -> int:
    folder = Path(checkpoint).resolve()
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["convert", "load"])
    parser.add_argument("--gguf")
    parser.add_argument("--checkpoint")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if args.what == "convert":
        result = measure_convert(args.gguf)
    else:
        result = measure_load(args.checkpoint)
        result["checkpoint_bytes"] = checkpoint_bytes(args.checkpoint)
    Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
