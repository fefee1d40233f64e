"""The continuous-batching scheduler and the shared sampler, on plain data: the model-free
echo runner, or a runner written here. No model, no torch (test_layers runs this module
with torch made unimportable)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from deployments.contract import ErrorKind
from deployments.engine.batching import BatchingEngine
from deployments.engine.detokenizer import StopStringTextStream
from deployments.engine.echo import ECHO_EOS_TOKEN, EchoRunner
from deployments.engine.options import EchoOptions
from deployments.engine.plan import RunnerOutput, SequenceState, StepPlan
from deployments.engine.protocol import EngineError, GenerationRequest, SamplingParams
from deployments.engine.sampler import Sampler
from deployments.engine.scheduler import Scheduler


def make_engine(*, max_batch_size: int = 4, max_prefill_tokens_per_step: int = 64,
                **options) -> BatchingEngine:
    """The echo runner under the scheduler; ``options``: EchoOptions fields."""
    return BatchingEngine(EchoRunner(max_batch_size=max_batch_size,
                                     max_prefill_tokens_per_step=max_prefill_tokens_per_step,
                                     options=EchoOptions(**options)))


def record_plans(engine: BatchingEngine) -> list[StepPlan]:
    """Every plan the engine's runner executes from now on."""
    plans: list[StepPlan] = []
    execute = engine.runner.execute
    engine.runner.execute = lambda plan: plans.append(plan) or execute(plan)
    return plans


def request(engine: BatchingEngine, rid: str, prompt: str, **params) -> GenerationRequest:
    return GenerationRequest(rid, tuple(engine.encode(prompt)), SamplingParams(**params))


def run(engine: BatchingEngine, max_steps: int = 1000) -> tuple[dict[str, str], dict[str, str],
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
    execute = engine.runner.execute

    def recorded(plan: StepPlan):
        if plan.prefill:
            calls.append(("prefill", tuple(w.seq.request_id for w in plan.prefill)))
        if plan.decode:
            calls.append(("decode", tuple(s.request_id for s in plan.decode)))
        return execute(plan)

    engine.runner.execute = recorded
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


def test_aborting_a_prompt_mid_chunked_prefill_frees_its_slot_at_the_next_step():
    """A client that hangs up during a long prompt's chunked prefill: the next step drops
    it (the runner lets go of its chunk state) and admits the next waiting prompt, with no
    further chunk of the aborted prompt computed."""
    engine = make_engine(max_batch_size=1, max_prefill_tokens_per_step=16)
    plans = record_plans(engine)
    engine.add_request(request(engine, "long", "y" * 100 + " tail", max_tokens=2))
    engine.add_request(request(engine, "next", "x nxt", max_tokens=3))
    for _ in range(3):  # chosen for chunking, then two of its seven chunks
        engine.step()
    assert [w.seq.request_id for p in plans for w in p.prefill] == ["long", "long"]
    assert (engine.num_running, engine.num_waiting) == (1, 1)
    engine.abort("long")
    plans.clear()
    outputs = engine.step().outputs
    assert {o.request_id: o.finish_reason for o in outputs if o.finished} == {"long": "abort"}
    assert [s.request_id for s in plans[0].leaving] == ["long"]  # released before admission
    assert [w.seq.request_id for p in plans for w in p.prefill] == ["next"]  # no more chunks
    assert (engine.num_running, engine.num_waiting) == (1, 0)
    first = "".join(o.text for o in outputs if o.request_id == "next")
    texts, reasons, _ = run(engine)
    assert reasons == {"next": "length"} and first + texts["next"] == "nxt"


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


class _TokenSampler(Sampler):
    """The shared sampler, answering token ids only."""

    def sample(self, logits, sequences):
        return [sample.token for sample in super().sample(logits, sequences)]


def _sampled(**params) -> tuple[Sampler, SequenceState]:
    """A sampler (EOS: the echo runner's) and a sequence with these sampling params."""
    request = GenerationRequest("s", (1, 2), SamplingParams(max_tokens=4, **params))
    return _TokenSampler([ECHO_EOS_TOKEN]), SequenceState(request, StopStringTextStream(()))


def test_shared_sampler_greedy_and_top_p_keep_the_likeliest_tokens():
    logits = np.log(np.array([[0.1, 0.6, 0.3]], dtype=np.float32))
    sampler, seq = _sampled(temperature=0)
    assert sampler.sample(logits, [seq]) == [1]
    sampler, seq = _sampled(temperature=1.0, top_p=0.5)
    # 0.6 alone crosses top_p: nothing else may ever be drawn.
    assert {sampler.sample(logits, [seq])[0] for _ in range(50)} == {1}
    sampler, seq = _sampled(temperature=1.0, top_p=0.7)
    assert {sampler.sample(logits, [seq])[0] for _ in range(200)} == {1, 2}


@pytest.mark.parametrize(("top_k", "drawn"), [(1, {1}), (2, {1, 2}), (0, {0, 1, 2}),
                                               (-1, {0, 1, 2}), (3, {0, 1, 2})])
def test_shared_sampler_top_k_keeps_the_k_likeliest_tokens(top_k, drawn):
    logits = np.log(np.array([[0.1, 0.6, 0.3]], dtype=np.float32))
    sampler, seq = _sampled(temperature=1.0, top_k=top_k, seed=1)
    assert {sampler.sample(logits, [seq])[0] for _ in range(400)} == drawn


def test_shared_sampler_repeats_a_seed_and_bars_eos_until_min_tokens():
    flat = np.zeros((1, 1000), dtype=np.float32)

    def draws(seed: int) -> list[int]:
        sampler, seq = _sampled(temperature=1.0, seed=seed)
        return [sampler.sample(flat, [seq])[0] for _ in range(8)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    eos_first = np.full((1, 1000), -10.0, dtype=np.float32)
    eos_first[0, ECHO_EOS_TOKEN] = 10.0
    sampler, seq = _sampled(temperature=0, min_tokens=2)
    assert sampler.sample(eos_first, [seq]) != [ECHO_EOS_TOKEN]
    seq.generated += [5, 6]
    assert sampler.sample(eos_first, [seq]) == [ECHO_EOS_TOKEN]


class LogitsEchoRunner(EchoRunner):
    """The echo runner answering with logits (one-hot on its token), as a model runner
    does, so the scheduler samples them."""

    def execute(self, plan):
        tokens = super().execute(plan).tokens
        logits = np.full((len(tokens), 256), -1e9, dtype=np.float32)
        logits[np.arange(len(tokens)), tokens] = 0.0
        return RunnerOutput(logits=logits)


def test_finished_and_aborted_requests_leave_no_sampler_state():
    engine = BatchingEngine(LogitsEchoRunner(max_batch_size=4, max_prefill_tokens_per_step=64))
    for rid in ("done", "dropped"):
        engine.add_request(request(engine, rid, f"x {rid}", max_tokens=6, temperature=0.8,
                                   seed=1))
    engine.step()
    assert engine.scheduler._sampler.num_requests == 2  # sampled at a temperature
    engine.abort("dropped")
    _, reasons, _ = run(engine)
    assert reasons == {"done": "length", "dropped": "abort"}
    assert engine.scheduler._sampler.num_requests == 0


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


def decoded_per_step(engine: BatchingEngine, steps: int) -> list[set[str]]:
    """Which requests each of the next ``steps`` steps decoded (admission's first tokens
    aside)."""
    execute = engine.runner.execute
    plans = record_plans(engine)
    for _ in range(steps):
        engine.step()
    engine.runner.execute = execute
    return [{s.request_id for s in plan.decode} for plan in plans if plan.decode]


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
    assert not any(seq.request_id == "short" for seq in engine.scheduler._running)  # done
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
    def whole_batch_runner(**options) -> EchoRunner:
        runner = EchoRunner(max_batch_size=2, max_prefill_tokens_per_step=8,
                            options=EchoOptions(**options))
        runner.limits = dataclasses.replace(runner.limits, decodes_row_subsets=False)
        return runner

    with pytest.raises(EngineError, match="short_first") as refused:
        Scheduler(whole_batch_runner(short_first=True))
    assert refused.value.kind == ErrorKind.MISCONFIGURED
    engine = BatchingEngine(whole_batch_runner())
    engine.add_request(request(engine, "a", "x ab", max_tokens=3))
    assert run(engine)[0] == {"a": "aba"}


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


class CachingRunner(EchoRunner):
    """The echo runner with a pretend prompt cache: a prompt starting with ``cached``
    gets that many tokens from it; claims and give-backs are recorded."""

    def __init__(self, cached: str, **limits):
        super().__init__(**limits)
        self.cached = tuple(self.text.encode(cached))
        self.claims: list[str] = []
        self.unclaims: list[str] = []

    def claim_cache(self, seq):
        self.claims.append(seq.request_id)
        if seq.prompt[:len(self.cached)] == self.cached:
            return min(len(self.cached), len(seq.prompt) - 1)
        return 0

    def unclaim_cache(self, seq):
        self.unclaims.append(seq.request_id)


def test_the_prefill_budget_counts_only_what_the_prompt_cache_does_not_supply():
    system = "s" * 30 + " "
    runner = CachingRunner(system, max_batch_size=4, max_prefill_tokens_per_step=16)
    engine = BatchingEngine(runner)
    plans = record_plans(engine)
    for rid in ("a", "b"):  # 34 tokens each, 31 of them cached: both fit a 16-token step
        engine.add_request(request(engine, rid, system + f"q {rid}", max_tokens=2))
    result = engine.step()
    assert [(w.seq.request_id, w.start, w.end) for w in plans[0].prefill] == \
        [("a", 31, 34), ("b", 31, 34)]
    assert result.num_prefill_tokens == 6
    assert {o.num_cached_prompt_tokens for o in result.outputs} == {31}
    assert runner.unclaims == []


def test_a_claim_is_given_back_when_its_sequence_must_wait_for_a_later_step():
    runner = CachingRunner("zzzz", max_batch_size=4, max_prefill_tokens_per_step=16)
    engine = BatchingEngine(runner)
    plans = record_plans(engine)
    engine.add_request(request(engine, "first", "x" * 10 + " a", max_tokens=2))
    engine.add_request(request(engine, "second", "y" * 10 + " b", max_tokens=2))
    engine.step()  # 12 + 12 tokens > 16: "second" waits, its claim given back
    assert plans[0].prefill[0].seq.request_id == "first" and len(plans[0].prefill) == 1
    assert runner.unclaims == ["second"]
    engine.step()
    assert runner.claims == ["first", "second", "second"]
    assert [w.seq.request_id for p in plans for w in p.prefill] == ["first", "second"]


def test_a_chunked_prompt_starts_after_its_cached_prefix_and_leaves_when_aborted():
    runner = CachingRunner("c" * 20, max_batch_size=4, max_prefill_tokens_per_step=8)
    engine = BatchingEngine(runner)
    plans = record_plans(engine)
    engine.add_request(request(engine, "long", "c" * 20 + "d" * 20 + " e", max_tokens=2))
    engine.step()  # 23 tokens to compute > 8: chosen for chunking, chunks start next step
    engine.step()
    engine.step()
    chunks = [(w.start, w.end) for plan in plans for w in plan.prefill]
    assert chunks == [(20, 28), (28, 36)]
    engine.abort("long")
    outputs = engine.step().outputs
    assert [o.finish_reason for o in outputs] == ["abort"]
    assert [s.request_id for s in plans[-1].leaving] == ["long"]  # the runner lets go
    assert not engine.has_unfinished_requests()


def test_finished_rows_leave_the_runner_in_the_step_they_finish():
    engine = make_engine()
    plans = record_plans(engine)
    engine.add_request(request(engine, "one", "x ab", max_tokens=1))  # done at its first token
    engine.add_request(request(engine, "two", "x cd", max_tokens=2))
    engine.step()
    kinds = [("leaving" if p.leaving else "prefill" if p.prefill else "decode",
              sorted(s.request_id for s in (*p.leaving, *(w.seq for w in p.prefill),
                                            *p.decode))) for p in plans]
    assert kinds == [("prefill", ["one", "two"]), ("leaving", ["one"]), ("decode", ["two"]),
                     ("leaving", ["two"])]
    assert not engine.has_unfinished_requests()
