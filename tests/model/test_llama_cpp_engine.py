"""Engine llama_cpp (LlamaCppRunner under the scheduler) on the real GGUF demo checkpoint:
llama.cpp's own answers, batching, slots, sampling, and refusal of checkpoints it cannot serve."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from deployments.checkpoints import CheckpointError, write_manifest
from deployments.config import LLMConfig
from deployments.engine.batching import BatchingEngine
from deployments.engine.ipex_llm import IpexLLMRunner
from deployments.engine.llama_cpp import LlamaCppRunner
from deployments.engine.options import LlamaCppOptions
from deployments.engine.protocol import EngineError, GenerationRequest, SamplingParams
from tests.model.engine_driver import (
    assert_batched_requests_keep_their_words,
    chat_ids,
    generate,
)

pytestmark = pytest.mark.model
llama_cpp = pytest.importorskip("llama_cpp", reason="the llama-cpp extra (make test installs it)")

CONTEXT = 512  # KV cells per slot: small, these tests hold several engines at once
WORDS = ["banana", "cherry", "guitar", "pencil", "window", "rocket"]


def load(checkpoint: Path, *, max_batch_size: int = 8, max_prefill_tokens_per_step: int = 512,
         **options) -> BatchingEngine:
    """The engine on ``checkpoint``; ``options``: LlamaCppOptions fields."""
    return BatchingEngine(LlamaCppRunner.load(
        str(checkpoint), device="cpu", max_batch_size=max_batch_size,
        max_prefill_tokens_per_step=max_prefill_tokens_per_step,
        options=LlamaCppOptions(**{"context_tokens": CONTEXT, **options})))


@pytest.fixture(scope="module")
def engine(gguf_checkpoint: Path) -> BatchingEngine:
    return load(gguf_checkpoint)


@pytest.fixture(scope="module")
def reference(gguf_checkpoint: Path):
    """llama-cpp-python's own high-level model: one sequence, its own sampler chain."""
    model = llama_cpp.Llama(str(gguf_checkpoint / "model.gguf"), n_ctx=CONTEXT, n_threads=2,
                            flash_attn=True, verbose=False)  # as the engine: llama.cpp's auto
    yield model
    model.close()


def reference_greedy(reference, prompt: tuple[int, ...], count: int) -> list[int]:
    reference.reset()
    return list(itertools.islice(reference.generate(list(prompt), top_k=1, temp=0.0,
                                                    reset=True), count))


def test_greedy_answers_are_llama_cpps_token_for_token(engine, reference):
    for question in ["What is the capital of Germany?", "Name three colours."]:
        prompt = chat_ids(engine, question)
        engine.add_request(GenerationRequest("q", prompt, SamplingParams(
            max_tokens=24, temperature=0, ignore_eos=True)))
        while engine.has_unfinished_requests():
            engine.step()
        expected = reference_greedy(reference, prompt, 24)
        text = generate(engine, {"q": prompt}, max_tokens=24, temperature=0,
                        ignore_eos=True)["q"]
        assert text == engine.runner._tokenizer.decode(expected, skip_special_tokens=True)


def test_germany_is_answered_with_berlin(engine):
    answer = generate(engine, {"q": chat_ids(engine, "What is the capital of Germany?")},
                      max_tokens=20, temperature=0)["q"]
    assert "Berlin" in answer


def test_requests_in_one_batch_keep_their_own_content(engine):
    repeating, _ = assert_batched_requests_keep_their_words(engine, WORDS)
    assert len(repeating) >= 4  # the model continues the pattern with its own word


def test_requests_joining_a_running_batch_answer_correctly(engine):
    engine.add_request(GenerationRequest("long", tuple(engine.encode("pencil, pencil, pencil,")),
                                         SamplingParams(max_tokens=40, temperature=0,
                                                        ignore_eos=True)))
    for _ in range(5):
        engine.step()
    assert engine.num_running == 1
    answers = generate(engine, {"germany": chat_ids(engine, "What is the capital of Germany?"),
                                "banana": tuple(engine.encode("banana, banana, banana, banana,"))},
                       max_tokens=20, temperature=0)
    assert "Berlin" in answers["germany"]
    assert "banana" in answers["banana"] and "pencil" not in answers["banana"]


def repeated(word: str) -> str:
    """A prompt the demo model continues with ``word`` on every CPU seen so far (with 4
    repeats, "pencil" went on " and ink." on an AVX2 CPU)."""
    return ", ".join([word] * 8) + ","


def test_rows_out_of_slot_order_get_their_own_logits(gguf_checkpoint):
    """A request that takes a freed lower slot runs after a higher one in the batch; llama.cpp
    gets the batch sorted by slot, and each row must still get its own sequence's logits.
    (Without the prompt cache the lowest free slot is taken, which sets this up.)"""
    engine = load(gguf_checkpoint, prompt_cache=False)
    engine.add_request(GenerationRequest("short", tuple(engine.encode("rocket, rocket,")),
                                         SamplingParams(max_tokens=1, temperature=0)))
    engine.add_request(GenerationRequest("pencil", tuple(engine.encode(repeated("pencil"))),
                                         SamplingParams(max_tokens=12, temperature=0)))
    engine.step()  # both prefilled; "short" is done and frees the lower slot
    assert engine.num_running == 1
    engine.add_request(GenerationRequest("banana", tuple(engine.encode(repeated("banana"))),
                                         SamplingParams(max_tokens=12, temperature=0)))
    engine.step()
    running = {seq.request_id: engine.runner._slots[seq.request_id]
               for seq in engine.scheduler._running}
    assert running["banana"] < running["pencil"]  # behind pencil in the batch, lower slot
    texts = {"pencil": "", "banana": ""}
    while engine.has_unfinished_requests():
        for out in engine.step().outputs:
            texts[out.request_id] += out.text
    assert "pencil" in texts["pencil"] and "banana" not in texts["pencil"], texts
    assert "banana" in texts["banana"] and "pencil" not in texts["banana"], texts


def test_chunked_prefill_gives_the_unchunked_answer(gguf_checkpoint, engine):
    prompt = chat_ids(engine, "What is the capital of Germany? Answer in one sentence.")
    whole = generate(engine, {"q": prompt}, max_tokens=16, temperature=0)["q"]
    chunked_engine = load(gguf_checkpoint, max_batch_size=2, max_prefill_tokens_per_step=16)
    assert len(prompt) > 2 * 16  # three chunks at least
    assert generate(chunked_engine, {"q": prompt}, max_tokens=16, temperature=0)["q"] == whole


def test_slots_are_recycled_across_finishes_and_aborts(gguf_checkpoint):
    small = load(gguf_checkpoint, max_batch_size=2, max_prefill_tokens_per_step=64)
    prompt = tuple(small.encode("rocket, rocket, rocket,"))
    for round_ in range(3):  # more requests than slots, more than once
        for i in range(3):
            small.add_request(GenerationRequest(f"r{round_}-{i}", prompt, SamplingParams(
                max_tokens=6, temperature=0, ignore_eos=True)))
        small.step()
        small.abort(f"r{round_}-0")
        finished = {}
        while small.has_unfinished_requests():
            for out in small.step().outputs:
                if out.finished:
                    finished[out.request_id] = (out.finish_reason, out.num_generated_tokens)
        assert finished[f"r{round_}-0"][0] == "abort"
        assert finished[f"r{round_}-1"] == ("length", 6)
        assert finished[f"r{round_}-2"] == ("length", 6)
    assert sorted(small.runner._free_slots) == [0, 1] and not small.runner._slots


def test_seeded_sampling_repeats_and_stop_strings_cut(engine):
    prompt = {"s": chat_ids(engine, "Tell me a short story about a cat.")}
    first = generate(engine, prompt, max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    again = generate(engine, prompt, max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    other = generate(engine, prompt, max_tokens=16, temperature=0.9, top_p=0.9, seed=8)
    assert first == again and first != other
    cut = generate(engine, {"q": chat_ids(engine, "What is the capital of Germany?")},
                   max_tokens=20, temperature=0, stop=("Berlin",))["q"]
    assert "Berlin" not in cut and cut


def test_min_tokens_holds_back_the_end_of_the_answer(engine):
    prompt = chat_ids(engine, "What is the capital of Germany?")
    short = engine_tokens(engine, prompt, max_tokens=64)
    assert short < 20  # the model stops by itself
    assert engine_tokens(engine, prompt, max_tokens=64, min_tokens=50) >= 50


def engine_tokens(engine, prompt, **params) -> int:
    engine.add_request(GenerationRequest("n", prompt, SamplingParams(temperature=0, **params)))
    count = 0
    while engine.has_unfinished_requests():
        for out in engine.step().outputs:
            count = out.num_generated_tokens
    return count


def test_checkpoints_of_the_other_format_are_refused(gguf_checkpoint, demo_checkpoint):
    with pytest.raises(CheckpointError, match=r"has format ipex_llm.*reads gguf"):
        load(demo_checkpoint)
    with pytest.raises(CheckpointError, match=r"has format gguf.*reads ipex_llm"):
        IpexLLMRunner.load(str(gguf_checkpoint), device="cpu", max_batch_size=1,
                           max_prefill_tokens_per_step=64)


def test_a_tokenizer_that_disagrees_with_the_gguf_vocabulary_is_refused(gguf_checkpoint,
                                                                        tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(gguf_checkpoint, copy)
    tokenizer_file = copy / "tokenizer.json"
    document = json.loads(tokenizer_file.read_text())
    vocab = document["model"]["vocab"]
    vocab["Hello"], vocab["ĠParis"] = vocab["ĠParis"], vocab["Hello"]  # two ids swapped
    tokenizer_file.write_text(json.dumps(document))
    write_manifest(copy, source="test", low_bit="q4_1", name="copy", checkpoint_format="gguf")
    with pytest.raises(EngineError, match="tokenizer and its GGUF vocabulary disagree"):
        load(copy)


def test_llama_cpp_runs_on_the_cpu_only(gguf_checkpoint):
    with pytest.raises(EngineError, match="runs on the CPU"):
        LlamaCppRunner.load(str(gguf_checkpoint), device="xpu", max_batch_size=1,
                            max_prefill_tokens_per_step=64)
    with pytest.raises(ValueError, match="engine llama_cpp runs on the CPU"):
        LLMConfig(engine="llama_cpp", device="xpu")


def test_fast_detokenizing_matches_the_tokenizers_decode(engine):
    tokenizer = engine.runner._tokenizer
    rng = np.random.default_rng(0)
    samples = [list(chat_ids(engine, "What is the capital of Germany?")),
               tokenizer.encode("  naïve café 🙂\n\n  x ,  . ! 's n't"),
               *(rng.integers(0, engine.vocab_size, size=40).tolist() for _ in range(20))]
    for ids in samples:
        assert engine.runner.text.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)


# ---- prompt cache ----------------------------------------------------------------------------


def run(engine: BatchingEngine, rid: str, prompt: tuple[int, ...], max_tokens: int = 12
        ) -> tuple[str, int, list[int]]:
    """One request alone: its text, the prompt tokens the cache supplied, the token ids."""
    engine.add_request(GenerationRequest(rid, prompt, SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True)))
    text, cached = "", -1
    while engine.has_unfinished_requests():
        for out in engine.step().outputs:
            text += out.text
            cached = out.num_cached_prompt_tokens
    return text, cached, engine.runner._tokenizer.encode(text, add_special_tokens=False)


def test_a_chats_next_turn_reuses_its_history_and_answers_as_without_the_cache(
        gguf_checkpoint):
    cached_engine = load(gguf_checkpoint, max_batch_size=2)
    plain = load(gguf_checkpoint, max_batch_size=2, prompt_cache=False)
    first = chat_ids(cached_engine, "What is the capital of Germany?")
    answer, cached, _ = run(cached_engine, "t1", first)
    assert cached == 0 and answer == run(plain, "p1", first)[0]
    # The same prompt again: everything but its last token comes from the cache.
    assert run(cached_engine, "t1-again", first)[:2] == (answer, len(first) - 1)
    # The next turn: the history (prompt + answer) is the cached slot's content.
    turn = [{"role": "user", "content": "What is the capital of Germany?"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And of France?"}]
    second = tuple(cached_engine.encode(cached_engine.apply_chat_template(turn)))
    text, cached, _ = run(cached_engine, "t2", second)
    assert cached > len(first)  # the answer's tokens were reused too
    plain_text, plain_cached, _ = run(plain, "p2", second)
    assert plain_cached == 0 and text == plain_text


def test_a_prompt_takes_the_free_slot_that_holds_its_prefix(gguf_checkpoint):
    small = load(gguf_checkpoint, max_batch_size=2)
    pencil = tuple(small.encode("pencil, pencil, pencil, pencil, pencil,"))
    banana = tuple(small.encode("banana, banana, banana, banana, banana,"))
    small.add_request(GenerationRequest("p", pencil, SamplingParams(max_tokens=3)))
    small.add_request(GenerationRequest("b", banana, SamplingParams(max_tokens=3)))
    while small.has_unfinished_requests():
        small.step()
    assert small.runner._slot_tokens[1][:len(banana)] == list(banana)  # banana finished in slot 1
    text, cached, _ = run(small, "b2", banana + tuple(small.encode(" banana,")), max_tokens=4)
    # The prompt, and the answer's " banana" if its ids match the new prompt's.
    assert cached >= len(banana) and "banana" in text and "pencil" not in text
    assert small.runner._slot_tokens[0][:len(pencil)] == list(pencil)  # slot 0 kept its content


def test_a_new_prompt_takes_the_slot_freed_longest_ago_so_recent_prompts_stay_cached(
        gguf_checkpoint):
    small = load(gguf_checkpoint, max_batch_size=3)
    prompts = {w: tuple(small.encode(f"{w}, {w}, {w}, {w},")) for w in WORDS[:3]}
    for word, prompt in prompts.items():  # one at a time: each could take slot 0
        assert run(small, word, prompt, max_tokens=2)[1] == 0
    slots = small.runner._slot_tokens
    assert [tokens[:len(prompt)] for tokens, prompt in zip(
        slots, prompts.values(), strict=True)] == [list(p) for p in prompts.values()]
    for word, prompt in prompts.items():
        assert run(small, f"{word}-again", prompt, max_tokens=2)[1] == len(prompt) - 1


def test_a_long_cached_prompt_is_not_prefilled_again_in_chunks(gguf_checkpoint, engine):
    prompt = chat_ids(engine, "What is the capital of Germany? Answer in one sentence.")
    chunked = load(gguf_checkpoint, max_batch_size=2, max_prefill_tokens_per_step=8)
    answer = run(chunked, "a", prompt)[0]
    calls = []
    run_batch = chunked.runner._run
    chunked.runner._run = lambda items: calls.append(len(items)) or run_batch(items)
    again, cached, _ = run(chunked, "b", prompt)
    assert (again, cached) == (answer, len(prompt) - 1)
    assert calls[0] == 1  # only the prompt's last token is computed, then 11 decode steps
    assert len(calls) == 12


def test_without_the_prompt_cache_a_freed_slot_holds_nothing(gguf_checkpoint):
    plain = load(gguf_checkpoint, max_batch_size=2, prompt_cache=False)
    prompt = tuple(plain.encode("rocket, rocket, rocket,"))
    assert run(plain, "a", prompt)[1] == 0
    assert run(plain, "b", prompt)[1] == 0
    assert plain.runner._slot_tokens == [[], []]


def test_the_prefill_budget_counts_only_the_tokens_a_cached_prompt_leaves_to_compute(
        gguf_checkpoint):
    small = load(gguf_checkpoint, max_batch_size=2, max_prefill_tokens_per_step=16)
    long_prompt = chat_ids(small, "What is the capital of Germany? Answer in one sentence.")
    short_prompt = tuple(small.encode("rocket, rocket,"))
    assert len(long_prompt) > 16 and len(short_prompt) < 16
    answer = run(small, "first", long_prompt)[0]  # prefilled in chunks over several steps
    for rid, prompt in (("again", long_prompt), ("short", short_prompt)):
        small.add_request(GenerationRequest(rid, prompt, SamplingParams(
            max_tokens=12, temperature=0, ignore_eos=True)))
    step = small.step()  # both fit the budget: 1 token of the long prompt is left to compute
    assert step.num_prefill_tokens == 1 + len(short_prompt)
    assert {out.request_id for out in step.outputs} == {"again", "short"}
    texts: dict[str, str] = {}
    outputs = list(step.outputs)
    while small.has_unfinished_requests():
        outputs += small.step().outputs
    for out in outputs:
        texts[out.request_id] = texts.get(out.request_id, "") + out.text
    assert texts["again"] == answer


def test_a_chunked_prompt_aborted_before_its_first_chunk_frees_its_slot(gguf_checkpoint):
    small = load(gguf_checkpoint, max_batch_size=2, max_prefill_tokens_per_step=8)
    prompt = chat_ids(small, "What is the capital of Germany?")
    small.add_request(GenerationRequest("long", prompt, SamplingParams(max_tokens=4)))
    small.step()  # admitted for chunking: its slot is claimed, no chunk run yet
    assert small.scheduler._chunking is not None and len(small.runner._free_slots) == 1
    small.abort("long")
    (out,) = small.step().outputs
    assert out.finish_reason == "abort"
    assert sorted(small.runner._free_slots) == [0, 1] and not small.runner._slots


def test_a_prompt_longer_than_the_budget_past_its_cached_prefix_is_chunked_from_there(
        gguf_checkpoint):
    cached_engine = load(gguf_checkpoint, max_batch_size=2, max_prefill_tokens_per_step=8)
    plain = load(gguf_checkpoint, max_batch_size=2, max_prefill_tokens_per_step=8,
                 prompt_cache=False)
    first = chat_ids(cached_engine, "What is the capital of Germany?")
    answer = run(cached_engine, "first", first)[0]
    turn = [{"role": "user", "content": "What is the capital of Germany?"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And what are the capitals of France, Spain and Italy?"}]
    second = tuple(cached_engine.encode(cached_engine.apply_chat_template(turn)))
    computed = []
    run_batch = cached_engine.runner._run
    cached_engine.runner._run = lambda items: computed.append(len(items)) or run_batch(items)
    text, cached, _ = run(cached_engine, "second", second)
    assert len(first) <= cached and len(second) - cached > 8  # two chunks at least
    prefill_calls = computed[:-11]  # then 11 decode steps of one row
    assert max(prefill_calls) <= 8 and sum(prefill_calls) == len(second) - cached
    assert text == run(plain, "plain", second)[0]


def test_short_first_skips_long_rows_while_short_ones_run_and_answers_the_same(
        gguf_checkpoint):
    answers, step_sizes = [], []
    for short_first in (False, True):
        engine = load(gguf_checkpoint, max_batch_size=4, prompt_cache=False,
                      short_first=short_first)
        prompts = {"germany": chat_ids(engine, "What is the capital of Germany?"),
                   "banana": tuple(engine.encode("banana, banana, banana, banana,"))}
        engine.add_request(GenerationRequest(
            "long", tuple(engine.encode("pencil, pencil, pencil, pencil,")),
            SamplingParams(max_tokens=96, temperature=0, ignore_eos=True)))
        engine.step()
        for rid, ids in prompts.items():
            engine.add_request(GenerationRequest(rid, ids, SamplingParams(
                max_tokens=12, temperature=0, ignore_eos=True)))
        texts: dict[str, str] = {}
        sizes = []
        while engine.has_unfinished_requests():
            result = engine.step()
            sizes.append(result.batch_size)
            for out in result.outputs:
                texts[out.request_id] = texts.get(out.request_id, "") + out.text
        answers.append(texts)
        step_sizes.append(sizes)
    plain, short_first = step_sizes
    # Off: every step decodes every row. On: while the 12-token answers run, the 96-token
    # one (a budget >= 4 x 12, 32+ tokens to go) decodes every other step, then alone.
    assert plain[:11] == [3] * 11 and len(plain) == 94
    first = short_first[:11]
    assert set(first) == {2, 3} and all(a != b for a, b in itertools.pairwise(first)), first
    assert short_first[11:] == [1] * (94 - first.count(3))  # then the long row alone
    assert "Berlin" in answers[1]["germany"] and "banana" in answers[1]["banana"]
    assert answers[0] == answers[1]
