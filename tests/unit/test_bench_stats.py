"""The benchmark's statistics: percentiles, per-request timings, run summaries, parsers."""

import math

import pytest

from bench.machine import disturbed, quieter
from bench.service import (
    parse_histogram_sums,
    pyspy_thread_names,
    server_means,
    summarize_pyspy,
)
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


def test_request_without_chunks_or_with_error_is_not_ok():
    assert not _record(0.0, [], 1.0, 0).ok
    assert not _record(0.0, [0.5], 1.0, 1, error="HTTP 503").ok
    assert _record(0.0, [0.5], 1.0, 1).tpot is None


def test_summarize_throughput_over_wall_time_and_latency_percentiles():
    records = [_record(0.0, [1.0, 2.0], 2.0, 10), _record(0.0, [0.5, 3.5], 4.0, 10),
               _record(0.0, [], 1.0, 0, error="boom")]
    summary = summarize(records, clients=2)
    assert summary.requests == 2 and summary.errors == 1
    assert summary.duration_s == pytest.approx(4.0)
    assert summary.tokens_per_s == pytest.approx(20 / 4.0)
    assert summary.requests_per_s == pytest.approx(0.5)
    assert summary.ttft_p50_s == pytest.approx(0.75)
    assert summary.e2e_p99_s == pytest.approx(2.0 + 0.99 * 2.0)
    assert summary.itl_p50_s == pytest.approx(2.0)  # gaps 1.0 and 3.0
    assert summary.completion_tokens == 20
    assert math.isnan(summary.prompt_cached_share)  # no usage reported prompt tokens


def test_summarize_reports_the_share_of_prompt_tokens_the_server_cached():
    records = [_record(0.0, [1.0], 2.0, 4), _record(0.0, [1.0], 2.0, 4),
               _record(0.0, [], 1.0, 0, error="boom")]
    for record, cached in zip(records, (0, 29, 30), strict=True):
        record.prompt_tokens, record.cached_prompt_tokens = 30, cached
    assert summarize(records, clients=2).prompt_cached_share == pytest.approx(29 / 60)


def test_summarize_with_no_successes_is_nan_not_an_error():
    summary = summarize([_record(0.0, [], 1.0, 0, error="x")], clients=1)
    assert summary.requests == 0 and math.isnan(summary.tokens_per_s)
    assert math.isnan(summary.ttft_p50_s)


def test_ratio_handles_missing_values():
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(None, 2.0))
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(math.nan, 1.0))


def test_quieter_keeps_the_less_disturbed_measurement():
    busy, calm = {"foreign_cores": 0.9, "x": 1}, {"foreign_cores": 0.1, "x": 2}
    assert quieter(None, busy) is busy
    assert quieter(busy, calm) is calm
    assert quieter(calm, busy) is calm
    assert disturbed(busy) and not disturbed(calm)


def test_histogram_sums_from_a_prometheus_exposition():
    text = "\n".join([
        "# HELP llm_time_to_first_token_seconds x",
        'llm_time_to_first_token_seconds_bucket{le="0.1",model="m"} 1.0',
        'llm_time_to_first_token_seconds_sum{model="m",slot="0"} 1.5',
        'llm_time_to_first_token_seconds_count{model="m",slot="0"} 3.0',
        'llm_time_to_first_token_seconds_sum{model="m",slot="1"} 0.5',
        'llm_time_to_first_token_seconds_count{model="m",slot="1"} 1.0',
        "llm_request_queue_time_seconds_sum 0.2",
        "llm_request_queue_time_seconds_count 2.0"])
    sums = parse_histogram_sums(text)
    assert sums["ttft"] == (2.0, 4.0)
    assert sums["queue"] == (0.2, 2.0)
    assert sums["itl"] == (0.0, 0.0)
    later = {**sums, "ttft": (5.0, 6.0)}
    means = server_means(sums, later)
    assert means["server_ttft_mean_s"] == pytest.approx(1.5)
    assert means["server_itl_mean_s"] is None


def test_pyspy_raw_profile_is_split_by_innermost_category():
    categories = (("matmul", "ggml_matmul", "low_bit_linear.py"),
                  ("forward", "_forward", "engine/ipex_llm.py"))
    raw = "\n".join([
        "thread (1);_run (engine_loop.py:1);_forward (deployments/engine/ipex_llm.py:9);"
        "ggml_matmul (ipex_llm/transformers/low_bit_linear.py:3) 6",
        "thread (1);_forward (deployments/engine/ipex_llm.py:9);silu (torch/nn.py:2) 3",
        "thread (2);run (asyncio/events.py:80) 1",
        "garbage line"])
    summary = summarize_pyspy(raw, categories)
    assert summary["samples"] == 10
    assert summary["by_category"] == {"matmul": 0.6, "forward": 0.3,
                                      "other": 0.1}
    assert summary["top_leaves"][0] == ("ggml_matmul (ipex_llm/transformers/low_bit_linear.py:3)",
                                        0.6)


def test_pyspy_summary_of_one_thread_and_thread_names():
    raw = "\n".join([
        "thread (7): llm-engine-loop;_run (deployments/engine_loop.py:1);"
        "IpexLLMEngine._forward (deployments/engine/ipex_llm.py:9) 3",
        "thread (8): AsyncIO Thread: default;Thread.run (threading.py:982) 5",
        "thread (9);native_frame (lib.so) 1"])
    categories = (("forward", "_forward", "deployments/engine/ipex_llm.py"),)
    summary = summarize_pyspy(raw, categories, thread="llm-engine-loop")
    assert summary["samples"] == 3
    assert summary["by_category"] == {"forward": 1.0}  # Class.method matches the method
    assert pyspy_thread_names(raw) == {7: "llm-engine-loop", 8: "AsyncIO Thread: default",
                                       9: "?"}


def test_head_to_head_alternates_who_goes_first():
    from bench.head_to_head import OURS, PEER, turn_order

    assert turn_order(3) == [(OURS, PEER), (PEER, OURS), (OURS, PEER)]


def _turn(ours: dict[int, float], peer: dict[int, float]) -> dict:
    return {"service": [{"clients": c, "tokens_per_s": t} for c, t in ours.items()],
            "llama_server": [{"clients": c, "tokens_per_s": t} for c, t in peer.items()]}


def test_head_to_head_judges_the_median_of_ratios_within_turns():
    from bench.report import _targets, head_to_head

    # Turn 2 ran on a slower machine: both sides drop, the within-turn ratio does not.
    turns = [_turn({8: 180, 16: 210}, {8: 200, 16: 200}),
             _turn({8: 150, 16: 160}, {8: 160, 16: 170}),
             _turn({8: 190, 16: 220}, {8: 180, 16: 200})]
    results = {"head_to_head": {"clients": [8, 16], "turns": turns},
               "llama": {"sweep": [{"clients": 8, "tokens_per_s": 150.0},
                                   {"clients": 16, "tokens_per_s": 150.0}]},
               "llama_cpp_service": {"http": [{"clients": 8, "tokens_per_s": 160.0},
                                              {"clients": 16, "tokens_per_s": 160.0}]}}
    h2h = head_to_head(results)
    assert h2h[8]["ratios"] == pytest.approx([0.9, 0.9375, 190 / 180])
    assert h2h[8]["median"] == pytest.approx(0.9375)
    assert h2h[16]["median"] == pytest.approx(1.05)
    lines, values = _targets(results)
    assert values["lc_http8_vs_llama"] == pytest.approx(0.9375)  # not 160 / 150
    assert values["lc_http16_vs_llama"] == pytest.approx(1.05)
    row8 = next(line for line in lines if "llama_cpp, 8 clients over HTTP vs llama" in line)
    row16 = next(line for line in lines if "llama_cpp, 16 clients over HTTP vs llama" in line)
    assert "not met" in row8 and "not met" not in row16
    assert head_to_head({"head_to_head": {"skipped": "llama-server not built"}}) == {}


def _load(import_s: float, load_s: float) -> dict:
    return {"import_s": import_s, "load_low_bit_s": load_s, "verify_s": 0.1}


def test_median_load_keeps_the_start_with_the_median_bare_path():
    from bench.coldstart import median_load

    runs = [_load(2.5, 1.4), _load(1.5, 1.3), {"failed": "exit status 1"}, _load(1.4, 1.2)]
    chosen = median_load(runs)
    assert (chosen["import_s"], chosen["load_low_bit_s"]) == (1.5, 1.3)
    assert chosen["bare_load_runs_s"] == pytest.approx([3.9, 2.8, 2.6])
    assert median_load([{"failed": "x"}, {"failed": "y"}]) == {"failed": "x"}


def test_ready_target_is_judged_on_median_starts_and_shows_every_start():
    from bench.report import _targets

    # One outlier start (6.6 s) among three: the median (5.1 s) is judged, all are shown.
    results = {"coldstart": {"load": {**_load(1.5, 1.3), "bare_load_runs_s": [2.8, 3.9, 2.6]}},
               "service": {"startup": {"serve_run_to_ready_s": 5.1,
                                       "serve_run_to_ready_runs_s": [6.6, 5.1, 5.0],
                                       "bare_actor_start_s": 0.2,
                                       "bare_actor_start_runs_s": [0.2, 0.3, 0.2]}}}
    lines, values = _targets(results)
    assert values["ready_ratio"] == pytest.approx(5.1 / 3.0)
    row = next(line for line in lines if "replica ready" in line)
    assert "6.6, 5.1, 5.0 s" in row and "2.8, 3.9, 2.6 s" in row
    assert "**met**" in row


def test_ipex_targets_are_judged_on_the_median_of_alternating_turns():
    from bench.report import _targets, ipex_turns

    def turn(service: float, ceiling: float, sequential: float) -> dict:
        return {"order": ["service", "inprocess"],
                "service": [{"clients": 8, "tokens_per_s": service}],
                "inprocess": {"ceiling": [{"batch_size": 8, "tokens_per_s": ceiling}],
                              "sequential": {"tokens_per_s": sequential}}}

    # Sections 1 and 3 ran on a slow and a fast minute: 70 / 80 = 0.875x. Within the turns
    # the service keeps 0.9-0.95x of the ceiling.
    results = {"inprocess": {"ceiling": [{"batch_size": 8, "tokens_per_s": 80.0}],
                             "sequential": {"tokens_per_s": 40.0}},
               "service": {"http": [{"clients": 8, "tokens_per_s": 70.0}],
                           "handle": [{"clients": 8, "tokens_per_s": 63.0}]},
               "ipex_turns": {"clients": 8, "turns": [turn(72, 80, 36), turn(57, 60, 30),
                                                      turn(76, 80, 40)]}}
    summary = ipex_turns(results)
    assert [t["vs_ceiling"] for t in summary["turns"]] == pytest.approx([0.9, 0.95, 0.95])
    assert summary["vs_ceiling"] == pytest.approx(0.95)
    assert summary["vs_sequential"] == pytest.approx(1.9)
    lines, values = _targets(results)
    assert values["http8_vs_ceiling"] == pytest.approx(0.95)  # not 70 / 80
    row = next(line for line in lines if "vs in-process batched generate" in line)
    assert "median of 3 alternating turns" in row and "**met**" in row
    # The handle (not in the turns): its ratio to HTTP in section 3 (0.9x) times the turns'.
    assert values["handle8_vs_ceiling"] == pytest.approx(0.9 * 0.95)
    assert ipex_turns({"ipex_turns": {"failed": "exit status 1"}}) == {}


def test_alternate_runs_both_measurements_in_turn_order():
    from bench.head_to_head import alternate

    ran: list[str] = []
    turns = alternate(3, {"ours": lambda: ran.append("ours") or len(ran),
                          "peer": lambda: ran.append("peer") or len(ran)}, lambda _: None)
    assert ran == ["ours", "peer", "peer", "ours", "ours", "peer"]
    assert [t["order"] for t in turns] == [["ours", "peer"], ["peer", "ours"], ["ours", "peer"]]
    assert turns[1] == {"order": ["peer", "ours"], "peer": 3, "ours": 4}


def test_mixed_load_lets_the_long_requests_running_at_the_end_finish():
    import asyncio
    import time

    from bench.loadgen import mixed

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
