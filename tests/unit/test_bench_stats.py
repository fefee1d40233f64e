"""The benchmark's arithmetic and rendering: statistics, the load generator's accounting,
alternating turns, the targets and the report's hand-written notes."""

import asyncio
import math
import time

import pytest

from bench.coldstart import median_load
from bench.loadgen import Level, Side, consume, interleave, mixed, prompt_of, turn_order
from bench.machine import disturbed, quieter
from bench.report import NOTES_END, NOTES_START, notes, render, targets, write_report
from bench.stats import RequestRecord, percentile, ratio, summarize


@pytest.mark.parametrize(("q", "expected"), [(0, 1.0), (50, 2.5), (100, 4.0), (25, 1.75),
                                             (99, 3.97)])
def test_percentile_interpolates_like_numpy_linear(q, expected):
    assert percentile([4.0, 1.0, 3.0, 2.0], q) == pytest.approx(expected)


def test_percentile_edge_cases():
    assert math.isnan(percentile([], 50))
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _record(start, chunks, end, tokens, error=None):
    return RequestRecord(started=start, chunk_times=list(chunks), finished=end,
                         completion_tokens=tokens, error=error)


def test_request_record_timings():
    record = _record(10.0, [10.5, 10.7, 11.0, 11.5], 11.6, 5)
    assert record.ok
    assert record.ttft == pytest.approx(0.5)
    assert record.e2e == pytest.approx(1.6)
    assert record.inter_chunk_gaps == pytest.approx([0.2, 0.3, 0.5])
    # 5 tokens in 4 chunks (one coalesced): TPOT spreads the time over the tokens
    assert record.tpot == pytest.approx((11.5 - 10.5) / 4)
    assert not _record(0.0, [], 1.0, 0).ok
    assert not _record(0.0, [0.5], 1.0, 1, error="HTTP 503").ok
    assert _record(0.0, [0.5], 1.0, 1).tpot is None


def test_summarize_is_a_level_over_wall_time_with_short_answers_counted():
    records = [_record(0.0, [1.0, 2.0], 2.0, 10), _record(0.0, [0.5, 3.5], 4.0, 6),
               _record(0.0, [], 1.0, 0, error="boom")]
    for record, cached in zip(records, (30, 0, 0), strict=True):
        record.prompt_tokens, record.cached_prompt_tokens = 30, cached
    level = Level(**summarize(records, clients=2, max_tokens=10))
    assert (level.requests, level.errors, level.first_error) == (2, 1, "boom")
    assert level.short_answers == 1  # 6 of 10 tokens: the server ignored ignore_eos
    assert level.duration_s == pytest.approx(4.0)
    assert level.tokens_per_s == pytest.approx(16 / 4.0)  # the tokens it did send
    assert level.ttft_p50_s == pytest.approx(0.75)
    assert level.e2e_p99_s == pytest.approx(2.0 + 0.99 * 2.0)
    assert level.itl_p99_s == pytest.approx(1.0 + 0.99 * 2.0)  # gaps 1.0 and 3.0
    assert level.prompt_cached_share == pytest.approx(30 / 60)
    assert Level.model_validate_json(level.model_dump_json()) == level


def test_summarize_with_no_successes_gives_none_not_nan():
    level = Level(**summarize([_record(0.0, [], 1.0, 0, error="x")], clients=1, max_tokens=4))
    assert level.requests == 0 and level.tokens_per_s is None and level.ttft_p50_s is None
    assert "NaN" not in level.model_dump_json()


def test_ratio_handles_missing_values():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(1.0, 0.0) is None
    assert ratio(math.nan, 1.0) is None


def _chunks(*chunks):
    async def gen():
        for chunk in chunks:
            yield chunk
    return gen()


def _consume(*chunks, max_tokens=8):
    return asyncio.run(consume(_chunks(*chunks), RequestRecord(started=time.perf_counter()),
                               max_tokens))


def test_consume_counts_the_tokens_the_server_reports():
    text = {"choices": [{"text": "a", "finish_reason": None}]}
    usage = {"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 30,
                                      "prompt_tokens_details": {"cached_tokens": 29}}}
    record = _consume(text, text, {"choices": [{"text": "", "finish_reason": "stop"}]}, usage)
    assert record.ok and len(record.chunk_times) == 2
    assert (record.completion_tokens, record.prompt_tokens, record.cached_prompt_tokens) \
        == (3, 30, 29)


def test_consume_without_usage_falls_back_to_finish_reason_or_chunks():
    text = {"choices": [{"text": "a"}]}
    assert _consume(text, {"choices": [{"text": "b", "finish_reason": "length"}]}
                    ).completion_tokens == 8
    assert _consume(text, text, {"choices": [{"text": "", "finish_reason": "stop"}]}
                    ).completion_tokens == 2
    failed = _consume(text, {"error": {"message": "engine died"}})
    assert not failed.ok and "engine died" in failed.error


def test_prompt_of_repeats_words_to_the_length_asked():
    assert len(prompt_of(100).split()) == 100
    assert prompt_of(None) == prompt_of(0) != prompt_of(5)


def test_quieter_keeps_the_less_disturbed_measurement():
    busy, calm = {"foreign_cores": 0.9, "x": 1}, {"foreign_cores": 0.1, "x": 2}
    assert quieter(None, busy) is busy
    assert quieter(busy, calm) is calm
    assert quieter(calm, busy) is calm
    assert disturbed(busy) and not disturbed(calm)


def test_interleave_alternates_and_judges_the_median_of_ratios_within_turns():
    assert turn_order(3, "a", "b") == [("a", "b"), ("b", "a"), ("a", "b")]
    # Turn 2 ran on a slower machine: both sides drop, the ratio within the turn does not.
    ours = iter([{"8": 180.0, "16": 210.0}, {"8": 150.0, "16": None}, {"8": 190.0, "16": 220.0}])
    peer = iter([{"8": 200.0, "16": 200.0}, {"8": 160.0, "16": 170.0}, {"8": 180.0, "16": 200.0}])
    ran: list[str] = []

    def side(name, values):
        return lambda: ran.append(name) or Side(tokens_per_s=next(values))

    result = interleave(3, ("ours", side("ours", ours)), ("peer", side("peer", peer)),
                        pairs=[("8", "8"), ("16", "16")])
    assert ran == ["ours", "peer", "peer", "ours", "ours", "peer"]
    assert [t.order for t in result.turns] == [["ours", "peer"], ["peer", "ours"],
                                               ["ours", "peer"]]
    at8, at16 = result.ratios
    assert at8.per_turn == pytest.approx([0.9, 0.9375, 190 / 180])
    assert at8.median == pytest.approx(0.9375)
    assert at16.per_turn[1] is None  # not measured: left out of the median
    assert at16.median == pytest.approx((1.05 + 1.1) / 2)


def test_mixed_load_lets_the_long_requests_running_at_the_end_finish():
    async def issue(max_tokens: int) -> RequestRecord:
        record = RequestRecord(started=time.perf_counter())
        await asyncio.sleep(max_tokens / 1000)
        record.chunk_times.append(time.perf_counter())
        record.completion_tokens = max_tokens
        record.finished = time.perf_counter()
        return record

    started = time.perf_counter()
    short, long = asyncio.run(mixed(issue, long_clients=2, long_tokens=900, short_clients=3,
                                    short_tokens=100, short_rounds=2, timeout_s=30))
    assert len(short) == 6 and all(r.ok for r in short)
    # The shorts end at ~0.7 s, inside each long client's first request: it runs to its end
    # (0.9 s) and no second one starts.
    assert len(long) == 2 and all(r.ok and r.e2e >= 0.9 for r in long)
    assert time.perf_counter() - started < 2.5


def _load(import_s: float, load_s: float) -> dict:
    return {"import_s": import_s, "dynamo_import_s": 0.0, "load_low_bit_s": load_s}


def test_median_load_keeps_the_start_with_the_median_bare_path():
    chosen = median_load([_load(2.5, 1.4), _load(1.5, 1.3), _load(1.4, 1.2)])
    assert (chosen["import_s"], chosen["load_low_bit_s"]) == (1.5, 1.3)
    assert chosen["bare_load_runs_s"] == pytest.approx([3.9, 2.8, 2.6])
    # an even count: the lower middle
    assert median_load([_load(2.5, 1.4), _load(1.4, 1.2)])["import_s"] == 1.4


# ---- the report -------------------------------------------------------------------------


def _levels(**tokens_per_s: float) -> dict:
    return {"run": {"levels": [{"clients": int(c), "tokens_per_s": t}
                               for c, t in tokens_per_s.items()]}}


def _turns(a: str, b: str, pairs: dict[tuple[str, str], list[float]]) -> dict:
    return {"a": a, "b": b, "turns": [], "ratios": [
        {"a_key": ka, "b_key": kb, "per_turn": per, "median": sorted(per)[len(per) // 2]}
        for (ka, kb), per in pairs.items()]}


def _row(rows, starts: str) -> tuple:
    return next(row for row in rows if row[0].startswith(starts))


def test_targets_prefer_the_alternating_turns_to_separate_sections():
    results = {"sections": {
        "service_llama_cpp": _levels(**{"8": 160.0, "16": 160.0}),
        "llama_server": _levels(**{"8": 150.0, "16": 150.0}),
        "turns_llama_cpp": _turns("service", "llama_server",
                                  {("8", "8"): [0.9, 0.95, 1.2], ("16", "16"): [1.0, 1.0]})}}
    rows = targets(results)
    row8 = _row(rows, "engine llama_cpp, 8 clients over HTTP vs llama-server")
    assert row8[1] == "alternating turns 0.90x, 0.95x, 1.20x: median 0.95x; separate " \
        "sections: 1.07x"
    assert row8[3] == "**not met**"  # 0.95x, though the separate sections say 1.07x
    # "> 1x" is strict: a median of exactly 1.00x does not meet it
    assert _row(rows, "engine llama_cpp, 16 clients")[3] == "**not met**"
    del results["sections"]["turns_llama_cpp"]
    row8 = _row(targets(results), "engine llama_cpp, 8 clients over HTTP vs llama-server")
    assert row8[1] == "160.0 / 150.0 tok/s = 1.07x" and row8[3] == "**met**"


def test_ready_target_is_serve_run_over_the_bare_path():
    results = {"sections": {
        "coldstart": {"load": _load(1.5, 1.3)},
        "service_ipex_llm": {"startup": {"serve_run_to_ready_s": 5.1, "bare_actor_start_s": 0.2,
                                         "serve_run_to_ready_runs_s": [6.6, 5.1, 5.0]}}}}
    row = _row(targets(results), "engine ipex_llm, replica ready")
    assert "6.6, 5.1, 5.0" in row[1] and row[1].endswith(f"= {5.1 / 3.0:.2f}x")
    assert row[3] == "**met**"
    assert _row(targets({"sections": {}}), "engine ipex_llm, replica ready")[3] \
        == "not measured"


def _results() -> dict:
    machine = {"cpu_model": "Test CPU", "logical_cpus": 2, "physical_cores": 2,
               "memory_gib": 8, "kernel": "6", "python": "3.11", "date": "2026-01-01 00:00 UTC",
               "git_commit": "abc1234", "versions": {"torch": "2"}}
    return {"command": "python -m bench.run --quick", "machine": machine,
            "workload": {"name": "quick", "max_tokens": 32, "clients": [1, 8],
                         "min_requests": 4, "mixed_clients": 2, "mixed_rounds": 3},
            "checkpoints": {"ipex_llm": "checkpoints/x"},
            "sections": {"engine_ipex_llm": {"failed": "RuntimeError: boom"},
                         "llama_server": {"skipped": "llama-server is not built"}}}


def test_report_renders_tables_and_says_why_a_section_is_missing():
    text = render(_results(), notes(""), plot=None)
    assert text.startswith("# Benchmarks (quick smoke run")
    assert "`python -m bench.run --quick`" in text and "commit abc1234" in text
    assert "_`engine_ipex_llm`: RuntimeError: boom._" in text
    assert "_`llama_server`: llama-server is not built._" in text
    assert "_`service_ipex_llm`: not run._" in text
    assert "_No plot" in text


def test_report_keeps_the_hand_written_notes_when_it_rewrites(tmp_path):
    write_report(_results(), tmp_path)
    first = (tmp_path / "RESULTS.md").read_text()
    assert NOTES_START in first and NOTES_END in first
    edited = first.replace("_None yet: add a dated note here by hand._",
                           "2026-01-02: the machine was busy.")
    (tmp_path / "RESULTS.md").write_text(edited.replace("Test CPU", "stale table"))
    results = _results()
    results["machine"]["git_commit"] = "def5678"
    write_report(results, tmp_path)
    second = (tmp_path / "RESULTS.md").read_text()
    assert "2026-01-02: the machine was busy." in second
    assert "stale table" not in second and "commit def5678" in second
    assert second.count(NOTES_START) == 1


def test_results_json_keeps_each_level_on_one_line():
    import json

    from bench.run import compact_json

    results = {"sections": {"x": {"run": {"levels": [{"clients": 1, "tokens_per_s": 1.5},
                                                     {"clients": 8, "tokens_per_s": None}]}}},
               "workload": {"clients": [1, 8]}}
    text = compact_json(results)
    assert json.loads(text) == results
    lines = [line.strip() for line in text.splitlines()]
    assert '{"clients": 8, "tokens_per_s": null}' in lines
    assert '"clients": [1, 8]' in lines and len(lines) == 15


def test_the_soak_measures_growth_from_when_the_prompt_cache_is_full():
    from bench.soak import summarize as soak_summary

    def point(requests: int, rss_mb: int, cache_mb: int) -> dict:
        return {"requests": requests, "object_store_bytes": None, "replica_rss_bytes":
                rss_mb * 2**20, "replica_fds": 70, "prompt_cache_bytes": cache_mb * 2**20,
                "prompt_cache_capacity_bytes": 100 * 2**20}

    # The cache fills until 3,000 requests (the replica grows with it), then holds.
    samples = [point(0, 500, 0), point(1000, 550, 50), point(2000, 580, 80),
               point(3000, 600, 99), point(4000, 606, 100), point(5000, 612, 100)]
    summary = soak_summary(samples, warmup=1000, roles=["replica"])
    assert summary["warmup_requests"] == 3000
    replica = summary["replica"]
    assert replica["rss_growth"] == pytest.approx(612 / 600 - 1, abs=1e-4)
    assert replica["rss_growth_beyond_prompt_cache"] == pytest.approx(512 / 501 - 1, abs=1e-4)
    # No prompt cache (engine llama_cpp): warm-up is the request count alone.
    for sample in samples:
        sample["prompt_cache_bytes"] = sample["prompt_cache_capacity_bytes"] = None
    assert soak_summary(samples, warmup=1000, roles=["replica"])["warmup_requests"] == 1000
