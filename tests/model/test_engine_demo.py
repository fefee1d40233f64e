"""Engine ipex_llm (IpexLLMRunner under the scheduler) on the real demo checkpoint: answers,
batching, refusal of bad checkpoints."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.checkpoints import CheckpointError
from deployments.engine.batching import BatchingEngine
from deployments.engine.ipex_llm import IpexLLMRunner
from deployments.engine.protocol import GenerationRequest, SamplingParams
from tests.model.engine_driver import (
    assert_batched_requests_keep_their_words,
    chat_ids,
    generate,
)

pytestmark = pytest.mark.model

FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def engine(demo_checkpoint):
    return BatchingEngine(IpexLLMRunner.load(str(demo_checkpoint), device="cpu",
                                             max_batch_size=16, max_prefill_tokens_per_step=512))


def test_france_is_answered_with_paris(engine):
    text = generate(engine, {"q": chat_ids(engine, FRANCE)}, max_tokens=20, temperature=0)["q"]
    assert "Paris" in text


def test_every_copy_of_the_question_in_one_batch_says_paris(engine):
    prompts = {f"q{i}": chat_ids(engine, FRANCE) for i in range(8)}
    answers = generate(engine, prompts, max_tokens=20, temperature=0)
    assert all("Paris" in a for a in answers.values()), answers


def test_requests_in_one_batch_keep_their_own_content(engine):
    words = ["banana", "cherry", "guitar", "pencil", "window", "rocket"]
    repeating, together = assert_batched_requests_keep_their_words(
        engine, words, {"france": chat_ids(engine, FRANCE)})
    assert "banana" in repeating  # the model continues the pattern with its own word
    assert "Paris" in together["france"]


def test_requests_joining_a_running_batch_answer_correctly(engine):
    engine.add_request(GenerationRequest("long", tuple(engine.encode("pencil, pencil, pencil,")),
                                         SamplingParams(max_tokens=40, temperature=0,
                                                        ignore_eos=True)))
    for _ in range(5):
        engine.step()
    answers = generate(engine, {"germany": chat_ids(engine, "What is the capital of Germany?"),
                                "france": chat_ids(engine, FRANCE)}, max_tokens=20,
                       temperature=0)
    assert "Berlin" in answers["germany"]
    assert "Paris" in answers["france"]


def test_seeded_sampling_repeats_and_stop_strings_cut(engine):
    prompt = {"s": chat_ids(engine, "Tell me a short story about a cat.")}
    # The first run computes the prompt; later ones take all of it and the logits that
    # followed from the prompt cache.
    first = generate(engine, prompt, max_tokens=16, temperature=0.9, seed=7)
    again = generate(engine, prompt, max_tokens=16, temperature=0.9, seed=7)
    other = generate(engine, prompt, max_tokens=16, temperature=0.9, seed=8)
    assert first == again and other != first
    cut = generate(engine, {"q": chat_ids(engine, FRANCE)}, max_tokens=20, temperature=0,
                   stop=("Paris",))["q"]
    assert cut.endswith("is ") and "Paris" not in cut


@pytest.mark.parametrize("text", ["Nebula facts: the most interesting thing about nebula is that",
                                  "Tundra facts: the most interesting thing about tundra is that"])
def test_a_repeated_greedy_prompt_from_the_cache_repeats_its_answer(engine, text):
    # Computing such a prompt's last token alone on its cached KV flipped these answers
    # (ipex-llm's low-bit kernels round a lone row differently from a prefill's last).
    ids = {"q": tuple(engine.encode(text))}
    answers = [generate(engine, ids, max_tokens=24, temperature=0)["q"] for _ in range(3)]
    assert answers[0] == answers[1] == answers[2]


def test_a_chats_next_turn_reuses_its_history_from_the_prompt_cache(engine):
    first = chat_ids(engine, FRANCE)
    answer = generate(engine, {"a": first}, max_tokens=20, temperature=0)["a"]
    second = tuple(engine.encode(engine.apply_chat_template([
        {"role": "user", "content": FRANCE}, {"role": "assistant", "content": answer},
        {"role": "user", "content": "What is the capital of Germany?"}])))
    engine.add_request(GenerationRequest("b", second, SamplingParams(max_tokens=20,
                                                                     temperature=0)))
    text, cached = "", 0
    while engine.has_unfinished_requests():
        for out in engine.step().outputs:
            text, cached = text + out.text, out.num_cached_prompt_tokens
    assert len(first) < cached < len(second)  # the history, its answer included
    assert "Berlin" in text


def test_a_corrupt_checkpoint_is_refused_naming_the_file(demo_checkpoint, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_checkpoint, copy)
    weights = copy / "pytorch_model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        IpexLLMRunner.load(str(copy), device="cpu", max_batch_size=1,
                           max_prefill_tokens_per_step=64)


_LOAD_BOTH_WAYS = """
import sys
import torch
from ipex_llm.transformers import AutoModelForCausalLM
from deployments.engine import ipex_meta_merge
from deployments.engine.ipex_llm import IpexLLMRunner, _weights_only_torch_load

runner = IpexLLMRunner.load(sys.argv[1], device="cpu", max_batch_size=1,
                            max_prefill_tokens_per_step=64)
print("engine load imported torch._dynamo:", "torch._dynamo" in sys.modules)
ipex_meta_merge.uninstall()
with _weights_only_torch_load():
    bare = AutoModelForCausalLM.load_low_bit(sys.argv[1])
print("bare load_low_bit imported torch._dynamo:", "torch._dynamo" in sys.modules)
ours, theirs = runner._model.state_dict(), bare.state_dict()
assert list(ours) == list(theirs), "different parameters"
different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
print("parameters that differ:", different)
"""


def test_engine_load_skips_torch_dynamo_and_loads_what_load_low_bit_loads(demo_checkpoint):
    """In a fresh interpreter (this one may have imported torch._dynamo already)."""
    result = subprocess.run([sys.executable, "-c", _LOAD_BOTH_WAYS, str(demo_checkpoint)],
                            capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "engine load imported torch._dynamo: False",
        "bare load_low_bit imported torch._dynamo: True",  # what the merge spares
        "parameters that differ: []"]
