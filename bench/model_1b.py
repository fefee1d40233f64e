"""The benchmark's second model size: a TinyLlama-1.1B-shaped Llama with random weights, as
an ipex_llm sym_int4 checkpoint and a GGUF Q4_0 checkpoint of the same weights.

    python -m bench.model_1b [--out-dir bench/.cache/models] [--keep-intermediates] [--check]

No model hub is reachable here, so the weights are made locally: TinyLlama-1.1B's published
config (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, 2048 positions,
rms_norm_eps 1e-5, rope_theta 10000, silu, untied embeddings, LlamaForCausalLM) with
transformers' default initialisation after ``torch.manual_seed(0)``, saved as float16
safetensors. Speed does not depend on the values, and the bench fixes output lengths with
``ignore_eos``, so random weights (garbage text) measure the same thing as trained ones.

Deviation from TinyLlama: the tokenizer is the demo model's (SmolLM2's BPE tokenizer, taken
from the demo ipex_llm checkpoint's version folder), so ``vocab_size`` is 49152, not
TinyLlama's 32000 (about 35M more parameters in the embedding and the output head: 1.17B
instead of 1.10B). bos/eos ids are the tokenizer's: both 1 (``<|im_start|>``, as that
tokenizer, rebuilt by transformers from the demo GGUF, declares them).

Steps, each skipped when its output exists and verifies:

1. the HF folder (``tinyllama-1.1b-hf``), built in a temporary folder and renamed;
2. ``llm-checkpoint convert`` to ipex_llm sym_int4, published as ``tinyllama-1.1b-sym_int4``;
3. llama.cpp's ``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist that
   bench.build_llama_server extracts) to an f16 GGUF, ``llama-quantize`` (built by
   bench.build_llama_server) to Q4_0, and ``llm-checkpoint convert --format gguf``,
   published as ``tinyllama-1.1b-gguf-q4_0``.

The intermediates (HF folder, f16 and Q4_0 GGUF files, about 5 GB) are deleted once both
checkpoints are published, unless ``--keep-intermediates``: the seed makes a rebuild give
the same weights. The published paths go to stdout and ``<out-dir>/tinyllama-1.1b.json``.
``--check`` then loads each checkpoint with its engine and times 8 greedy tokens at batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.build_llama_server import LLAMA_CPP_PYTHON_VERSION, LLAMA_QUANTIZE_BIN, SOURCE_DIR
from deployments.constants import CheckpointFormat

NAME = "tinyllama-1.1b"
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / ".cache" / "models"
SEED = 0
IPEX_LOW_BIT = "sym_int4"
GGUF_TYPE = "q4_0"
# TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T's config.json, minus the vocabulary
# and special-token ids (the demo tokenizer's, filled in by hf_config).
TINYLLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LLAMA_CPP_TREE = (SOURCE_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor"
                  / "llama.cpp")
CONVERT_SCRIPT = LLAMA_CPP_TREE / "convert_hf_to_gguf.py"
QUANTIZE_WAIT_S = 3600.0


def log(message: str) -> None:
    print(f"[model_1b {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Paths:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir.absolute()
        self.hf = self.out_dir / f"{NAME}-hf"
        self.f16_gguf = self.out_dir / f"{NAME}-f16.gguf"
        self.q4_gguf = self.out_dir / f"{NAME}-{GGUF_TYPE}.gguf"
        self.ipex_llm = self.out_dir / f"{NAME}-{IPEX_LOW_BIT}"
        self.gguf = self.out_dir / f"{NAME}-gguf-{GGUF_TYPE}"
        self.summary = self.out_dir / f"{NAME}.json"


# ---- step 1: the HF folder -------------------------------------------------------------------


def demo_tokenizer_folder() -> Path:
    """The demo ipex_llm checkpoint's verified version folder (built if missing, as
    ``make demo-checkpoint`` does), which holds the tokenizer files."""
    from deployments.convert import ensure_demo_checkpoint

    return ensure_demo_checkpoint(report=log)


def hf_config(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return LlamaConfig(**TINYLLAMA_CONFIG, vocab_size=len(tokenizer),
                       bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, torch_dtype="float16")


def hf_folder_ok(folder: Path, expected: dict[str, Any]) -> bool:
    """The folder holds the expected config, the tokenizer and float16 safetensors with
    every tensor of the model (by name and shape, from the file's header)."""
    from safetensors import safe_open

    try:
        config = json.loads((folder / "config.json").read_text())
        if any(config.get(key) != value for key, value in expected.items()):
            return False
        if not all((folder / name).is_file() for name in TOKENIZER_FILES):
            return False
        with safe_open(str(folder / "model.safetensors"), "pt") as weights:
            names = set(weights.keys())
            dtypes = {weights.get_slice(name).get_dtype() for name in names}
    except Exception:  # unreadable: OSError, ValueError, safetensors' own error type
        return False
    layers = expected["num_hidden_layers"]
    return len(names) == 3 + 9 * layers and dtypes == {"F16"}


def build_hf(paths: Paths) -> bool:
    import torch
    from transformers import LlamaForCausalLM

    tokenizer_dir = demo_tokenizer_folder()
    config = hf_config(tokenizer_dir)
    expected = {**TINYLLAMA_CONFIG, "vocab_size": config.vocab_size}
    if hf_folder_ok(paths.hf, expected):
        log(f"{paths.hf} exists and verifies")
        return False
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(paths.hf, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{paths.hf.name}.tmp-", dir=paths.out_dir))
    try:
        log(f"initialising {NAME} (vocab {config.vocab_size}) with seed {SEED}")
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)  # float32, transformers' default init
        model.half()  # parameter by parameter: peak stays near the float32 model's size
        model.save_pretrained(str(staging), safe_serialization=True, max_shard_size="8GB")
        del model
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, staging / name)
        if not hf_folder_ok(staging, expected):
            raise RuntimeError(f"the HF folder built in {staging} does not verify")
        staging.chmod(0o755)
        staging.rename(paths.hf)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


# ---- published checkpoints -------------------------------------------------------------------


def published_ok(path: Path, checkpoint_format: CheckpointFormat, low_bit: str) -> bool:
    from deployments.checkpoints import CheckpointError, verify_checkpoint

    if not os.path.lexists(path):
        return False
    try:
        manifest = verify_checkpoint(path, checkpoint_format=checkpoint_format)
    except CheckpointError as error:
        log(f"rebuilding: {error}")
        return False
    if manifest.low_bit != low_bit:
        log(f"rebuilding: {path} is {manifest.low_bit}, not {low_bit}")
        return False
    return True


def llm_checkpoint(source: Path, output: Path, *extra: str) -> None:
    cli = Path(sys.executable).with_name("llm-checkpoint")
    command = [str(cli), "convert", "--source", str(source), "--output", str(output), *extra]
    if os.path.lexists(output):
        command.append("--force")  # it failed to verify: publish a new version
    log("$ " + " ".join(command))
    subprocess.run(command, check=True)


# ---- step 3: GGUF ----------------------------------------------------------------------------

# Two patches to convert_hf_to_gguf.py's choice of vocabulary for a Llama, both for the
# demo tokenizer (byte-level BPE in tokenizer.json, no tokenizer.model):
# - it imports sentencepiece before it looks for tokenizer.model and falls back only on
#   FileNotFoundError; sentencepiece is not a dependency here, so a missing tokenizer.model
#   raises that FileNotFoundError before the import;
# - it then tries the SPM-style "llama" vocabulary, which accepts this tokenizer.json
#   (transformers rebuilt it from the demo GGUF with byte_fallback and a Llama decoder) and
#   would make llama.cpp tokenize byte-level BPE tokens as SentencePiece; a byte-level
#   pre-tokenizer is sent on to the "gpt2" (BPE) vocabulary, as the demo GGUF has.
_CONVERT_WRAPPER = """
import json, runpy, sys
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/gguf-py"]
from conversion import base
spm = base.TextModel._create_vocab_sentencepiece
llama_hf = base.TextModel._set_vocab_llama_hf
def create_vocab_sentencepiece(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
    return spm(self)
def set_vocab_llama_hf(self):
    path = self.dir_model / "tokenizer.json"
    if path.is_file():
        pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel":
            raise FileNotFoundError("byte-level BPE: the gpt2 vocabulary")
    return llama_hf(self)
base.TextModel._create_vocab_sentencepiece = create_vocab_sentencepiece
base.TextModel._set_vocab_llama_hf = set_vocab_llama_hf
sys.argv = [tree + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def gguf_type(path: Path) -> str | None:
    """The GGUF file's type (f16, q4_0, ...), or None when it is missing, unreadable or
    not tokenized as byte-level BPE (tokenizer.ggml.model gpt2)."""
    from deployments.checkpoints import gguf_file_type

    if not path.is_file():
        return None
    try:
        file_type = gguf_file_type(path)
    except ValueError:
        return None
    import gguf

    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.model")
    if field is None or bytes(field.parts[field.data[0]]).decode() != "gpt2":
        return None
    return file_type


def build_f16_gguf(paths: Paths) -> bool:
    if gguf_type(paths.f16_gguf) == "f16":
        log(f"{paths.f16_gguf} exists and verifies")
        return False
    if not CONVERT_SCRIPT.is_file():
        raise FileNotFoundError(f"{CONVERT_SCRIPT} is missing: python -m "
                                "bench.build_llama_server extracts the llama.cpp source")
    staging = paths.f16_gguf.with_name(f".{paths.f16_gguf.name}.tmp")
    command = [sys.executable, "-c", _CONVERT_WRAPPER, str(LLAMA_CPP_TREE), str(paths.hf),
               "--outtype", "f16", "--outfile", str(staging)]
    log(f"$ convert_hf_to_gguf.py {paths.hf} --outtype f16 --outfile {staging}")
    try:
        subprocess.run(command, check=True)
        os.replace(staging, paths.f16_gguf)
    finally:
        staging.unlink(missing_ok=True)
    return True


def wait_for_quantize(timeout_s: float = QUANTIZE_WAIT_S) -> Path:
    """llama-quantize, waiting for a build under way (bench.build_llama_server)."""
    deadline = time.monotonic() + timeout_s
    while not (LLAMA_QUANTIZE_BIN.is_file() and os.access(LLAMA_QUANTIZE_BIN, os.X_OK)):
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"{LLAMA_QUANTIZE_BIN} is not built: "
                                    "python -m bench.build_llama_server")
        log(f"waiting for {LLAMA_QUANTIZE_BIN} (python -m bench.build_llama_server)")
        time.sleep(30)
    return LLAMA_QUANTIZE_BIN


def build_q4_gguf(paths: Paths) -> bool:
    if gguf_type(paths.q4_gguf) == GGUF_TYPE:
        log(f"{paths.q4_gguf} exists and verifies")
        return False
    quantize = wait_for_quantize()
    staging = paths.q4_gguf.with_name(f".{paths.q4_gguf.name}.tmp")
    threads = len(os.sched_getaffinity(0))
    command = [str(quantize), str(paths.f16_gguf), str(staging), GGUF_TYPE.upper(),
               str(threads)]
    log("$ " + " ".join(command))
    try:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        os.replace(staging, paths.q4_gguf)
    finally:
        staging.unlink(missing_ok=True)
    return True


# ---- the whole build -------------------------------------------------------------------------


def build(out_dir: Path, keep_intermediates: bool = False) -> dict[str, Any]:
    """Make (or find) both checkpoints; return the summary written to <out-dir>/<NAME>.json."""
    from deployments.checkpoints import read_manifest, resolve_checkpoint

    paths = Paths(out_dir)
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(step: str, function: Any) -> None:
        """Run a step; record its time unless it found its output already there."""
        started = time.perf_counter()
        if function(paths) is not False:
            timings[step] = round(time.perf_counter() - started, 1)

    if not published_ok(paths.ipex_llm, "ipex_llm", IPEX_LOW_BIT):
        timed("hf_folder", build_hf)
        timed("ipex_llm_convert", lambda p: llm_checkpoint(p.hf, p.ipex_llm,
                                                            "--low-bit", IPEX_LOW_BIT))
    if not published_ok(paths.gguf, "gguf", GGUF_TYPE):
        if gguf_type(paths.q4_gguf) != GGUF_TYPE:
            if gguf_type(paths.f16_gguf) != "f16":
                timed("hf_folder", build_hf)
            timed("gguf_f16", build_f16_gguf)
        timed("gguf_q4_0", build_q4_gguf)
        timed("gguf_publish", lambda p: llm_checkpoint(p.q4_gguf, p.gguf, "--format", "gguf"))
    if not keep_intermediates:
        shutil.rmtree(paths.hf, ignore_errors=True)
        for path in (paths.f16_gguf, paths.q4_gguf):
            path.unlink(missing_ok=True)
    summary = {
        "model": NAME,
        "note": "TinyLlama-1.1B config, random weights (torch.manual_seed(0)), demo "
                "tokenizer: vocab_size 49152 instead of 32000",
        "ipex_llm": str(paths.ipex_llm),
        "ipex_llm_version": str(resolve_checkpoint(paths.ipex_llm)),
        "ipex_llm_bytes": read_manifest(paths.ipex_llm).total_bytes,
        "gguf": str(paths.gguf),
        "gguf_version": str(resolve_checkpoint(paths.gguf)),
        "gguf_bytes": read_manifest(paths.gguf).total_bytes,
        "intermediates_kept": keep_intermediates,
        "build_s": timings,  # the steps this run made (none: all cached)
    }
    paths.summary.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def ensure_checkpoints(out_dir: Path = DEFAULT_OUT_DIR) -> dict[str, str]:
    """The benchmark's view (built first if missing): ``ipex_llm`` and ``llama_cpp``, the
    published checkpoints, and ``gguf``, the GGUF file itself (for llama-server)."""
    summary = build(out_dir)
    return {"ipex_llm": summary["ipex_llm"], "llama_cpp": summary["gguf"],
            "gguf": str(Path(summary["gguf_version"]) / "model.gguf")}


# ---- sanity check ----------------------------------------------------------------------------


def decode_step_s(engine_name: str, checkpoint: str, max_tokens: int = 8) -> dict[str, Any]:
    """Load with the bench's engine loader, generate ``max_tokens`` greedy tokens at batch 1
    (after a 4-token warm-up) and time the steps; the first step holds the prefill."""
    from bench.engine import load
    from bench.loadgen import PROMPT
    from deployments.engine.protocol import GenerationRequest, SamplingParams

    started = time.perf_counter()
    engine = load(engine_name, checkpoint, 1)
    load_s = time.perf_counter() - started
    prompt_ids = tuple(engine.encode(PROMPT))

    def run(tokens: int) -> list[float]:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(GenerationRequest(f"check-{time.monotonic_ns()}", prompt_ids,
                                             params))
        times = []
        while engine.has_unfinished_requests():
            step_started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - step_started)
        return times

    run(4)
    times = run(max_tokens)
    decode = times[1:]
    return {"engine": engine_name, "load_s": round(load_s, 2), "prompt_tokens": len(prompt_ids),
            "steps": len(times), "first_step_s": round(times[0], 4),
            "decode_step_s": round(sum(decode) / max(len(decode), 1), 4),
            "step_s": [round(t, 4) for t in times]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--keep-intermediates", action="store_true",
                        help="keep the HF folder and the f16/Q4_0 GGUF files")
    parser.add_argument("--check", action="store_true",
                        help="load each checkpoint and time 8 tokens at batch 1")
    args = parser.parse_args(argv)
    summary = build(args.out_dir, keep_intermediates=args.keep_intermediates)
    if args.check:
        summary["check"] = [decode_step_s("ipex_llm", summary["ipex_llm"]),
                            decode_step_s("llama_cpp", summary["gguf"])]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
