"""Conversion of real models: the demo GGUF (via the demo_checkpoint fixture) and a tiny
random Llama folder, through `llm-checkpoint`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from deployments.checkpoints import resolve_checkpoint, verify_checkpoint
from deployments.constants import DEFAULT_LOW_BIT, DEMO_CHECKPOINT_DIR, DEMO_GGUF_FILE
from deployments.convert import cli

pytestmark = pytest.mark.model

WEIGHTS = "pytorch_model.bin"  # what ipex-llm's save_low_bit writes (a torch zip pickle)
REPO_DEMO_CHECKPOINT = Path(__file__).resolve().parents[2] / DEMO_CHECKPOINT_DIR


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def test_demo_checkpoint_verifies_and_describes_its_conversion(demo_checkpoint: Path) -> None:
    result = invoke("verify", str(demo_checkpoint))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"OK {demo_checkpoint}: ")

    manifest = verify_checkpoint(demo_checkpoint)
    assert manifest.low_bit == DEFAULT_LOW_BIT
    assert manifest.source.endswith(DEMO_GGUF_FILE)
    assert {WEIGHTS, "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        f.path for f in manifest.files}
    config = json.loads((demo_checkpoint / "config.json").read_text())
    assert config["bigdl_transformers_low_bit"] == DEFAULT_LOW_BIT


def test_demo_command_is_idempotent(demo_checkpoint: Path) -> None:
    result = invoke("demo", "--output", str(REPO_DEMO_CHECKPOINT))
    assert result.exit_code == 0, result.output
    assert "exists and verifies" in result.stderr
    assert result.stdout.strip() == str(resolve_checkpoint(REPO_DEMO_CHECKPOINT))


def test_tokenizer_loads_from_the_checkpoint(demo_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint)
    assert tokenizer.chat_template
    ids = tokenizer.encode("The capital of France")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The capital of France"


def test_weights_load_without_running_pickle_code(demo_checkpoint: Path) -> None:
    import torch

    state = torch.load(demo_checkpoint / WEIGHTS, weights_only=True, map_location="cpu")
    assert all(isinstance(tensor, torch.Tensor) for tensor in state.values())
    assert state["lm_head.weight"].dtype == torch.uint8  # quantized, not a float copy


def test_converted_gguf_answers_sensibly(demo_checkpoint: Path) -> None:
    """The GGUF's tied output head survived conversion (untied, lm_head would be random)."""
    import torch
    from ipex_llm.transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.load_low_bit(str(demo_checkpoint))
    tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_flipped_byte_in_weights_fails_verify(demo_checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(demo_checkpoint, copy)
    weights = copy / WEIGHTS
    with weights.open("r+b") as file:
        file.seek(weights.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 0x01]))

    result = invoke("verify", str(copy))

    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(copy) in lines[0] and WEIGHTS in lines[0] and "sha256 mismatch" in lines[0]
    verify_checkpoint(demo_checkpoint)  # the original is untouched


@pytest.fixture
def tiny_llama_folder(demo_checkpoint: Path, tmp_path: Path) -> Path:
    """A random-weight Hugging Face Llama folder, with the demo model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_convert_a_model_folder_and_republish(tiny_llama_folder: Path, tmp_path: Path) -> None:
    import torch
    from ipex_llm.transformers import AutoModelForCausalLM

    output = tmp_path / "shared" / "tiny"
    args = ("convert", "--source", str(tiny_llama_folder), "--output", str(output),
            "--low-bit", "sym_int8")

    first = invoke(*args)
    assert first.exit_code == 0, first.output
    version = Path(first.stdout.strip())
    assert resolve_checkpoint(output) == version
    assert verify_checkpoint(output).low_bit == "sym_int8"
    model = AutoModelForCausalLM.load_low_bit(str(output))
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)

    refused = invoke(*args)
    assert refused.exit_code == 1 and "already exists" in refused.stderr

    second = invoke(*args, "--force")
    assert second.exit_code == 0, second.output
    assert resolve_checkpoint(output) == Path(second.stdout.strip()) != version
    verify_checkpoint(version)  # the old version stays for readers that loaded it


@pytest.mark.parametrize("weights", ["random", "truncated"])
def test_convert_a_folder_with_corrupt_safetensors_is_one_line(tmp_path: Path,
                                                               weights: str) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "broken-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1}))
    model_file = folder / "model.safetensors"
    if weights == "random":
        model_file.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        save_file({"model.embed_tokens.weight": np.zeros((64, 16), np.float32)}, model_file)
        model_file.write_bytes(model_file.read_bytes()[:1000])

    result = invoke("convert", "--source", str(folder), "--output", str(tmp_path / "out"))

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"Error: cannot load {folder}: "), result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
