"""The continuous-batching scheduler, exercised through the model-free EchoEngine."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from deployments.contract import ErrorKind
from deployments.engine.echo import ECHO_EOS_TOKEN, EchoEngine
from deployments.engine.options import EchoOptions
from deployments.engine.protocol import EngineError, GenerationRequest, SamplingParams


def make_engine(*, max_batch_size: int = 4, max_prefill_tokens_per_step: int = 64,
                **options) -> EchoEngine:
    """An echo engine; ``options``: EchoOptions fields."""
    return EchoEngine(max_batch_size=max_batch_size,
                      max_prefill_tokens_per_step=max_prefill_tokens_per_step,
                      options=EchoOptions(**options))


def request(engine: EchoEngine, rid: str, prompt: str, **params) -> GenerationRequest:
    return GenerationRequest(rid, tuple(engine.encode(prompt)), SamplingParams(**params))


def run(engine: EchoEngine, max_steps: int = 1000) -> tuple[dict[str, str], dict[str, str],
                                                              list[int]]:
    texts: dict[str, str] = {}
    reasons: dict[str, str] = {}
    batch_sizes: list[int] = []
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        result = engine.step()
        batch_sizes.append(result.batch_size)
        for out in result.outputs:
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return texts, reasons, batch_sizes


def test_answers_stay_with_their_request_in_one_batch():
    engine = make_engine()
    for word in ["apple", "berry", "cherry", "damson"]:
        engine.add_request(request(engine, word, f"say {word}", max_tokens=10))
    texts, reasons, sizes = run(engine)
    for word in ["apple", "berry", "cherry", "damson"]:
        assert texts[word] == (word * 3)[:10]
        assert reasons[word] == "length"
    assert max(sizes) == 4


def test_new_requests_join_between_steps_and_short_ones_leave_early():
    engine = make_engine()
    engine.add_request(request(engine, "long", "x long", max_tokens=50))
    engine.step()
    engine.step()
    engine.add_request(request(engine, "short", "x short", max_tokens=3))
    finished_at: dict[str, int] = {}
    for step in range(100):
        for out in engine.step().outputs:
            if out.finished:
                finished_at[out.request_id] = step
        if not engine.has_unfinished_requests():
            break
    assert finished_at["short"] < 5  # not held behind the long request
    assert finished_at["long"] > finished_at["short"]


def test_a_joining_requests_first_token_is_handed_out_before_the_steps_decode():
    engine = make_engine()
    engine.add_request(request(engine, "running", "x run", max_tokens=20))
    engine.step()
    calls: list[tuple[str, tuple[str, ...]]] = []
    prefill, decode = engine._prefill, engine._decode
    engine._prefill = lambda seqs: calls.append(
        ("prefill", tuple(s.request_id for s in seqs))) or prefill(seqs)
    engine._decode = lambda seqs: calls.append(
        ("decode", tuple(s.request_id for s in seqs))) or decode(seqs)
    engine.add_request(request(engine, "new", "x new", max_tokens=5))
    result = engine.step(early=lambda outputs: calls.append(
        ("early", tuple(o.request_id for o in outputs))))
    # Its TTFT does not include a decode step of the batch, which it then joins at once.
    assert calls == [("prefill", ("new",)), ("early", ("new",)),
                     ("decode", ("running", "new"))]
    assert sorted(o.request_id for o in result.outputs) == ["new", "running"]
    assert result.batch_size == 2
    # Without ``early`` a step returns everything, the first token before the second.
    engine.add_request(request(engine, "other", "x oth", max_tokens=5))
    texts = [o.text for o in engine.step().outputs if o.request_id == "other"]
    assert "".join(texts) == "ot" and len(texts) == 2


def test_batch_size_is_capped_and_waiting_requests_are_admitted_when_slots_free():
    engine = make_engine(max_batch_size=2)
    for i in range(5):
        engine.add_request(request(engine, f"r{i}", f"p w{i}", max_tokens=4))
    _, reasons, sizes = run(engine)
    assert len(reasons) == 5
    assert max(sizes) == 2


def test_long_prompt_is_prefilled_in_chunks_while_others_decode():
    engine = make_engine(max_prefill_tokens_per_step=16)
    engine.add_request(request(engine, "running", "x run", max_tokens=30))
    engine.step()
    engine.add_request(request(engine, "long", "y" * 100 + " tail", max_tokens=2))
    decoded_while_chunking = 0
    for _ in range(6):
        result = engine.step()
        assert result.num_prefill_tokens <= 16
        decoded_while_chunking += sum(1 for o in result.outputs if o.request_id == "running")
    assert decoded_while_chunking >= 5  # the running request kept decoding every step
    texts, reasons, _ = run(engine)
    assert reasons["long"] == "length"
    assert texts["long"] == "ta"


def test_stop_string_is_cut_and_never_streamed():
    engine = make_engine()
    engine.add_request(request(engine, "s", "x abcdef", max_tokens=20, stop=("cde",)))
    texts, reasons, _ = run(engine)
    assert texts["s"] == "ab"
    assert reasons["s"] == "stop"


@pytest.mark.parametrize(("min_tokens", "text", "reason"), [
    (0, "abc"[:0], "stop"),  # "ab" ends at the 2nd token
    (4, "abc", "stop"),  # the 2nd-token "ab" is text; the one ending at the 5th token stops
    (8, "abcabc", "stop"),  # the 8th token ends "ab" again
])
def test_stop_strings_count_only_from_min_tokens_on(min_tokens, text, reason):
    engine = make_engine()
    engine.add_request(request(engine, "s", "x abcabcabc", max_tokens=20, stop=("ab",),
                               min_tokens=min_tokens))
    texts, reasons, _ = run(engine)
    assert (texts.get("s", ""), reasons["s"]) == (text, reason)


def test_abort_frees_the_slot_and_reports_abort():
    engine = make_engine(max_batch_size=1)
    engine.add_request(request(engine, "a", "x aaa", max_tokens=100))
    engine.add_request(request(engine, "b", "x bbb", max_tokens=3))
    engine.step()
    engine.abort("a")
    texts, reasons, _ = run(engine)
    assert reasons == {"a": "abort", "b": "length"}
    assert texts["b"] == "bbb"


def test_aborting_a_waiting_request_never_runs_it():
    engine = make_engine(max_batch_size=1)
    engine.add_request(request(engine, "a", "x aaa", max_tokens=5))
    engine.add_request(request(engine, "b", "x bbb", max_tokens=5))
    engine.abort("b")
    texts, reasons, _ = run(engine)
    assert reasons["b"] == "abort"
    assert texts.get("b", "") == ""


def test_context_limit_ends_with_length_and_too_long_prompts_are_refused():
    engine = make_engine(max_context_tokens=12)
    engine.add_request(request(engine, "a", "x abcdefgh", max_tokens=100))
    _, reasons, _ = run(engine)
    assert reasons["a"] == "length"
    with pytest.raises(EngineError, match="context"):
        engine.add_request(request(engine, "b", "y" * 20, max_tokens=1))


def test_duplicate_request_ids_are_refused():
    engine = make_engine()
    engine.add_request(request(engine, "a", "x a"))
    with pytest.raises(EngineError, match="already"):
        engine.add_request(request(engine, "a", "x a"))


def _sampling_engine(**params) -> tuple[EchoEngine, object]:
    """An engine holding one waiting request with these sampling params, and its sequence."""
    engine = make_engine()
    engine.add_request(request(engine, "s", "x", max_tokens=4, **params))
    return engine, engine._waiting[0]


def test_shared_sampler_greedy_and_top_p_keep_the_likeliest_tokens():
    logits = np.log(np.array([[0.1, 0.6, 0.3]], dtype=np.float32))
    engine, seq = _sampling_engine(temperature=0)
    assert engine._sample(logits, [seq]) == [1]
    engine, seq = _sampling_engine(temperature=1.0, top_p=0.5)
    # 0.6 alone crosses top_p: nothing else may ever be drawn.
    assert {engine._sample(logits, [seq])[0] for _ in range(50)} == {1}
    engine, seq = _sampling_engine(temperature=1.0, top_p=0.7)
    assert {engine._sample(logits, [seq])[0] for _ in range(200)} == {1, 2}


@pytest.mark.parametrize(("top_k", "drawn"), [(1, {1}), (2, {1, 2}), (0, {0, 1, 2}),
                                               (-1, {0, 1, 2}), (3, {0, 1, 2})])
def test_shared_sampler_top_k_keeps_the_k_likeliest_tokens(top_k, drawn):
    logits = np.log(np.array([[0.1, 0.6, 0.3]], dtype=np.float32))
    engine, seq = _sampling_engine(temperature=1.0, top_k=top_k, seed=1)
    assert {engine._sample(logits, [seq])[0] for _ in range(400)} == drawn


def test_shared_sampler_repeats_a_seed_and_bars_eos_until_min_tokens():
    flat = np.zeros((1, 1000), dtype=np.float32)

    def draws(seed: int) -> list[int]:
        engine, seq = _sampling_engine(temperature=1.0, seed=seed)
        return [engine._sample(flat, [seq])[0] for _ in range(8)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    eos_first = np.full((1, 1000), -10.0, dtype=np.float32)
    eos_first[0, ECHO_EOS_TOKEN] = 10.0
    engine, seq = _sampling_engine(temperature=0, min_tokens=2)
    assert engine._sample(eos_first, [seq]) != [ECHO_EOS_TOKEN]
    seq.generated += [5, 6]
    assert engine._sample(eos_first, [seq]) == [ECHO_EOS_TOKEN]


def test_finished_and_aborted_requests_leave_no_sampler_state():
    engine = make_engine()
    for rid in ("done", "dropped"):
        engine.add_request(request(engine, rid, f"x {rid}", max_tokens=6, temperature=0.8,
                                   seed=1))
    engine.step()
    engine._rng(engine._running[0])
    engine._rng(engine._running[1])
    engine.abort("dropped")
    run(engine)
    assert engine._rngs == {}


def test_kv_budget_holds_a_request_back_until_it_fits():
    # Each request may reach 6 + 10 = 16 KV cells; the budget holds one, not two.
    engine = make_engine(max_kv_tokens=30)
    for word in ("aaaa", "bbbb"):
        engine.add_request(request(engine, word, f"p {word}", max_tokens=10))
    first_output_step: dict[str, int] = {}
    finished_step: dict[str, int] = {}
    step = 0
    while engine.has_unfinished_requests():
        result = engine.step()
        assert result.batch_size <= 1
        for out in result.outputs:
            first_output_step.setdefault(out.request_id, step)
            if out.finished:
                finished_step[out.request_id] = step
        step += 1
    assert first_output_step["bbbb"] >= finished_step["aaaa"]


def test_kv_budget_serves_the_queue_first_come_first_served():
    # Running "a" holds 16 of 30 cells; "big" (20) must wait, and "tiny" (6), which would
    # fit now, must not overtake it.
    engine = make_engine(max_kv_tokens=30)
    engine.add_request(request(engine, "a", "p aaaa", max_tokens=10))
    engine.step()
    engine.add_request(request(engine, "big", "p bbbb", max_tokens=14))
    engine.add_request(request(engine, "tiny", "p c", max_tokens=3))
    started: dict[str, int] = {}
    finished: dict[str, int] = {}
    for step in range(100):
        for out in engine.step().outputs:
            started.setdefault(out.request_id, step)
            if out.finished:
                finished[out.request_id] = step
        if not engine.has_unfinished_requests():
            break
    assert started["big"] >= finished["a"]
    assert started["tiny"] >= started["big"]


def test_a_request_that_cannot_fit_the_kv_budget_alone_is_refused():
    engine = make_engine(max_kv_tokens=12)
    with pytest.raises(EngineError) as refused:
        engine.add_request(request(engine, "r", "p aaaa", max_tokens=10))
    assert refused.value.kind == ErrorKind.INVALID_REQUEST and refused.value.field == "max_tokens"
    assert "need 16 positions of this replica's KV cache" in refused.value.message
    engine.add_request(request(engine, "r", "p aaaa", max_tokens=6))  # 12 cells: fits
    texts, reasons, _ = run(engine)
    assert texts["r"] == "aaaaaa" and reasons["r"] == "length"


def decoded_per_step(engine: EchoEngine, steps: int) -> list[set[str]]:
    """Which requests each of the next ``steps`` steps decoded (admission's first tokens
    aside)."""
    seen: list[set[str]] = []
    decode = engine._decode
    engine._decode = lambda seqs: seen.append({s.request_id for s in seqs}) or decode(seqs)
    for _ in range(steps):
        engine.step()
    del engine._decode
    return seen


def test_short_first_decodes_long_rows_every_other_step_while_short_ones_run():
    engine = make_engine(short_first=True)
    for rid in ("long-a", "long-b"):
        engine.add_request(request(engine, rid, f"x {rid}", max_tokens=200))
    engine.step()  # both join and take one step together: alike rows
    engine.add_request(request(engine, "short", "x short", max_tokens=9))
    steps = decoded_per_step(engine, 8)  # first token at admission, 8 decoded
    assert all("short" in s for s in steps)
    long_steps = [s >= {"long-a", "long-b"} for s in steps]
    assert long_steps.count(True) == 4, steps  # every other step: never starved
    assert all(a != b for a, b in itertools.pairwise(long_steps))
    assert not any(seq.request_id == "short" for seq in engine._running)  # 9 tokens: done
    alike = decoded_per_step(engine, 4)
    assert all(s == {"long-a", "long-b"} for s in alike)  # no short row: all every step


def test_short_first_keeps_a_batch_of_alike_rows_whole_and_answers_unchanged():
    prompts = {"a": ("x apple", 40), "b": ("x berry", 37), "c": ("x cherry", 6),
               "d": ("x damson", 50)}
    answers = []
    for short_first in (False, True):
        engine = make_engine(short_first=short_first)
        for rid, (prompt, max_tokens) in prompts.items():
            engine.add_request(request(engine, rid, prompt, max_tokens=max_tokens))
        texts, reasons, sizes = run(engine)
        answers.append(texts)
        assert set(reasons.values()) == {"length"}
        if short_first:
            # budgets 37-50 next to 6 (>= 4 x 6), 32+ tokens to go: long until "c" is done
            assert sizes[:5] == [1, 4, 1, 4, 1], sizes
            # then alike rows: each step decodes all that run (3, then 2 as "b" ends, ...)
            assert sizes[5:] == sorted(sizes[5:], reverse=True) and sizes[5] == 3, sizes
        # "d" decodes 49 tokens after its first: in 49 steps, or 3 more with short_first
        # (the 3 steps "c" took alone)
        assert len(sizes) == (52 if short_first else 49)
    assert answers[0] == answers[1]


def test_short_first_is_refused_for_a_backend_that_decodes_its_whole_batch():
    class WholeBatch(EchoEngine):
        decodes_row_subsets = False

    with pytest.raises(EngineError, match="short_first"):
        WholeBatch(max_batch_size=2, max_prefill_tokens_per_step=8,
                   options=EchoOptions(short_first=True))
    assert WholeBatch(max_batch_size=2, max_prefill_tokens_per_step=8).short_first is False


def test_short_first_never_splits_requests_of_alike_budgets_however_far_along():
    engine = make_engine(short_first=True)
    engine.add_request(request(engine, "early", "x early", max_tokens=100))
    for _ in range(90):
        engine.step()  # 91 tokens: the first at admission, one per step
    engine.add_request(request(engine, "late", "x late", max_tokens=100))
    steps = decoded_per_step(engine, 12)
    # 9 tokens to go next to 99: both decode every step (skipping would cost throughput
    # to reorder alike requests), until "early" is done
    assert steps == [{"early", "late"}] * 9 + [{"late"}] * 3
