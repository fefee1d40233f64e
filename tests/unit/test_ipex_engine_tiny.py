"""IpexLLMRunner under the scheduler, on a random-weight tiny Llama built in-process (no
checkpoint, no Ray).

Checks the step-wise decode loop against transformers' own greedy ``generate`` and that
sequences joining and leaving a running batch (left padding, KV concatenation, row drops)
get exactly the tokens they get alone. The model is optimized by ipex-llm at
``sym_int8``; with random weights and few tokens, batch effects stay clear of near-ties.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from deployments.engine.batching import BatchingEngine  # noqa: E402
from deployments.engine.ipex_llm import IpexLLMRunner  # noqa: E402
from deployments.engine.options import IpexLLMOptions  # noqa: E402
from deployments.engine.protocol import EngineError, GenerationRequest, SamplingParams  # noqa: E402

WORDS = [f"w{i}" for i in range(120)]


@pytest.fixture(scope="module")
def tiny():
    from ipex_llm import optimize_model
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    model = optimize_model(model, low_bit="sym_int8")
    return model, tokenizer


def make_engine(tiny, *, max_batch_size: int = 8, max_prefill_tokens_per_step: int = 64,
                **options) -> BatchingEngine:
    """An engine on the tiny model; ``options``: IpexLLMOptions fields."""
    model, tokenizer = tiny
    return BatchingEngine(IpexLLMRunner(
        model, tokenizer, device="cpu", max_batch_size=max_batch_size,
        max_prefill_tokens_per_step=max_prefill_tokens_per_step,
        options=IpexLLMOptions(**options)))


def prompt(i: int, length: int) -> tuple[int, ...]:
    return tuple(3 + (i * 7 + k * 13) % len(WORDS) for k in range(length))


def run(engine, requests, *, join_at: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Greedy token ids per request; requests in ``join_at`` are added at that step."""
    join_at = join_at or {}
    pending = {r.request_id: r for r in requests}
    for rid in [r for r in pending if r not in join_at]:
        engine.add_request(pending.pop(rid))
    texts: dict[str, str] = {}
    step = 0
    while engine.has_unfinished_requests() or pending:
        for rid in [r for r, at in join_at.items() if at == step and r in pending]:
            engine.add_request(pending.pop(rid))
        for out in engine.step().outputs:
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
        step += 1
    return texts


def greedy(rid: str, ids: tuple[int, ...], n: int) -> GenerationRequest:
    return GenerationRequest(rid, ids, SamplingParams(max_tokens=n, temperature=0,
                                                      ignore_eos=True))


def test_stepwise_decode_matches_transformers_generate(tiny):
    model, tokenizer = tiny
    ids = prompt(1, 9)
    expected = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                              dtype=torch.long),
                              max_new_tokens=12, min_new_tokens=12, do_sample=False)
    text = tokenizer.decode(expected[0, len(ids):], skip_special_tokens=True)
    ours = run(make_engine(tiny), [greedy("a", ids, 12)])["a"]
    assert ours.split() == text.split()


def test_a_prompt_given_n_times_is_prefilled_once_and_answers_as_alone(tiny):
    shared, other = prompt(2, 9), prompt(5, 6)

    def sampled(rid: str, ids: tuple[int, ...], seed: int) -> GenerationRequest:
        return GenerationRequest(rid, ids, SamplingParams(max_tokens=8, temperature=1.0,
                                                          seed=seed, ignore_eos=True))

    requests = [sampled(f"n{i}", shared, i) for i in range(3)] + [sampled("o", other, 9)]
    alone = {r.request_id: run(make_engine(tiny, prompt_cache=False), [r])[r.request_id]
             for r in requests}
    engine = make_engine(tiny, prompt_cache=False)
    rows: list[int] = []
    forward = engine.runner._forward
    engine.runner._forward = lambda ids, *rest: rows.append(ids.shape) or forward(ids, *rest)
    assert run(engine, requests) == alone
    assert rows[0] == (2, 9)  # one prefill: the shared prompt's row and the other one
    assert len({alone[f"n{i}"] for i in range(3)}) > 1  # seeds differ: so do answers


def test_joining_and_leaving_a_batch_changes_no_ones_tokens(tiny):
    shapes = {"a": (2, 5, 20), "b": (3, 17, 6), "c": (4, 3, 14), "d": (5, 11, 9)}
    alone = {rid: run(make_engine(tiny), [greedy(rid, prompt(i, n), m)])[rid]
             for rid, (i, n, m) in shapes.items()}
    together = run(make_engine(tiny),
                   [greedy(rid, prompt(i, n), m) for rid, (i, n, m) in shapes.items()],
                   join_at={"c": 3, "d": 7})
    assert together == alone


def test_grouped_query_attention_is_installed_and_changes_no_tokens(tiny):
    """The engine's attention (no KV copy per query head) against ipex-llm's own, on a batch
    whose rows join and leave (left padding in the mask)."""
    import ipex_llm.transformers.models.llama as llama

    from deployments.engine import ipex_attention

    shapes = {"a": (2, 5, 20), "b": (3, 17, 6), "c": (4, 3, 14)}
    requests = [greedy(rid, prompt(i, n), m) for rid, (i, n, m) in shapes.items()]
    ipex_attention.uninstall()
    grouped = run(make_engine(tiny, prompt_cache=False), requests, join_at={"c": 4})
    assert llama.scaled_dot_product_attention is ipex_attention.grouped_query_attention
    engine = make_engine(tiny, prompt_cache=False)
    try:
        ipex_attention.uninstall()
        own = run(engine, requests, join_at={"c": 4})
    finally:
        ipex_attention.install()
    assert grouped == own
    assert all(len(text.split()) == m for text, (_, _, m) in zip(
        (grouped[rid] for rid in shapes), shapes.values(), strict=True))


def test_chunked_prefill_gives_the_same_tokens(tiny):
    ids = prompt(6, 70)
    whole = run(make_engine(tiny, max_prefill_tokens_per_step=128), [greedy("x", ids, 8)])
    chunked = run(make_engine(tiny, max_prefill_tokens_per_step=16), [greedy("x", ids, 8)])
    assert chunked == whole


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny):
    def sample(seed: int) -> str:
        request = GenerationRequest("s", prompt(7, 6), SamplingParams(
            max_tokens=16, temperature=1.0, top_p=0.9, seed=seed, ignore_eos=True))
        return run(make_engine(tiny), [request])["s"]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def _kv_bytes_held(engine: BatchingEngine) -> int:
    """Bytes of the KV buffers the running batch's cache holds (spare positions included)."""
    if engine.runner._cache is None:
        return 0
    return sum(t.untyped_storage().nbytes()
               for t in (*engine.runner._cache.key_cache, *engine.runner._cache.value_cache))


@pytest.mark.parametrize("rows_that_fit", [1, 2])
def test_kv_budget_bounds_the_cache_the_batch_allocates(tiny, rows_that_fit):
    shapes = {"a": (2, 5, 20), "b": (3, 17, 6), "c": (4, 3, 14)}
    requests = [greedy(rid, prompt(i, n), m) for rid, (i, n, m) in shapes.items()]
    alone = {r.request_id: run(make_engine(tiny), [r])[r.request_id] for r in requests}
    per_position = make_engine(tiny).runner.kv_bytes_per_position
    # Room for `rows_that_fit` of the widest request (17 + 6 positions + the spare), no more.
    budget_bytes = rows_that_fit * (17 + 20 + 256) * per_position
    engine = make_engine(tiny, kv_cache_gb=budget_bytes / 2**30, prompt_cache=False)
    for r in requests:
        engine.add_request(r)
    texts: dict[str, str] = {}
    sizes = []
    while engine.has_unfinished_requests():
        result = engine.step()
        sizes.append(result.batch_size)
        assert _kv_bytes_held(engine) <= budget_bytes
        for out in result.outputs:
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
    assert texts == alone
    assert max(sizes) == rows_that_fit


def test_kv_budget_refuses_a_request_larger_than_the_whole_budget(tiny):
    per_position = make_engine(tiny).runner.kv_bytes_per_position
    engine = make_engine(tiny, kv_cache_gb=100 * per_position / 2**30)
    with pytest.raises(EngineError) as refused:
        engine.add_request(greedy("big", prompt(1, 9), 12))  # 9 + 12 + 256 spare > 100
    assert refused.value.field == "max_tokens"


def test_constructing_the_engine_runs_no_forward_pass(tiny, monkeypatch):
    # The first forward pass must run on the engine thread: one in the replica's constructor
    # cut its throughput by 25% (IpexLLMRunner._kv_bytes_per_position).
    model, _ = tiny
    calls = []
    original = type(model).forward
    monkeypatch.setattr(type(model), "forward",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    engine = make_engine(tiny)
    assert calls == []
    engine.add_request(greedy("a", prompt(1, 4), 2))
    run(engine, [])
    assert calls  # the patch does see forward passes


# ---- prompt cache --------------------------------------------------------------------------


def run_one(engine, rid: str, ids: tuple[int, ...], n: int = 8) -> tuple[str, int]:
    """One request alone: its text and the prompt tokens the prompt cache supplied."""
    engine.add_request(greedy(rid, ids, n))
    text, cached = "", -1
    while engine.has_unfinished_requests():
        for out in engine.step().outputs:
            text += out.text
            cached = out.num_cached_prompt_tokens
    return text, cached


def next_turn(engine, ids: tuple[int, ...], answer: str, more: tuple[int, ...]) -> tuple[int, ...]:
    """A conversation's next prompt: the previous prompt, its answer, then new tokens."""
    return ids + tuple(engine.encode(answer)) + more


def test_a_repeated_prompt_and_a_next_turn_reuse_the_cache_and_answer_as_without_it(tiny):
    cached_engine, plain = make_engine(tiny), make_engine(tiny, prompt_cache=False)
    first = prompt(3, 12)
    answer, cached = run_one(cached_engine, "a", first)
    assert cached == 0 and answer == run_one(plain, "p", first)[0]
    # The same prompt again: all of it from the cache, its first token from the stored logits.
    forwards = []
    forward = cached_engine.runner._forward
    cached_engine.runner._forward = lambda ids, *rest: forwards.append(ids.shape[1]) or forward(ids,
                                                                                       *rest)
    assert run_one(cached_engine, "again", first) == (answer, len(first))
    assert forwards == [1] * 7  # decode steps only: 8 tokens, the first without a forward
    cached_engine.runner._forward = forward
    assert cached_engine.runner._prompt_logits == {}  # let go of as the rows left
    second = next_turn(cached_engine, first, answer, prompt(9, 5))
    text, cached = run_one(cached_engine, "b", second)
    # The answer's tokens but its last (never fed to the model) came from the cache too.
    assert cached == len(first) + len(cached_engine.encode(answer)) - 1
    assert (text, 0) == run_one(plain, "pb", second)


def test_cached_and_uncached_prompts_admitted_together_keep_their_rows(tiny):
    cached_engine, plain = make_engine(tiny), make_engine(tiny, prompt_cache=False)
    shared = prompt(4, 10)
    run_one(cached_engine, "warm", shared)
    requests = [greedy("new-1", prompt(5, 7), 9), greedy("old-1", shared + prompt(6, 3), 6),
                greedy("new-2", prompt(7, 13), 5), greedy("old-2", shared, 7),
                greedy("new-3", prompt(8, 4), 8)]
    cached_texts = run(cached_engine, requests)
    assert cached_texts == run(plain, requests)
    assert cached_engine.runner._claims == {}


def test_a_cached_prompt_whose_rest_exceeds_the_budget_is_chunked_from_its_prefix(tiny):
    engine = make_engine(tiny, max_prefill_tokens_per_step=8)
    first = prompt(2, 30)
    answer = run_one(engine, "a", first)[0]
    second = next_turn(engine, first, answer, prompt(10, 20))
    computed = []
    forward = engine.runner._forward
    engine.runner._forward = lambda ids, *rest: computed.append(ids.shape[1]) or forward(ids, *rest)
    text, cached = run_one(engine, "b", second)
    assert cached >= len(first) and len(second) - cached > 8
    assert max(computed[:-7]) <= 8 and sum(computed[:-7]) == len(second) - cached  # 7 decodes
    assert text == run_one(make_engine(tiny, prompt_cache=False), "p", second)[0]


def test_the_prompt_cache_and_the_batch_together_stay_within_the_kv_budget(tiny):
    per_position = make_engine(tiny).runner.kv_bytes_per_position
    budget_bytes = 3000 * per_position  # 300 positions for the prompt cache
    engine = make_engine(tiny, kv_cache_gb=budget_bytes / 2**30)
    assert engine.runner._prefixes.capacity == 300 and engine.runner.limits.max_kv_tokens == 2700
    for i in range(12):  # 12 different prompts of 40 positions each (32 + 8 answer tokens)
        run_one(engine, f"r{i}", prompt(20 + i, 32), 9)
        entries = engine.runner._prefixes._entries.values()
        kv = sum(t.untyped_storage().nbytes() for entry in entries
                 for key_value in entry.kv for t in key_value)
        logits = sum(entry.prompt_logits[1].untyped_storage().nbytes() for entry in entries)
        assert kv == sum(len(entry.tokens) for entry in entries) * per_position
        # The prompt logits are counted, rounded up to whole positions.
        assert kv + logits <= engine.runner._prefixes.positions * per_position < kv + logits + \
            len(entries) * per_position
        assert engine.runner._prefixes.positions <= 300
    logits_positions = -(-engine.vocab_size * 4 // per_position)
    assert len(engine.runner._prefixes) == 300 // (40 + logits_positions)  # the newest kept
    assert run_one(engine, "newest", prompt(31, 32), 1)[1] == 32  # with the logits after it
    assert run_one(engine, "evicted", prompt(20, 32), 1)[1] == 0
    # What the replica's /health reports: the store's own counts, in the budget's bytes.
    usage = engine.prompt_cache_usage().to_dict()
    assert usage == {"entries": len(engine.runner._prefixes),
                     "positions": engine.runner._prefixes.positions, "capacity_positions": 300,
                     "bytes": engine.runner._prefixes.positions * per_position,
                     "capacity_bytes": 300 * per_position}
    assert 0 < usage["bytes"] <= usage["capacity_bytes"]
    assert make_engine(tiny, prompt_cache=False).prompt_cache_usage() is None
    # The KV it let go of (batches rebuilt as rows left, evicted entries) went back to the
    # OS as each request ended and the batch emptied.
    assert engine.heap_trim_stats().trims >= 12


def test_an_aborted_chunked_prompt_lets_go_of_its_claim(tiny):
    engine = make_engine(tiny, max_prefill_tokens_per_step=8)
    first = prompt(2, 30)
    answer = run_one(engine, "a", first)[0]
    engine.add_request(greedy("b", next_turn(engine, first, answer, prompt(10, 20)), 4))
    engine.step()
    assert "b" in engine.runner._claims or engine.runner._chunk is not None
    engine.abort("b")
    outputs = engine.step().outputs
    assert [o.finish_reason for o in outputs] == ["abort"]
    assert engine.runner._claims == {} and engine.runner._chunk is None


def test_aborting_mid_chunked_prefill_frees_the_slot_at_the_next_step(tiny):
    """A long prompt aborted between two of its chunks: the next step drops its partial KV
    and prefills the waiting request, which answers as it would alone."""
    engine = make_engine(tiny, max_batch_size=1, max_prefill_tokens_per_step=16,
                         prompt_cache=False)
    alone = run(make_engine(tiny, prompt_cache=False), [greedy("next", prompt(4, 12), 4)])
    engine.add_request(greedy("long", prompt(3, 120), 4))
    engine.add_request(greedy("next", prompt(4, 12), 4))
    for _ in range(3):  # chosen for chunking, then two of its chunks
        engine.step()
    assert engine.runner._chunk is not None and engine.runner._chunk[0] == "long"
    engine.abort("long")
    result = engine.step()
    assert {o.request_id: o.finish_reason for o in result.outputs if o.finished} == \
        {"long": "abort"}
    assert result.num_prefill_tokens == 12  # the waiting prompt, no chunk of the aborted one
    assert engine.runner._chunk is None and (engine.num_running, engine.num_waiting) == (1, 0)
    texts = run(engine, [])
    first = "".join(o.text for o in result.outputs if o.request_id == "next")
    assert first + texts["next"] == alone["next"]


def _record_decodes(engine: BatchingEngine) -> list[tuple[int, int]]:
    """(rows decoded, rows running) of each decode step the engine runs from now on."""
    steps: list[tuple[int, int]] = []
    runner = engine.runner
    decode = runner._decode
    runner._decode = lambda seqs: steps.append((len(seqs), len(runner._rows))) or \
        decode(seqs)
    return steps


def test_short_first_decodes_leading_rows_and_changes_no_ones_tokens(tiny):
    shapes = {"long-a": (2, 5, 70), "long-b": (3, 9, 60), "s1": (4, 3, 6), "s2": (5, 11, 8),
              "s3": (6, 4, 5)}
    requests = [greedy(rid, prompt(i, n), m) for rid, (i, n, m) in shapes.items()]
    join_at = {"s1": 2, "s2": 2, "s3": 12}
    plain = run(make_engine(tiny, short_first=False), requests, join_at=join_at)
    engine = make_engine(tiny)
    assert engine.runner.limits.short_first  # the default on the CPU
    steps = _record_decodes(engine)
    assert run(engine, requests, join_at=join_at) == plain
    # Joined in front, the short rows lead; the long ones sit out every other step.
    assert (2, 4) in steps and (1, 3) in steps, steps
    assert sum(n for n, _ in steps) < sum(total for _, total in steps)
    # A long row left its KV (holes skipped) in the prompt cache: its next turn reuses it all.
    first = prompt(2, 5)
    answer = plain["long-a"]
    second = next_turn(engine, first, answer, prompt(9, 4))
    text, cached = run_one(engine, "next", second)
    assert cached == len(first) + len(engine.encode(answer)) - 1
    assert text == run_one(make_engine(tiny, prompt_cache=False), "p", second)[0]


def test_short_first_skips_rows_only_while_a_hole_fits_the_kv_budget(tiny):
    requests = [greedy("long", prompt(2, 5), 60), greedy("short", prompt(4, 3), 6)]
    expected = run(make_engine(tiny, short_first=False), requests, join_at={"short": 1})
    for room in (0, -1):  # the bound after one more position for every row, or one less
        engine = make_engine(tiny, prompt_cache=False)
        runner = engine.runner
        decodable = runner.rows_decodable

        def tight_budget(running, wanted, runner=runner, decodable=decodable, room=room):
            bound = runner.kv_positions(running, ()) + len(running)
            runner.limits = dataclasses.replace(runner.limits, max_kv_tokens=bound + room)
            return decodable(running, wanted)

        runner.rows_decodable = tight_budget
        steps = _record_decodes(engine)
        assert run(engine, requests, join_at={"short": 1}) == expected
        skipped = any(n < total for n, total in steps)
        assert skipped == (room == 0), steps


def test_short_first_is_exact_when_the_cache_does_not_append_in_place(tiny, monkeypatch):
    """ipex-llm 2.2 appends the leading rows' new position into the batch's own buffers; a
    cache that copied instead (a new buffer) must still leave every row its tokens."""
    from ipex_llm.transformers.kv import DynamicNormalCache

    requests = [greedy("long", prompt(2, 5), 60), greedy("short", prompt(4, 3), 14),
                greedy("other", prompt(5, 4), 12)]
    join_at = {"short": 1, "other": 1}
    expected = run(make_engine(tiny, short_first=False), requests, join_at=join_at)
    update = DynamicNormalCache.update

    def copying_update(self, key, value, layer, *rest):
        if len(self.key_cache) > layer:  # no room past the cached positions: a new buffer
            self.key_cache[layer] = self.key_cache[layer].clone()
            self.value_cache[layer] = self.value_cache[layer].clone()
        return update(self, key, value, layer, *rest)

    monkeypatch.setattr(DynamicNormalCache, "update", copying_update)
    engine = make_engine(tiny, prompt_cache=False)
    steps = _record_decodes(engine)
    assert run(engine, requests, join_at=join_at) == expected
    assert (2, 3) in steps


# ---- the Intel GPU load path, on the CPU: the same code, only the device differs ---------


def test_warm_up_runs_the_model_before_serving_and_leaves_no_state(tiny):
    model, _ = tiny
    forwards: list[int] = []
    hook = model.register_forward_hook(lambda _m, args, _out: forwards.append(1))
    try:
        cold = make_engine(tiny)
        cold.warm_up()  # off by default on the CPU
        assert forwards == []
        warm = make_engine(tiny, warmup=True)
        warm.warm_up()
        assert len(forwards) == 4  # prefill and decode, at batch 1 and at batch 2
    finally:
        hook.remove()
    assert not warm.has_unfinished_requests() and warm.runner._running_rows is None
    assert warm.runner._prefixes is not None and not warm.runner._prefixes._entries
    request = greedy("a", prompt(3, 7), 6)
    assert run(warm, [request]) == run(cold, [request])


def test_warm_up_is_on_by_default_on_an_xpu_only():
    assert IpexLLMOptions().warmup is None  # decided by the device
    from deployments.engine import ipex_llm

    class Model:
        """Records what to_device does to a loaded model, as a real module would do it."""

        def __init__(self) -> None:
            self.calls: list[tuple[str, ...]] = []

        def half(self) -> Model:
            self.calls.append(("half",))
            return self

        def to(self, device: str) -> Model:
            self.calls.append(("to", device))
            return self

    on_xpu, on_cpu = Model(), Model()
    assert ipex_llm.to_device(on_xpu, "xpu:0") is on_xpu
    assert ipex_llm.to_device(on_cpu, "cpu") is on_cpu
    assert on_xpu.calls == [("half",), ("to", "xpu:0")]  # fp16 on the tile, as ipex-llm does
    assert on_cpu.calls == [("to", "cpu")]


def test_fp8_kv_cache_is_held_off_where_ipex_llm_would_turn_it_on(monkeypatch):
    """ipex-llm turns an FP8 KV cache on for Arc GPUs at batch > 1; the engine's KV joins copy
    DynamicNormalCache tensors, so its environment setting must win over that decision."""
    from ipex_llm.transformers.low_bit_linear import LowBitLinear
    from ipex_llm.transformers.models import utils as ipex_utils

    from deployments.engine.ipex_llm import keep_kv_cache_unquantized

    monkeypatch.setattr(ipex_utils, "get_xpu_device_name", lambda device: "arc")
    env: dict[str, str] = {}
    for name in ("IPEX_LLM_QUANTIZE_KV_CACHE", "BIGDL_QUANTIZE_KV_CACHE", "IPEX_LLM_LOW_MEM"):
        monkeypatch.delenv(name, raising=False)
    linear = LowBitLinear(64, 64, qtype=2, bias=False)  # sym_int4: uint8 weights
    linear.weight = torch.nn.Parameter(torch.zeros(64, dtype=torch.uint8), requires_grad=False)
    batch_of_two = torch.zeros(2, 1, 64)
    assert ipex_utils.use_quantize_kv_cache(linear, batch_of_two, 32, 8)  # ipex-llm's choice

    keep_kv_cache_unquantized(env)
    monkeypatch.setattr(ipex_utils.os, "environ", env)
    assert env == {"IPEX_LLM_QUANTIZE_KV_CACHE": "0"}
    assert not ipex_utils.use_quantize_kv_cache(linear, batch_of_two, 32, 8)


@pytest.mark.parametrize("name", ["IPEX_LLM_QUANTIZE_KV_CACHE", "BIGDL_QUANTIZE_KV_CACHE"])
def test_asking_for_an_fp8_kv_cache_is_refused(name):
    from deployments.engine.ipex_llm import keep_kv_cache_unquantized

    with pytest.raises(EngineError, match=f"{name}=1"):
        keep_kv_cache_unquantized({name: "1"})
    env = {"BIGDL_QUANTIZE_KV_CACHE": "0"}
    keep_kv_cache_unquantized(env)
    assert env == {"IPEX_LLM_QUANTIZE_KV_CACHE": "0"}
