"""Cold-start costs, each in a fresh interpreter (imports count, as in a replica).

    python -m bench.coldstart convert --gguf FILE --out out.json   # GGUF -> checkpoint
    python -m bench.coldstart load --checkpoint DIR --out out.json # checkpoint -> engine

``convert``: what a replica converting at start-up would pay (``convert_checkpoint`` into a
scratch folder). ``load``: ``IpexLLMRunner.load`` split into the model stack's imports,
manifest verification (sha256 of every file), ipex-llm's bare ``load_low_bit`` and the
tokenizer, then a first forward pass. The bare ``load_low_bit`` imports ``torch._dynamo``,
which the engine's load avoids (deployments/engine/ipex_meta_merge.py): that import is
timed on its own (``dynamo_import_s``) and counts in the bare path. Both report peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.machine import vm_hwm_bytes


def measure_convert(gguf: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    import ipex_llm.transformers  # noqa: F401  (the import a converting replica pays too)

    from deployments.convert import convert_checkpoint

    imported = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as scratch:
        convert_checkpoint(gguf, Path(scratch) / "model", force=True, report=lambda _: None)
        converted = time.perf_counter()
    return {"import_s": imported - t0, "convert_s": converted - imported,
            "peak_rss_bytes": vm_hwm_bytes()}


def measure_load(checkpoint: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch
    from ipex_llm.transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    from deployments.checkpoints import resolve_checkpoint, verify_checkpoint
    from deployments.engine.ipex_llm import IpexLLMRunner, _weights_only_torch_load

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
    runner = IpexLLMRunner(model, tokenizer, device="cpu", max_batch_size=1,
                           max_prefill_tokens_per_step=512)
    with torch.inference_mode():
        model(input_ids=torch.tensor([runner.text.encode("Hello")]))
    first_forward = time.perf_counter()
    return {"import_s": imported - t0, "verify_s": verified - imported,
            "dynamo_import_s": dynamo_imported - verified,
            "load_low_bit_s": loaded - dynamo_imported, "tokenizer_s": tokenized - loaded,
            "first_forward_s": first_forward - tokenized, "peak_rss_bytes": vm_hwm_bytes(),
            "checkpoint_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file())}


def bare_load_s(load: dict[str, Any]) -> float:
    """The bare path a replica's start is judged against: imports + ``load_low_bit`` (with
    the ``torch._dynamo`` import it makes)."""
    return load["import_s"] + load["dynamo_import_s"] + load["load_low_bit_s"]


def median_load(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of several ``load`` runs (each a fresh process), the one whose bare path is the
    median (the lower middle of an even count), with every run's bare path under
    ``bare_load_runs_s``: one start on a shared machine can be an outlier."""
    ranked = sorted(runs, key=bare_load_s)
    return {**ranked[(len(ranked) - 1) // 2],
            "bare_load_runs_s": [round(bare_load_s(run), 3) for run in runs]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["convert", "load"])
    parser.add_argument("--gguf", help="for convert")
    parser.add_argument("--checkpoint", help="for load")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = measure_convert(args.gguf) if args.what == "convert" else \
        measure_load(args.checkpoint)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
