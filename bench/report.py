"""RESULTS.md and the plot, from the merged JSON of a run (bench/results.json).

Everything in the report, the analysis included, is computed from the measured numbers, so
a rerun on another machine rewrites it consistently. Missing sections (skipped, failed,
or not selected) show as such.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.coldstart import bare_load_s
from bench.machine import DISTURBED_CORES
from bench.stats import median, ratio

NA = "n/a"


def _num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    return f"{value:.{digits}f}"


def _x(value: Any) -> str:
    """A ratio as "1.23x"."""
    text = _num(value, 2)
    return text if text == NA else f"{text}x"


def _ms(seconds: Any) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return NA
    return f"{seconds * 1000:.0f}"


def _mib(value: Any) -> str:
    return NA if value is None else f"{value / 2**20:.0f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _ok(section: dict[str, Any] | None) -> bool:
    return bool(section) and "failed" not in section and "skipped" not in section


def _section(r: dict[str, Any], key: str, title: str
             ) -> tuple[dict[str, Any] | None, list[str]]:
    """Section ``key``'s results and the report's first lines for it: its title, and why
    it is missing when it did not run (the results are then None)."""
    section = r.get(key)
    if not _ok(section):
        return None, [title, "", *_why_missing(section, key)]
    return section, [title, ""]


def _why_missing(section: dict[str, Any] | None, name: str) -> list[str]:
    if section is None:
        return [f"_Section `{name}` was not run._", ""]
    reason = section.get("failed") or section.get("skipped")
    return [f"_Section `{name}`: {reason}._", ""]


def _by(rows: list[dict[str, Any]] | None, key: str, value: Any) -> dict[str, Any] | None:
    return next((r for r in rows or () if r.get(key) == value), None)


def _verdict(value: float | None, target: float, higher_is_better: bool = True,
             strict: bool = False) -> str:
    """Met or not (``strict``: the goal is ">" or "<", not ">=" or "<=")."""
    if value is None or math.isnan(value):
        return "not measured"
    if higher_is_better:
        met = value > target if strict else value >= target
    else:
        met = value < target if strict else value <= target
    return "**met**" if met else "**not met**"


def _lc_section(r: dict[str, Any], name: str) -> dict[str, Any]:
    """A llama_cpp section's results ({} if it did not run, failed or was skipped)."""
    section = r.get(name)
    return section if _ok(section) else {}


def head_to_head(r: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Section head_to_head by client count: each turn's (service, llama-server) tok/s, the
    ratio within each turn, and the median of those ratios ({} if the section did not run)."""
    section = r.get("head_to_head")
    if not _ok(section):
        return {}
    result = {}
    for clients in section.get("clients") or []:
        pairs = [(_tps(turn, clients, "service"), _tps(turn, clients, "llama_server"))
                 for turn in section.get("turns") or []]
        ratios = [ratio(ours, peer) for ours, peer in pairs]
        result[clients] = {"pairs": pairs, "ratios": ratios, "median": _median_ratio(ratios)}
    return result


def _median_ratio(ratios: Iterable[float]) -> float:
    """The median of the turns' ratios that were measured (nan when none was)."""
    measured = [x for x in ratios if not math.isnan(x)]
    return median(measured) if measured else math.nan


def ipex_turns(r: dict[str, Any]) -> dict[str, Any]:
    """Section ipex_turns: each turn's service tok/s at 8 clients, ceiling at batch 8 and
    one-at-a-time tok/s, the ratios within each turn and their medians ({} if the section
    did not run)."""
    section = r.get("ipex_turns")
    if not _ok(section):
        return {}
    clients = section.get("clients", 8)
    rows = []
    for turn in section.get("turns") or []:
        inproc = turn.get("inprocess") or {}
        service = _tps(turn, clients, "service")
        ceiling = (_by(inproc.get("ceiling"), "batch_size", clients) or {}).get("tokens_per_s")
        sequential = (inproc.get("sequential") or {}).get("tokens_per_s")
        rows.append({"order": turn.get("order") or [], "service": service, "ceiling": ceiling,
                     "sequential": sequential, "vs_ceiling": ratio(service, ceiling),
                     "vs_sequential": ratio(service, sequential)})
    return {"clients": clients, "turns": rows,
            "vs_ceiling": _median_ratio(row["vs_ceiling"] for row in rows),
            "vs_sequential": _median_ratio(row["vs_sequential"] for row in rows)}


# ---- sections ---------------------------------------------------------------------------


def _header(r: dict[str, Any]) -> list[str]:
    m = r["machine"]
    w = r["workload"]
    prompt_tokens = (r.get("inprocess") or {}).get("prompt_tokens", "≈30")
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    quick = " (quick smoke run: reduced levels and lengths, not for comparison)" \
        if w["name"] == "quick" else ""
    return [
        f"# Benchmarks{quick}", "",
        f"Produced by `{r['command']}` (what `make bench` runs), from the repository root.", "",
        f"- Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs "
        f"({m['physical_cores']} cores), {m['memory_gib']} GiB, no GPU; kernel {m['kernel']}",
        f"- Date: {m['date']} to {r.get('finished', '?')}, {r.get('total_seconds', 0) / 60:.1f}"
        f" min; commit {m['git_commit']}",
        f"- Stack: Python {m['python']}, {versions}",
        f"- Model: SmolLM2-135M-Instruct. Engine ipex_llm (the default; sections 1-3) runs "
        f"the ipex-llm sym_int4 checkpoint `{r['checkpoint']}`; "
        + (f"engine llama_cpp (sections 4-5) the gguf checkpoint `{r['gguf_checkpoint']}` "
           "(the source GGUF, Q4_1, as is); llama.cpp's own server (section 6) reads the "
           "same GGUF" if r.get("gguf_checkpoint") else
           "llama.cpp's own server (section 6) reads the source GGUF (Q4_1) of the same "
           "model"),
        f"- Workload: one fixed prompt of {prompt_tokens} tokens; every answer runs to exactly "
        f"{w['max_tokens']} tokens (greedy; `min_new_tokens` in-process, `ignore_eos` + "
        f"`max_tokens` over the API), so all paths do the same work",
        *(["- Environment overrides (a what-if run): "
           + ", ".join(f"`{k}={v}`" for k, v in r["env"].items())] if r.get("env") else []),
        "- `other load` columns: CPU cores used by processes outside this benchmark during "
        f"the measurement (the machine is shared). At {DISTURBED_CORES} or more a measurement "
        "is repeated once and the quieter attempt kept; a row still at that level is "
        "depressed and not comparable with a quiet run. Even on a quiet machine, repeated "
        "runs of one configuration differed by up to ~10% here: read ratios within 0.1 of a "
        "target as a tie.", ""]


def _targets(r: dict[str, Any]) -> tuple[list[str], dict[str, float]]:
    inproc = r.get("inprocess") or {}
    service = r.get("service") or {}
    ceiling8 = (_by(inproc.get("ceiling"), "batch_size", 8) or {}).get("tokens_per_s")
    seq = (inproc.get("sequential") or {}).get("tokens_per_s")
    http8 = (_by(service.get("http"), "clients", 8) or {}).get("tokens_per_s")
    handle8 = (_by(service.get("handle"), "clients", 8) or {}).get("tokens_per_s")
    llama = (r.get("llama") or {}).get("sweep")
    llama8 = (_by(llama, "clients", 8) or {}).get("tokens_per_s")
    llama16 = (_by(llama, "clients", 16) or {}).get("tokens_per_s")
    http16 = (_by(service.get("http"), "clients", 16) or {}).get("tokens_per_s")
    ready = _ready(r)
    mixed = (service.get("mixed") or {}).get("short_p50_ratio", math.nan)
    lc_engine = _lc_section(r, "llama_cpp_engine")
    lc_service = _lc_section(r, "llama_cpp_service")
    lc_http8 = _tps(lc_service, 8, "http")
    lc_http16 = _tps(lc_service, 16, "http")
    lc_alone8 = (_by(lc_engine.get("engine"), "batch_size", 8) or {}).get("tokens_per_s")
    lc_mixed = (lc_service.get("mixed") or {}).get("short_p50_ratio")
    h2h = head_to_head(r)
    v = {"http8_vs_ceiling": ratio(http8, ceiling8), "handle8_vs_ceiling": ratio(handle8, ceiling8),
         "http8_vs_seq": ratio(http8, seq), "http8_vs_llama": ratio(http8, llama8),
         "http16_vs_llama": ratio(http16, llama16), "ready_ratio": ready["ratio"],
         "mixed": mixed, "lc_http8_vs_llama": ratio(lc_http8, llama8),
         "lc_http16_vs_llama": ratio(lc_http16, llama16),
         "lc_http8_vs_alone": ratio(lc_http8, lc_alone8),
         "lc_mixed": math.nan if lc_mixed is None else lc_mixed}
    for clients in (8, 16):  # judged on the alternating turns when section head_to_head ran
        if clients in h2h:
            v[f"lc_http{clients}_vs_llama"] = h2h[clients]["median"]
    turns = ipex_turns(r)
    measured_vs = {"http8_vs_ceiling": f"{_num(http8)} / {_num(ceiling8)} tok/s = "
                                       f"{_x(v['http8_vs_ceiling'])}",
                   "http8_vs_seq": f"{_num(http8)} / {_num(seq)} tok/s = "
                                   f"{_x(v['http8_vs_seq'])}",
                   "handle8_vs_ceiling": f"{_num(handle8)} / {_num(ceiling8)} tok/s = "
                                         f"{_x(v['handle8_vs_ceiling'])}"}
    if turns and not math.isnan(turns["vs_ceiling"]):
        # The turns measure HTTP only: the handle is scaled by its ratio to HTTP in section
        # 3 (same minutes), not judged on section 1's ceiling from minutes before.
        handle_vs_http = ratio(handle8, http8)
        measured_vs["handle8_vs_ceiling"] = (
            f"handle / HTTP in section 3 ({_x(handle_vs_http)}) x the turns' HTTP / ceiling "
            f"({_x(turns['vs_ceiling'])}) = {_x(handle_vs_http * turns['vs_ceiling'])}; "
            f"vs section 1: {_x(v['handle8_vs_ceiling'])}")
        v["handle8_vs_ceiling"] = handle_vs_http * turns["vs_ceiling"]
    for key, turn_key in (("http8_vs_ceiling", "vs_ceiling"), ("http8_vs_seq", "vs_sequential")):
        if turns and not math.isnan(turns[turn_key]):  # judged on the turns when they ran
            measured_vs[key] = (
                f"median of {len(turns['turns'])} alternating turns ("
                f"{', '.join(_x(t[turn_key]) for t in turns['turns'])}) = "
                f"{_x(turns[turn_key])}; sections 1-3: {_x(v[key])}")
            v[key] = turns[turn_key]
    rows = [
        ("engine ipex_llm, 8 clients over HTTP vs in-process batched generate at batch 8",
         measured_vs["http8_vs_ceiling"], ">= 0.9x", _verdict(v["http8_vs_ceiling"], 0.9)),
        ("engine ipex_llm, 8 clients through the handle vs the same ceiling",
         measured_vs["handle8_vs_ceiling"], ">= 0.9x", _verdict(v["handle8_vs_ceiling"], 0.9)),
        ("engine ipex_llm, 8 clients over HTTP vs one request at a time (seed's path)",
         measured_vs["http8_vs_seq"], ">= 1.9x", _verdict(v["http8_vs_seq"], 1.9)),
        ("engine ipex_llm, 8 clients over HTTP vs llama.cpp's server (-np 8)",
         f"{_num(http8)} / {_num(llama8)} tok/s = {_x(v['http8_vs_llama'])}",
         "report", "see analysis"),
        ("engine ipex_llm, 16 clients over HTTP vs llama.cpp's server (-np 8)",
         f"{_num(http16)} / {_num(llama16)} tok/s = {_x(v['http16_vs_llama'])}",
         "report", "see analysis"),
        ("engine ipex_llm, replica ready (serve.run) vs 2 x (bare import + load_low_bit + "
         "Ray actor start)",
         f"{_num(ready['serve_run'])} s vs 2 x {_num(ready['bare'])} s = "
         f"{_x(ready['ratio'])} of the bare path{ready['runs']}", "< 2x",
         _verdict(ready["ratio"], 2.0, higher_is_better=False)),
        ("engine ipex_llm, short requests' p50 latency next to long ones vs alone",
         f"{_x(mixed)}", "<= 1.5x", _verdict(mixed, 1.5, higher_is_better=False)),
        *(_vs_llama_row(v, h2h, clients, ours, peer)
          for clients, ours, peer in ((8, lc_http8, llama8), (16, lc_http16, llama16))),
        ("engine llama_cpp, 8 clients over HTTP vs its engine alone at batch 8",
         f"{_num(lc_http8)} / {_num(lc_alone8)} tok/s = {_x(v['lc_http8_vs_alone'])}",
         ">= 0.9x", _verdict(v["lc_http8_vs_alone"], 0.9)),
        ("engine llama_cpp, short requests' p50 latency next to long ones vs alone",
         f"{_x(v['lc_mixed'])}", "<= 1.5x",
         _verdict(v["lc_mixed"], 1.5, higher_is_better=False)),
    ]
    lines = ["## Targets", "", *_table(("target", "measured", "goal", "verdict"), rows)]
    return lines, v


def _vs_llama_row(v: dict[str, float], h2h: dict[int, dict[str, Any]], clients: int,
                  ours: float | None, peer: float | None) -> tuple[str, str, str, str]:
    """The target row of engine llama_cpp's service vs llama-server at ``clients``: its
    value in ``v`` is the alternating turns' median ratio when section head_to_head ran,
    else sections 5 and 6's (run minutes apart)."""
    key = f"lc_http{clients}_vs_llama"
    if clients in h2h:
        measured = (f"median of {len(h2h[clients]['ratios'])} alternating turns "
                    f"({', '.join(_x(x) for x in h2h[clients]['ratios'])}) = {_x(v[key])}; "
                    f"sections 5 / 6: {_x(ratio(ours, peer))}")
    else:
        measured = f"{_num(ours)} / {_num(peer)} tok/s = {_x(v[key])}"
    return (f"engine llama_cpp, {clients} clients over HTTP vs llama.cpp's server (-np 8)",
            measured, "> 1x", _verdict(v[key], 1.0, strict=True))


def _ready(r: dict[str, Any]) -> dict[str, Any]:
    """Replica start-up vs the bare path (medians when several starts were timed), and
    each start's figures as text (empty after a single start)."""
    load = (r.get("coldstart") or {}).get("load") or {}
    startup = (r.get("service") or {}).get("startup") or {}
    serve_run = startup.get("serve_run_to_ready_s", math.nan)
    if "import_s" in load and "bare_actor_start_s" in startup:
        bare = bare_load_s(load) + startup["bare_actor_start_s"]
    else:
        bare = math.nan
    starts = startup.get("serve_run_to_ready_runs_s") or []
    bare_loads = load.get("bare_load_runs_s") or []
    actors = startup.get("bare_actor_start_runs_s") or []
    runs = ""
    if len(starts) > 1 or len(bare_loads) > 1:
        runs = (f" (medians: serve.run to ready {', '.join(_num(x) for x in starts)} s; "
                f"imports + load_low_bit {', '.join(_num(x) for x in bare_loads)} s; actor "
                f"start {', '.join(_num(x, 2) for x in actors)} s)")
    return {"serve_run": serve_run, "bare": bare, "runs": runs,
            "ratio": ratio(serve_run, 2 * bare) * 2 if not math.isnan(bare) else math.nan}


def _inprocess(r: dict[str, Any]) -> list[str]:
    inproc, lines = _section(
        r, "inprocess", "## 1. In-process ceiling: ipex-llm batched `generate`")
    if inproc is None:
        return lines
    lines += ["`model.generate` on a left-padded batch of the prompt, greedy, "
              "`min_new_tokens = max_new_tokens`; tokens/s over the whole call (prefill "
              f"included), median of {r['workload']['ceiling_repeats']} runs after a warm-up. "
              f"Command: `{r['command']}` (section `inprocess`).", ""]
    lines += _table(("batch", "tokens/s", "runs", "other load (cores)"), [
        (row["batch_size"], _num(row["tokens_per_s"]),
         ", ".join(_num(x) for x in row["runs_tokens_per_s"]), _num(row["foreign_cores"], 2))
        for row in inproc["ceiling"]])
    seq = inproc["sequential"]
    lines += ["## 2. The seed's way: one request at a time in-process", "",
              "LangChain `IpexLLM._call` per request (tokenizer, `model.generate`, decode), "
              f"{seq['requests']} requests back to back.", ""]
    lines += _table(("requests", "tokens/s", "requests/s", "e2e p50 (ms)", "other load"), [
        (seq["requests"], _num(seq["tokens_per_s"]), _num(seq["requests_per_s"], 2),
         _ms(seq["e2e_p50_s"]), _num(seq["foreign_cores"], 2))])
    lines += ["### Our engine alone (no Ray, no HTTP)", "",
              "`IpexLLMEngine.step()` in a loop, all requests added at once: the "
              "continuous-batching engine's own cost. Shares are of the wall time.", ""]
    lines += _table(("batch", "tokens/s", "step (ms)", "model forward",
                     "low-bit matmuls (in forward)", "sampling", "detokenize", "other load"), [
        (row["batch_size"], _num(row["tokens_per_s"]), _num(row["step_ms"]),
         _pct(row.get("model_forward_share")), _pct(row.get("lowbit_linear_share")),
         _pct(row.get("sample_share")), _pct(row.get("detokenize_share")),
         _num(row["foreign_cores"], 2))
        for row in inproc["engine"]])
    return lines


def _pct(value: Any) -> str:
    return NA if value is None or value != value else f"{value:.1%}"  # None or NaN


def _cached_share(section: dict[str, Any] | None, clients: int) -> float:
    """The share of prompt tokens the server's prompt cache held at ``clients`` (0 if
    unknown)."""
    for row in (section or {}).get("sweep") or ():
        if row["clients"] == clients:
            share = row.get("prompt_cached_share")
            return share if share is not None and share == share else 0.0
    return 0.0


def _sweep_table(rows: list[dict[str, Any]], with_batch: bool) -> list[str]:
    header = ["clients", "tokens/s", "req/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
              "TPOT p50", "e2e p50", "e2e p99", "prompt from cache", "requests (errors)"]
    if with_batch:
        header += ["TTFT mean: client / replica", "queue mean (replica)", "mean engine batch"]
    header.append("other load")
    body = []
    for row in rows:
        cells = [row["clients"], _num(row["tokens_per_s"]), _num(row["requests_per_s"], 2),
                 _ms(row["ttft_p50_s"]), _ms(row["ttft_p99_s"]), _ms(row["itl_p50_s"]),
                 _ms(row["itl_p99_s"]), _ms(row["tpot_p50_s"]), _ms(row["e2e_p50_s"]),
                 _ms(row["e2e_p99_s"]), _pct(row.get("prompt_cached_share")),
                 f"{row['requests']} ({row['errors']})"]
        if with_batch:
            cells += [f"{_ms(row.get('ttft_mean_s'))} / {_ms(row.get('server_ttft_mean_s'))}",
                      _ms(row.get("server_queue_mean_s")), _num(row.get("mean_engine_batch"), 1)]
        cells.append(_num(row["foreign_cores"], 2))
        body.append(cells)
    return _table(header, body)


def _tuning(section: dict[str, Any]) -> str:
    tuning = section.get("startup", {}).get("ray_tuning") or {}
    return ", ".join(f"{k}={v}" for k, v in tuning.items()) or "none recorded"


def _service(r: dict[str, Any]) -> list[str]:
    service, lines = _section(
        r, "service",
        "## 3. Our service (engine ipex_llm): closed-loop clients over HTTP and through "
        "the handle")
    if service is None:
        return lines
    w = r["workload"]
    lines += [f"`serve_config.yaml`'s application (one LLMServer replica, max_batch_size "
              f"{service['config_args'].get('max_batch_size')}, max_ongoing_requests "
              f"{service['server_options'].get('max_ongoing_requests')}) on a fresh local "
              "Ray. Each client sends its next streamed request when the previous one ends; "
              f"each level runs ceil({w['min_requests']} / clients) rounds after a warm-up. "
              "Ray runs with the shipped settings of `cluster/ray_tuning.env` "
              f"({_tuning(service)}), as `make serve` starts it. "
              "Times in ms, measured by the client: TTFT to the first text chunk, ITL between "
              "text chunks (the replica paces its chunks: a budget of "
              f"{service['startup'].get('max_stream_chunks_per_s')} chunks/s shared by "
              "every answer it streams, so under load a chunk carries several tokens), TPOT "
              "= (last chunk - first chunk) / (tokens - 1). tokens/s and req/s over the "
              "level's wall time. The replica's own means (from its Prometheus histograms: "
              "arrival at the replica to the step that made the first token, and to the step that "
              "prefilled it) show how much of TTFT is transport vs engine. "
              f"Command: `{r['command']}` (section `service`).", "",
              "### Over HTTP (`POST /v1/completions`, SSE)", ""]
    lines += _sweep_table(service.get("http", []), with_batch=True)
    lines += ["### Through the handle (`LLMRouter.completions_stream`, as the LangChain "
              "adapter calls it)", ""]
    lines += _sweep_table(service.get("handle", []), with_batch=True)
    return lines


def _llama_cpp_engine(r: dict[str, Any]) -> list[str]:
    section, lines = _section(
        r, "llama_cpp_engine", "## 4. Engine llama_cpp alone (no Ray, no HTTP)")
    if section is None:
        return lines
    ipex = {row["batch_size"]: row for row in (r.get("inprocess") or {}).get("engine") or ()}
    lines += ["`LlamaCppEngine.step()` in a loop on the gguf checkpoint, all requests added at "
              f"once, {section.get('threads', '?')} llama.cpp threads, "
              f"{section.get('context_tokens_per_slot', '?')} KV cells per slot (loaded in "
              f"{_num(section.get('load_s'), 1)} s): engine llama_cpp's in-process ceiling, "
              "the same continuous-batching engine as section 1's engine alone with "
              "llama.cpp under it. Model forward is `_run` (filling the batch, one "
              "`llama_decode`); shares are of the wall time. Last column: tokens/s over "
              f"engine ipex_llm alone at the same batch. Command: `{r['command']}` (section "
              "`llama_cpp_engine`).", ""]
    lines += _table(("batch", "tokens/s", "step (ms)", "model forward (llama_decode)",
                     "sampling", "detokenize", "other load", "x engine ipex_llm"), [
        (row["batch_size"], _num(row["tokens_per_s"]), _num(row["step_ms"]),
         _pct(row.get("model_forward_share")), _pct(row.get("sample_share")),
         _pct(row.get("detokenize_share")), _num(row.get("foreign_cores"), 2),
         _x(ratio(row["tokens_per_s"], (ipex.get(row["batch_size"]) or {}).get("tokens_per_s"))))
        for row in section.get("engine") or ()])
    return lines


def _llama_cpp_service(r: dict[str, Any]) -> list[str]:
    service, lines = _section(
        r, "llama_cpp_service",
        "## 5. Our service on engine llama_cpp: closed-loop clients over HTTP and "
        "through the handle")
    if service is None:
        return lines
    startup = service.get("startup") or {}
    lines += [f"`{service.get('config_file', 'serve_config.llama_cpp.yaml')}`'s application "
              "(engine llama_cpp on the gguf checkpoint; one LLMServer replica, "
              f"max_batch_size {service['config_args'].get('max_batch_size')}, "
              f"max_ongoing_requests {service['server_options'].get('max_ongoing_requests')}"
              "), measured exactly as section 3: same clients, prompt, lengths and columns. "
              f"`serve.run` to ready: {_num(startup.get('serve_run_to_ready_s'), 1)} s (the "
              f"LLMServer constructor {_num(startup.get('replica_constructor_s'), 1)} s); "
              f"replica peak RSS {_mib(startup.get('replica_vm_hwm_ready_bytes'))} MiB when "
              f"ready, {_mib(startup.get('replica_vm_hwm_end_bytes'))} MiB after every run. "
              f"Command: `{r['command']}` (section `llama_cpp_service`).", "",
              "### Over HTTP (`POST /v1/completions`, SSE)", ""]
    lines += _sweep_table(service.get("http", []), with_batch=True)
    lines += ["### Through the handle", ""]
    lines += _sweep_table(service.get("handle", []), with_batch=True)
    lines += ["### Mixed workload" + (" (short-first decoding on: long rows decode every "
                                      "other step while short ones run)"
                                      if _short_first(service) else ""), ""]
    lines += _mixed_table(service.get("mixed"), r["workload"])
    lines += _pyspy_lines(service.get("pyspy"), "engine llama_cpp")
    http8 = _by(service.get("http"), "clients", 8)
    if http8 and http8.get("cpu_cores_by_process"):
        lines += ["CPU cores used per process during the 8-client HTTP run: " +
                  ", ".join(f"{k.replace('ray::', '')} {v:.2f}"
                            for k, v in http8["cpu_cores_by_process"].items()), ""]
    lines += _pacing_lines(service)
    return lines


def _serving_cores(row: dict[str, Any]) -> float:
    """Cores of everything but the model replica (Ray, proxy, router, client)."""
    return sum(c for k, c in (row.get("cpu_cores_by_process") or {}).items()
               if "LLMServer" not in k)


def _pacing_lines(service: dict[str, Any]) -> list[str]:
    per_token = service.get("per_token_chunks")
    if not per_token:
        return []
    lines = ["### What chunk pacing buys", "",
             "The same HTTP levels again on a replica redeployed with "
             "`max_stream_chunks_per_s: null` (a chunk per engine step, as before pacing), "
             "against the paced rows above (the shipped "
             f"{service.get('startup', {}).get('max_stream_chunks_per_s')} chunks/s).", "",
             "| clients | tokens/s paced | tokens/s per-token | paced / per-token | TPOT p50 "
             "paced (ms) | TPOT p50 per-token (ms) | serving cores paced | serving cores "
             "per-token |", "|---|---|---|---|---|---|---|---|"]
    for row in per_token:
        paced = _by(service.get("http"), "clients", row["clients"])
        if not paced:
            continue
        lines.append(
            f"| {row['clients']} | {_num(paced['tokens_per_s'])} | {_num(row['tokens_per_s'])}"
            f" | {_x(ratio(paced['tokens_per_s'], row['tokens_per_s']))} | "
            f"{_ms(paced.get('tpot_p50_s'))} | {_ms(row.get('tpot_p50_s'))} | "
            f"{_serving_cores(paced):.2f} | {_serving_cores(row):.2f} |")
    return [*lines, ""]


def _ipex_turns(r: dict[str, Any]) -> list[str]:
    section, lines = _section(
        r, "ipex_turns",
        "## 3b. Engine ipex_llm: its service and the in-process paths in alternating "
        "turns")
    if section is None:
        return lines
    turns = ipex_turns(r)
    lines += ["Sections 1-3 run minutes apart while this machine's speed drifts by 10-20%. "
              f"Here the service ({turns['clients']} clients over HTTP, a fresh Ray and "
              "replica each turn) and the in-process paths (a fresh process, no Ray running: "
              f"batched generate at batch {turns['clients']} and one request at a time, "
              "measured as in sections 1 and 2) take turns; the ratios are taken within each "
              "turn and the targets are judged on their medians. Command: "
              f"`{r['command']}` (section `ipex_turns`).", ""]
    lines += _table(
        ("turn", "order", "service tok/s", "ceiling tok/s", "one-at-a-time tok/s",
         "service / ceiling", "service / one-at-a-time"),
        [(str(number), " then ".join(t["order"]), _num(t["service"]), _num(t["ceiling"]),
          _num(t["sequential"]), _x(t["vs_ceiling"]), _x(t["vs_sequential"]))
         for number, t in enumerate(turns["turns"], 1)])
    lines += [f"Median ratios: {_x(turns['vs_ceiling'])} of the ceiling, "
              f"{_x(turns['vs_sequential'])} of one-at-a-time.", ""]
    return lines


def _head_to_head(r: dict[str, Any]) -> list[str]:
    section, lines = _section(
        r, "head_to_head",
        "## 7. Head to head: engine llama_cpp's service and llama-server in alternating "
        "turns")
    if section is None:
        return lines
    lines += ["This machine's speed drifts by 10-20% over minutes, more than the gap the "
              "target judges, and sections 5 and 6 run minutes apart. Here the two take "
              "turns (ours first, then llama-server first, ...), each starting afresh with "
              "the other stopped, on the same clients, prompt and lengths; the ratio is taken "
              "within each turn and the target is judged on their median. Command: "
              f"`{r['command']}` (section `head_to_head`).", ""]
    rows = []
    for number, turn in enumerate(section.get("turns") or [], 1):
        for clients in section.get("clients") or []:
            ours = _by(turn.get("service"), "clients", clients) or {}
            peer = _by(turn.get("llama_server"), "clients", clients) or {}
            rows.append((str(number), " then ".join(turn.get("order") or []), str(clients),
                         _num(ours.get("tokens_per_s")), _num(peer.get("tokens_per_s")),
                         _x(ratio(ours.get("tokens_per_s"), peer.get("tokens_per_s"))),
                         f"{_ms(ours.get('ttft_p50_s'))} / {_ms(peer.get('ttft_p50_s'))}",
                         f"{_ms(ours.get('tpot_p50_s'))} / {_ms(peer.get('tpot_p50_s'))}"))
    lines += _table(("turn", "order", "clients", "service tok/s", "llama-server tok/s",
                     "ratio", "TTFT p50 ms (ours / theirs)", "TPOT p50 ms (ours / theirs)"),
                    rows)
    h2h = head_to_head(r)
    lines += ["Median ratio: " + ", ".join(f"{_x(h2h[c]['median'])} at {c} clients"
                                           for c in sorted(h2h)) + ".", ""]
    return lines


def _llama(r: dict[str, Any]) -> list[str]:
    llama = r.get("llama")
    lines = ["## 6. Peer: llama.cpp's `llama-server` on the same GGUF", ""]
    if not _ok(llama):
        return lines + _why_missing(llama, "llama") + [
            "Build it once with `python -m bench.build_llama_server` (about 20 minutes on 2 "
            "cores, under `nice -n 19`), then rerun.", ""]
    command = llama["command"].replace(str(Path(__file__).resolve().parent.parent) + "/", "")
    lines += [f"Server: `{command}` (llama.cpp vendored in llama-cpp-python 0.3.36, built by "
              "`python -m bench.build_llama_server`). Same clients, prompt and lengths as "
              "section 3 (`cache_prompt` at its default, on, as engine llama_cpp's "
              "`prompt_cache`). Ready in "
              f"{_num(llama.get('ready_s'), 1)} s from the GGUF; peak RSS "
              f"{_mib(llama.get('vm_hwm_bytes'))} MiB.", ""]
    return lines + _sweep_table(llama["sweep"], with_batch=False)


def _starts_note(runs: list[float] | None, what: str = "median") -> str:
    """" (median of 3 starts: 5.10, 5.20, 6.60 s)" when several starts were timed, else
    ""."""
    if not runs or len(runs) < 2:
        return ""
    return f" ({what} of {len(runs)} starts: {', '.join(_num(x, 2) for x in runs)} s)"


def _coldstart(r: dict[str, Any]) -> list[str]:
    cold = r.get("coldstart") or {}
    load, convert = cold.get("load"), cold.get("convert")
    startup = (r.get("service") or {}).get("startup") or {}
    lines = ["## 8. Cold start and memory", "",
             "Each measured in a fresh process (imports count, as in a replica): "
             "`IpexLLMEngine.load` split into its parts, and "
             "`deployments.convert.convert_checkpoint` from the GGUF (what a replica that "
             "converts at start-up would pay). `serve.run` is timed in the service section "
             "from the call to the application being ready (both deployments), on a Ray "
             "already started; the bare Ray actor is a trivial actor created and answering "
             "on the same cluster. Start-up is timed several times where noted (the "
             "application deleted and deployed again, the load in a new process each "
             "time): the table gives the median and the note every start.", ""]
    rows = []
    if _ok(load):
        rows += [("import torch + transformers + ipex_llm", _num(load["import_s"], 2)),
                 ("verify checkpoint (sha256 of every file)", _num(load["verify_s"], 2))]
        if "dynamo_import_s" in load:
            rows += [("import torch._dynamo (bare `load_low_bit` does, at its first meta "
                      "`torch.cat`; `IpexLLMEngine.load` does not)",
                      _num(load["dynamo_import_s"], 2))]
        rows += [("`load_low_bit` (bare)" + _starts_note(
                     load.get("bare_load_runs_s"),
                     "this row and those above: the start with the median imports + "
                     "load_low_bit"), _num(load["load_low_bit_s"], 2)),
                 ("tokenizer", _num(load["tokenizer_s"], 2)),
                 ("first forward pass", _num(load["first_forward_s"], 2))]
    else:
        lines += _why_missing(load, "coldstart load")
    if _ok(convert):
        rows += [("convert GGUF -> sym_int4 checkpoint (`convert_checkpoint`, after imports)",
                  _num(convert["convert_s"], 2))]
    else:
        lines += _why_missing(convert, "coldstart convert")
    if startup:
        rows += [("`ray.init` (fresh local cluster)", _num(startup.get("ray_init_s"), 2)),
                 ("bare Ray actor start (a prestarted idle worker)"
                  + _starts_note(startup.get("bare_actor_start_runs_s")),
                  _num(startup.get("bare_actor_start_s"), 2)),
                 ("bare Ray actor with a runtime_env (a new worker process)",
                  _num(startup.get("bare_actor_with_runtime_env_start_s"), 2)),
                 ("`serve.start`", _num(startup.get("serve_start_s"), 2)),
                 ("`serve.run` to the application RUNNING (replica loads the shared "
                  "checkpoint; polled every 50 ms)"
                  + _starts_note(startup.get("serve_run_to_ready_runs_s")),
                  _num(startup.get("serve_run_to_ready_s"), 2)),
                 ("`serve.run` returned (it polls once a second)"
                  + _starts_note(startup.get("serve_run_returned_runs_s")),
                  _num(startup.get("serve_run_returned_s"), 2)),
                 ("  of which the LLMServer constructor (its log: claim, pin, load)"
                  + _starts_note(startup.get("replica_constructor_runs_s")),
                  _num(startup.get("replica_constructor_s"), 2))]
    if rows:
        lines += _table(("step", "seconds"), rows)
    if _ok(load) and _ok(convert):
        from_checkpoint = load["import_s"] + load["engine_load_s"]
        converting = convert["import_s"] + convert["convert_s"] + load["tokenizer_s"]
        lines += [f"Ready from the shared checkpoint: {_num(from_checkpoint, 1)} s (imports + "
                  f"verify + load + tokenizer) vs about {_num(converting, 1)} s converting at "
                  f"start-up ({_num(ratio(converting, from_checkpoint), 1)}x).", ""]
    mem = []
    if _ok(load):
        mem.append(("checkpoint on disk", _mib(load.get("checkpoint_bytes"))))
        mem.append(("fresh process after load + one forward (VmHWM)",
                    _mib(load.get("peak_rss_bytes"))))
    if _ok(convert):
        mem.append(("converting process (VmHWM)", _mib(convert.get("peak_rss_bytes"))))
    if startup:
        mem.append(("replica when ready (VmHWM, pid from GET /health)",
                    _mib(startup.get("replica_vm_hwm_ready_bytes"))))
        mem.append(("replica after every service run (VmHWM)",
                    _mib(startup.get("replica_vm_hwm_end_bytes"))))
    llama = r.get("llama") or {}
    if llama.get("vm_hwm_bytes"):
        mem.append(("llama-server after its sweep (VmHWM)", _mib(llama["vm_hwm_bytes"])))
    if mem:
        lines += ["Memory (MiB):", "", *_table(("what", "MiB"), mem)]
        if _ok(load) and startup.get("replica_vm_hwm_end_bytes"):
            peak = ratio(startup["replica_vm_hwm_end_bytes"], load["checkpoint_bytes"])
            lines += [f"Replica peak RSS / checkpoint size: {_num(peak, 1)}x (KV caches of up "
                      "to max_batch_size sequences, Ray's worker runtime, the model stack).", ""]
    return lines


def _short_first(service: dict[str, Any]) -> bool:
    """Whether a service section ran with short-first decoding (both engines' default on
    the CPU)."""
    options = (service.get("config_args") or {}).get("engine_options") or {}
    return bool(options.get("short_first", True))


def _long_cost(mixed: dict[str, Any], lead: str) -> str:
    """``lead`` + what the mixed run cost its long requests, or "" when not measured."""
    if "long_p50_ratio" not in mixed:
        return ""
    return (f"{lead} long requests pay for it: {_ms(mixed['long_mixed']['e2e_p50_s'])} ms "
            f"(p50) next to short ones vs {_ms(mixed['long_alone']['e2e_p50_s'])} ms alone "
            f"({_x(mixed['long_p50_ratio'])})")


def _mixed(r: dict[str, Any]) -> list[str]:
    service = r.get("service") or {}
    lines = ["## Mixed workload (engine ipex_llm): short and long requests together"
             + (" (short-first decoding on)" if _short_first(service) else ""), ""]
    return lines + _mixed_table(service.get("mixed"), r["workload"])


def _mixed_table(mixed: dict[str, Any] | None, w: dict[str, Any]) -> list[str]:
    if not mixed:
        return ["_Not measured (service section missing)._", ""]
    lines = [f"Over HTTP: {w['mixed_short_clients']} clients each send "
             f"{w['mixed_short_requests_per_client']} short requests "
             f"({w['mixed_short_tokens']} tokens), first alone, then while "
             f"{w['mixed_long_clients']} clients keep long requests "
             f"({w['mixed_long_tokens']} tokens) running."
             + (f" Long requests alone: {w['mixed_long_clients']} at once; with short: those "
                "running when the first short request came, each run to its end."
                if "long_alone" in mixed else "") + " Latencies in ms.", ""]
    rows = []
    for key, label in (("short_alone", "short, alone"), ("short_mixed", "short, with long"),
                       ("long_alone", "long, alone"), ("long_mixed", "long, with short")):
        if key not in mixed:
            continue
        m = mixed[key]
        rows.append((label, f"{m['requests']} ({m['errors']})", _ms(m["ttft_p50_s"]),
                     _ms(m["e2e_p50_s"]), _ms(m["e2e_p99_s"]),
                     _num(m.get("foreign_cores"), 2)))
    lines += _table(("requests", "n (errors)", "TTFT p50", "e2e p50", "e2e p99",
                     "other load"), rows)
    lines += [f"Short p50 with long / alone: **{_x(mixed['short_p50_ratio'])}** "
              "(target <= 1.5x)"
              + (f"; long p50 with short / alone: {_x(mixed['long_p50_ratio'])}"
                 if "long_p50_ratio" in mixed else "") + ".", ""]
    return lines


def _profile(r: dict[str, Any]) -> list[str]:
    inproc = r.get("inprocess") or {}
    lines = ["## Profile (engine ipex_llm): where a decode step goes", ""]
    profiles = inproc.get("profiles") or []
    if profiles:
        lines += ["`torch.profiler` over 3 decode steps of `IpexLLMEngine.step()` (per-step "
                  "averages; profiler overhead inflates the many small aten ops). Low-bit "
                  "matmuls are ipex-llm's `LowBitLinear.forward` (ggml int4 kernels called "
                  "through ctypes, invisible to the profiler as aten ops).", ""]
        lines += _table(("batch", "step (ms)", "model forward", "low-bit matmuls (calls)",
                         "rest of forward", "sampling", "detokenize", "engine other",
                         "aten op calls"), [
            (p["batch_size"], _num(p["step_ms"]), _num(p["model_forward_ms"]),
             f"{_num(p['lowbit_linear_ms'])} ({p['lowbit_linear_calls']:.0f})",
             _num(p["forward_other_ms"]), _num(p["sample_ms"], 2), _num(p["detokenize_ms"], 2),
             _num(p["engine_other_ms"], 2), f"{p['aten_op_calls']:.0f}") for p in profiles])
        top = profiles[-1]["top_aten_self_ms"]
        lines += [f"Top aten ops by self time at batch {profiles[-1]['batch_size']} "
                  "(ms per step, calls per step): " +
                  ", ".join(f"`{name}` {ms} ({calls:.0f})" for name, ms, calls in top[:6]), ""]
    paths = inproc.get("matmul_paths") or []
    if paths:
        lines += ["One forward pass on each of ipex-llm's CPU sym_int4 matmul paths (ms, "
                  "median of 3): ggml's int4 kernel, which ipex-llm uses below "
                  "`BIGDL_LLM_LINEAR_THRESHOLD` activation rows (ipex-llm's default 512; "
                  f"this run {inproc.get('linear_threshold_rows', '?')}), and "
                  "dequantize-to-fp32 + torch sgemm, which it uses at or above it on "
                  "AVX-512-VNNI CPUs without AMX (like this one). Rows = batch x tokens.", ""]
        lines += _table(("shape", "rows", "ggml (ms)", "dequant + sgemm (ms)", "faster",
                         "other load"), [
            (f"{p['batch']} x {p['tokens_per_row']}", p["rows"], _num(p["ggml_ms"]),
             _num(p["dequant_sgemm_ms"]),
             "ggml" if p["ggml_ms"] <= p["dequant_sgemm_ms"] else
             f"sgemm, {p['ggml_ms'] / p['dequant_sgemm_ms']:.1f}x", _num(p["foreign_cores"], 2))
            for p in paths])
    lines += _pyspy_lines((r.get("service") or {}).get("pyspy"), "engine ipex_llm")
    http8 = _by((r.get("service") or {}).get("http"), "clients", 8)
    if http8 and http8.get("cpu_cores_by_process"):
        lines += ["CPU cores used per process during the 8-client HTTP run: " +
                  ", ".join(f"{k.replace('ray::', '')} {v:.2f}"
                            for k, v in http8["cpu_cores_by_process"].items()), ""]
    if len(lines) == 2:
        lines += ["_Not measured (sections inprocess and service missing)._", ""]
    return lines


def _pyspy_lines(pyspy: dict[str, Any] | None, engine: str) -> list[str]:
    if not pyspy or "replica" not in pyspy:
        return [f"py-spy: {pyspy['note']}.", ""] if pyspy and pyspy.get("note") else []
    rep = pyspy["replica"]
    lines = [f"py-spy on the {engine} replica's engine thread ({pyspy['clients']} HTTP "
             f"clients, {pyspy['seconds']} s, innermost matching frame): " +
             (", ".join(f"{k} {v:.1%}" for k, v in rep.get("by_category", {}).items())
              or rep.get("note", "no samples")), ""]
    if pyspy.get("replica_threads_cores"):
        lines += ["CPU cores per replica thread meanwhile (/proc): " +
                  ", ".join(f"{name} {cores:.2f}"
                            for name, cores in pyspy["replica_threads_cores"][:6]), ""]
    router = pyspy.get("router") or {}
    if router.get("top_leaves"):
        lines += [f"py-spy on the router: {router['samples']} samples "
                  f"(replica: {rep.get('samples', 0)}); top leaves: " +
                  ", ".join(f"`{k}` {v:.0%}" for k, v in router["top_leaves"][:4]), ""]
    return lines


def _analysis(r: dict[str, Any], v: dict[str, float]) -> list[str]:
    inproc = r.get("inprocess") or {}
    service = r.get("service") or {}
    lines = ["## Analysis", ""]
    profiles = {p["batch_size"]: p for p in inproc.get("profiles") or []}
    ceiling = {row["batch_size"]: row["tokens_per_s"] for row in inproc.get("ceiling") or []}
    engine = {row["batch_size"]: row for row in inproc.get("engine") or []}
    http = {row["clients"]: row for row in service.get("http") or []}
    # The share of prompt tokens engine ipex_llm's prompt cache supplied at 8 clients.
    ipex_cached = _cached_share({"sweep": service.get("http") or []}, 8)
    lc_engine = _lc_section(r, "llama_cpp_engine")
    lc_service = _lc_section(r, "llama_cpp_service")
    noisy = [name for name, rows in (("ceiling", inproc.get("ceiling")),
                                     ("service", service.get("http")),
                                     ("llama_cpp engine", lc_engine.get("engine")),
                                     ("llama_cpp service", lc_service.get("http")),
                                     ("llama-server", (r.get("llama") or {}).get("sweep")))
             for row in rows or () if row.get("foreign_cores", 0) >= DISTURBED_CORES]
    if noisy:
        lines.append(f"- **Caveat: other processes used >= {DISTURBED_CORES} cores during "
                     "some measurements "
                     f"({', '.join(sorted(set(noisy)))})**; ratios between rows measured at "
                     "different moments are unreliable. Rerun on a quiet machine.")
    if 1 in profiles and 8 in profiles:
        p1, p8 = profiles[1], profiles[8]
        per_row = (p8["lowbit_linear_ms"] - p1["lowbit_linear_ms"]) / 7
        lines.append(
            f"- The model is the bottleneck, and it batches poorly on this CPU: ipex-llm's "
            f"low-bit matmuls take {_num(p8['lowbit_linear_ms'])} ms of a "
            f"{_num(p8['step_ms'])} ms decode step at batch 8 "
            f"({p8['lowbit_linear_ms'] / p8['step_ms']:.0%}) against "
            f"{_num(p1['lowbit_linear_ms'])} ms at batch 1: each extra row adds "
            f"{per_row:.1f} ms, so batching amortizes only a small fixed part (ggml's int4 "
            "kernel, as ipex-llm calls it, does not reuse loaded weights across rows much). "
            f"That caps the ceiling at {_num(ceiling.get(8))} tok/s at batch 8 vs "
            f"{_num(ceiling.get(1))} at batch 1. The rest of the forward pass is "
            f"{p8['aten_op_calls']:.0f} aten op calls per step ({_num(p8['forward_other_ms'])} "
            "ms under the profiler), a fixed cost that weighs most at batch 1 for a 135M "
            "model.")
    paths = {(p["batch"], p["tokens_per_row"]): p for p in inproc.get("matmul_paths") or []}
    prefill = paths.get((8, 31)) or paths.get((1, 31))
    threshold = int(inproc.get("linear_threshold_rows")
                    or (r.get("env") or {}).get("BIGDL_LLM_LINEAR_THRESHOLD", 512))
    if prefill and (1, 1) in paths:
        lines.append(
            f"- Prefill would be slow for the same reason: ggml's kernel costs about "
            f"{(prefill['ggml_ms'] - paths[(1, 1)]['ggml_ms']) / (prefill['rows'] - 1):.1f} ms"
            f" per extra activation row, so a {prefill['rows']}-token prefill takes "
            f"{_num(prefill['ggml_ms'], 0)} ms there, while ipex-llm's other CPU path "
            f"(dequantize to fp32, then sgemm) takes {_num(prefill['dequant_sgemm_ms'], 0)} ms."
            f" This run switches at {threshold} rows"
            + (" (`BIGDL_LLM_LINEAR_THRESHOLD`): every prompt of this workload, and every "
               "batched prefill, runs on the slow path, which is most of the TTFT at 8+ "
               "clients. `python -m bench.run --env BIGDL_LLM_LINEAR_THRESHOLD=17` "
               "measures the what-if (prefill on sgemm, decode batches up to 16 rows "
               "on ggml)."
               if threshold > prefill["rows"] else
               " (`BIGDL_LLM_LINEAR_THRESHOLD`, set by IpexLLMEngine.load; ipex-llm's default "
               "is 512): prefills take sgemm, decode batches up to 16 rows keep ggml."))
    if 8 in engine and 8 in ceiling:
        e8 = engine[8]
        lines.append(
            f"- Our engine alone reaches {_num(e8['tokens_per_s'])} tok/s at batch 8 "
            f"({_x(ratio(e8['tokens_per_s'], ceiling[8]))} the ceiling); the model "
            f"forward is {_pct(e8.get('model_forward_share'))} of its wall time (low-bit "
            f"matmuls {_pct(e8.get('lowbit_linear_share'))}), sampling "
            f"{_pct(e8.get('sample_share'))} and detokenizing "
            f"{_pct(e8.get('detokenize_share'))}: the step loop's Python is not "
            "where time goes.")
    attention = inproc.get("decode_attention")
    if attention:
        lines.append(
            "- One difference between the engine and the ceiling's `generate` is the "
            "engine's own: its decode attention reads the KV cache as it is, where "
            "ipex-llm's CPU path first copies it out to every query head (`repeat_kv`; "
            "query heads share KV heads on this model) and torch's attention kernel then "
            "reads the copy "
            "(`deployments/engine/ipex_attention.py`). The two taking turns step by step "
            f"in one batch of {attention['batch_size']}: {_num(attention['grouped_step_ms'])}"
            f" ms vs {_num(attention['ipex_llm_step_ms'])} ms a decode step "
            f"({_x(attention['speedup'])}; {attention['steps_each']} steps each). The gain "
            "grows with the cached length.")
    if 8 in http and 8 in engine:
        h8 = http[8]
        shares = h8.get("cpu_cores_by_process", {})
        overhead = _serving_cores(h8)
        handle8 = _by(service.get("handle"), "clients", 8) or {}
        slower = ratio(h8["tpot_p50_s"] * 1000, engine[8]["step_ms"])
        lines.append(
            f"- Serving costs little CPU, but on 2 cores that CPU comes out of the model's: "
            f"8 HTTP clients get {_num(h8['tokens_per_s'])} tok/s "
            f"({_x(ratio(h8['tokens_per_s'], engine[8]['tokens_per_s']))} the engine alone at "
            f"batch 8; mean engine batch {_num(h8.get('mean_engine_batch'))}). Their decode "
            f"steps (TPOT p50 {_ms(h8['tpot_p50_s'])} ms) are "
            f"{_num((slower - 1) * 100 if not math.isnan(slower) else math.nan, 0)}% slower "
            f"than the engine's alone ({_num(engine[8]['step_ms'], 0)} ms) while Ray, the "
            f"proxy, the router and the client used {overhead:.2f} cores and the replica "
            f"{shares.get(_replica_key(shares), math.nan):.2f}. The model runs one OpenMP "
            "thread per core (torch's OpenMP pool, ipex-llm's ggml kernels) and each op waits for "
            "its slowest thread, so any other runnable "
            "thread stalls both (an in-process probe: a 0.1-0.2-core background load slowed "
            "batch-8 decoding by ~15%). Through the handle, one hop (the HTTP proxy) fewer: "
            f"{_num(handle8.get('tokens_per_s'))} tok/s at 8 clients.")
        if ipex_cached:
            # Since f1d7c1a a repeated prompt's entry holds the logits that followed it too.
            rest = ("and the logits after them, so a request computes nothing before its "
                    "first token" if ipex_cached >= 0.999 else
                    "so a request prefills only its prompt's last token, in a step of its own "
                    "while every running sequence waits")
            lines.append(
                f"- TTFT at 8 clients: {_ms(h8['ttft_p50_s'])} ms p50 (the replica's own mean "
                f"{_ms(h8.get('server_ttft_mean_s'))} ms). The prompt cache supplied "
                f"{_pct(ipex_cached)} of the prompt tokens, {rest} "
                f"(ITL p99 {_ms(h8['itl_p99_s'])} ms).")
        elif (8, 31) in paths:
            lines.append(
                f"- TTFT at 8 clients ({_ms(h8['ttft_p50_s'])} ms p50; the replica's own mean "
                f"{_ms(h8.get('server_ttft_mean_s'))} ms) is prefill: 8 prompts of "
                f"{inproc.get('prompt_tokens')} tokens cost {_num(paths[(8, 31)]['ggml_ms'], 0)}"
                f" ms on ggml's path, {_num(paths[(8, 31)]['dequant_sgemm_ms'], 0)} ms on "
                "dequantize + sgemm (this run uses "
                f"{'ggml' if threshold > paths[(8, 31)]['rows'] else 'sgemm'}); while it runs, "
                f"every running sequence waits too (ITL p99 {_ms(h8['itl_p99_s'])} ms).")
    scaling = ratio(ceiling.get(8), ceiling.get(1))
    sequential = (inproc.get("sequential") or {}).get("tokens_per_s", math.nan)
    if ceiling or http:
        lines.append(
            f"- vs the ceiling at 8 clients: {_x(v['http8_vs_ceiling'])} over HTTP"
            + (" (median of section 3b's alternating turns)" if ipex_turns(r) else "")
            + f", {_x(v['handle8_vs_ceiling'])} through the handle (target 0.9x); vs "
            f"one request at a time: {_x(v['http8_vs_seq'])} (target 1.9x). The model "
            f"itself gains only {_x(scaling)} from batch 1 to 8 (ceiling), so 1.9x over "
            "one-at-a-time needs the service at "
            f"{_x(ratio(1.9 * sequential, ceiling.get(8)))}"
            " of the ceiling: both targets hinge on the same gap (contention"
            + ("" if ipex_cached else " and prefill") + ", above), and on the kernel's poor "
            "batching.")
    if not math.isnan(v["http8_vs_llama"]):
        lines.append(
            f"- llama.cpp's server is {_num(1 / v['http8_vs_llama'], 1)}x faster at 8 clients "
            f"and {_num(1 / v['http16_vs_llama'], 1)}x at 16 (and "
            f"{_num(ratio(_tps(r.get('llama'), 1), _tps(service, 1, 'http')), 1)}x at 1 client): "
            "ggml's CPU backend compiled for this CPU (-march=native, runtime weight "
            "repacking, llamafile sgemm) running a C++ graph, vs ipex-llm's ctypes calls into "
            "its kernel per linear layer plus thousands of aten ops from Python per step"
            + (" (and llama-server reuses the repeated prompt's KV, which engine ipex_llm, "
               "without a prompt cache, prefills every time)"
               if _cached_share(r.get("llama"), 8) and not ipex_cached else "")
            + ". Not reachable on ipex-llm's CPU path; ipex-llm's strength is Intel GPUs "
            "(XPU), which this machine lacks."
            + (" Engine llama_cpp runs llama.cpp's kernels behind our service (below)."
               if lc_service or lc_engine else ""))
    mixed = service.get("mixed")
    if mixed:
        alone = mixed["short_alone"]["e2e_p50_s"]
        with_long = mixed["short_mixed"]["e2e_p50_s"]
        lines.append(
            f"- Mixed: short requests took {_ms(with_long)} ms (p50) next to long ones vs "
            f"{_ms(alone)} ms alone ({_x(v['mixed'])}, target 1.5x). Continuous batching "
            "lets them in between steps (no head-of-line wait for the long answers: TTFT p50 "
            f"{_ms(mixed['short_mixed']['ttft_p50_s'])} ms vs "
            f"{_ms(mixed['short_alone']['ttft_p50_s'])} ms), but each step then carries the "
            f"{r['workload']['mixed_long_clients']} long rows too (batch "
            f"{r['workload']['mixed_short_clients']} -> "
            f"{r['workload']['mixed_short_clients'] + r['workload']['mixed_long_clients']}), "
            "and on this CPU a step's time grows almost with its rows (engine alone: "
            + ", ".join(f"batch {b} {_num(e['step_ms'], 0)} ms" for b, e in engine.items())
            + ")" + (": with the prompt cache sparing both cases their prefill, what is left "
                     "is the step time of 8 rows against 4, a floor under the ratio if every "
                     "step carried every row; with short-first decoding (engine option "
                     "`short_first`, on for the CPU) the long rows decode every other step "
                     "while short ones run" + _long_cost(mixed, "; the") + "."
                     if ipex_cached else
                     ", and each long request's arrival adds a slow prefill step for "
                     "everyone."))
    ready = _ready(r)
    startup = service.get("startup") or {}
    if not math.isnan(ready["ratio"]):
        lines.append(
            f"- Start-up: `serve.run` to ready took {_num(ready['serve_run'])} s, "
            f"{_x(ready['ratio'])} the bare path ({_num(ready['bare'])} s = imports + "
            "load_low_bit + a trivial actor). The LLMServer constructor itself took "
            f"{_num(startup.get('replica_constructor_s'))}"
            " s (claim, pin, verify, load)" + _dynamo_note(r) + "; the rest is Ray Serve "
            "creating the replica and router actors and the controller's reconciliation "
            "loop. Neither deployment has "
            "a runtime_env, so replicas start in Ray's prestarted workers (a trivial actor "
            f"with one took {_num(startup.get('bare_actor_with_runtime_env_start_s'))} s vs "
            f"{_num(startup.get('bare_actor_start_s'), 2)} s without). `serve.run` itself "
            f"returned after {_num(startup.get('serve_run_returned_s'))} s: it polls the "
            "application's status once a second.")
    lines += _llama_cpp_analysis(r, v, lc_engine, lc_service)
    return [*lines, ""]


def _dynamo_note(r: dict[str, Any]) -> str:
    """What the engine's load spares against the bare path (runs that measured it)."""
    load = (r.get("coldstart") or {}).get("load") or {}
    if "dynamo_import_s" not in load:
        return ""
    return (f", without the {_num(load['dynamo_import_s'])} s import of torch._dynamo that "
            "the bare load_low_bit makes for its meta q/k/v merge (IpexLLMEngine.load merges "
            "them without torch.cat, deployments/engine/ipex_meta_merge.py)")


def _met(value: float, target: float, higher_is_better: bool = True,
         strict: bool = False) -> str:
    return _verdict(value, target, higher_is_better, strict).replace("*", "")


def _llama_cpp_analysis(r: dict[str, Any], v: dict[str, float], lc_engine: dict[str, Any],
                        lc_service: dict[str, Any]) -> list[str]:
    """Engine llama_cpp against llama.cpp's server, its own engine alone, and ipex_llm."""
    lines = []
    service = r.get("service") or {}
    llama = r.get("llama") or {}
    lc_http = {row["clients"]: row for row in lc_service.get("http") or []}
    lc_alone = {row["batch_size"]: row for row in lc_engine.get("engine") or []}
    ipex_alone = {row["batch_size"]: row
                  for row in (r.get("inprocess") or {}).get("engine") or []}
    if lc_http:
        peer = {row["clients"]: row for row in llama.get("sweep") or []} \
            if _ok(llama) else {}
        text = (f"- Engine llama_cpp (llama.cpp under our continuous batching, the serving "
                f"stack unchanged) over HTTP: {_num(_tps(lc_service, 8, 'http'))} tok/s at 8 "
                f"clients, {_num(_tps(lc_service, 16, 'http'))} at 16")
        if peer:
            text += (f"; llama.cpp's server on the same GGUF and cores: "
                     f"{_num(_tps(llama, 8))} and {_num(_tps(llama, 16))}, so "
                     f"{_x(ratio(_tps(lc_service, 8, 'http'), _tps(llama, 8)))} at 8 clients "
                     f"and {_x(ratio(_tps(lc_service, 16, 'http'), _tps(llama, 16)))} at 16")
            h2h = head_to_head(r)
            if h2h:
                text += (" (sections 5 and 6, minutes apart); in alternating turns (section "
                         "7) the median ratio was " + ", ".join(
                             f"{_x(h2h[c]['median'])} at {c} clients" for c in sorted(h2h)))
            text += (f" (target > 1x: {_met(v['lc_http8_vs_llama'], 1.0, strict=True)} at 8, "
                     f"{_met(v['lc_http16_vs_llama'], 1.0, strict=True)} at 16)")
            if 1 in lc_http and 1 in peer:
                text += (f", and {_x(ratio(_tps(lc_service, 1, 'http'), _tps(llama, 1)))} "
                         "at 1 client")
            if 8 in lc_http and 8 in peer:
                text += (f". TTFT p50 at 8 clients: {_ms(lc_http[8]['ttft_p50_s'])} ms vs "
                         f"{_ms(peer[8]['ttft_p50_s'])} ms; TPOT p50 "
                         f"{_ms(lc_http[8]['tpot_p50_s'])} ms vs "
                         f"{_ms(peer[8]['tpot_p50_s'])} ms")
        else:
            text += ("; llama.cpp's server was not measured in this run (section 6), so the "
                     "> 1x target is not measured")
        ipex8 = _tps(service, 8, "http")
        if ipex8:
            text += (f". Against engine ipex_llm's service at 8 clients ({_num(ipex8)} tok/s): "
                     f"{_x(ratio(_tps(lc_service, 8, 'http'), ipex8))}")
        lines.append(text + ".")
    if 8 in lc_http and 8 in lc_alone:
        h8, e8 = lc_http[8], lc_alone[8]
        shares = h8.get("cpu_cores_by_process") or {}
        overhead = _serving_cores(h8)
        slower = ratio(h8["tpot_p50_s"] * 1000 if h8.get("tpot_p50_s") is not None
                       else None, e8["step_ms"])
        handle8 = _tps(lc_service, 8, "handle")
        lines.append(
            f"- Serving cost on engine llama_cpp: 8 HTTP clients get "
            f"{_num(h8['tokens_per_s'])} tok/s, {_x(v['lc_http8_vs_alone'])} its engine alone "
            f"at batch 8 ({_num(e8['tokens_per_s'])} tok/s; target 0.9x: "
            f"{_met(v['lc_http8_vs_alone'], 0.9)}; mean engine batch "
            f"{_num(h8.get('mean_engine_batch'))}). Decode steps (TPOT p50 "
            f"{_ms(h8.get('tpot_p50_s'))} ms) are "
            f"{_num((slower - 1) * 100 if not math.isnan(slower) else math.nan, 0)}% slower "
            f"than alone ({_num(e8['step_ms'], 0)} ms) while Ray, the proxy, the router and "
            f"the client used {overhead:.2f} cores and the replica "
            f"{shares.get(_replica_key(shares), math.nan):.2f}. Through the handle: "
            f"{_num(handle8)} tok/s ({_x(ratio(handle8, e8['tokens_per_s']))} alone).")
    if lc_alone:
        batch = 8 if 8 in lc_alone else max(lc_alone)
        row = lc_alone[batch]
        smallest = min(lc_alone)
        text = (f"- Engine llama_cpp alone: {_num(lc_alone[smallest]['tokens_per_s'])} tok/s "
                f"at batch {smallest}, " +
                ", ".join(f"{_num(e['tokens_per_s'])} at {b}" for b, e in lc_alone.items()
                          if b != smallest) +
                f"; at batch {batch} `llama_decode` (`_run`) is "
                f"{_pct(row.get('model_forward_share'))} of the wall time, sampling "
                f"{_pct(row.get('sample_share'))}, detokenizing "
                f"{_pct(row.get('detokenize_share'))}")
        if batch in ipex_alone:
            text += (f"; {_x(ratio(row['tokens_per_s'], ipex_alone[batch]['tokens_per_s']))} "
                     f"engine ipex_llm alone at the same batch "
                     f"({_num(ipex_alone[batch]['tokens_per_s'])} tok/s)")
        lines.append(text + ".")
    mixed = lc_service.get("mixed")
    if mixed:
        work = r["workload"]
        short_rows = work["mixed_short_clients"]
        all_rows = short_rows + work["mixed_long_clients"]
        short_first = _short_first(lc_service)
        steps = ""
        if short_rows in lc_alone and all_rows in lc_alone:
            step_short, step_all = (lc_alone[b]["step_ms"] for b in (short_rows, all_rows))
            steps = (f". A step of {all_rows} rows takes {_num(step_all, 0)} ms vs "
                     f"{_num(step_short, 0)} ms for {short_rows} (engine alone: "
                     f"{_x(ratio(step_all, step_short))}), a floor under the ratio if every "
                     "step carried the long rows too"
                     + (": with short-first decoding (engine option `short_first`, on) they "
                        "decode only every other step while the short ones run, so a short "
                        f"token costs about ({_num(step_short, 0)} + {_num(step_all, 0)}) / 2 "
                        "ms" if short_first else ""))
        steps += _long_cost(mixed, ". The")
        lines.append(
            f"- Mixed on engine llama_cpp: short requests took "
            f"{_ms(mixed['short_mixed']['e2e_p50_s'])} ms (p50) next to long ones vs "
            f"{_ms(mixed['short_alone']['e2e_p50_s'])} ms alone ({_x(v['lc_mixed'])}, target "
            f"1.5x: {_met(v['lc_mixed'], 1.5, higher_is_better=False)}; TTFT p50 "
            f"{_ms(mixed['short_mixed']['ttft_p50_s'])} ms vs "
            f"{_ms(mixed['short_alone']['ttft_p50_s'])} ms)" + steps
            + (f"; engine ipex_llm: {_x(v['mixed'])}" if not math.isnan(v["mixed"]) else "")
            + ".")
    startup = lc_service.get("startup") or {}
    if startup.get("serve_run_to_ready_s") is not None:
        ipex_startup = service.get("startup") or {}
        lines.append(
            f"- Start-up on engine llama_cpp: `serve.run` to ready "
            f"{_num(startup['serve_run_to_ready_s'])} s (constructor "
            f"{_num(startup.get('replica_constructor_s'))} s), replica peak RSS after its runs "
            f"{_mib(startup.get('replica_vm_hwm_end_bytes'))} MiB"
            + (f"; engine ipex_llm: {_num(ipex_startup['serve_run_to_ready_s'])} s and "
               f"{_mib(ipex_startup.get('replica_vm_hwm_end_bytes'))} MiB"
               if ipex_startup.get("serve_run_to_ready_s") is not None else "") + ".")
    return lines


def _tps(section: dict[str, Any] | None, clients: int, key: str = "sweep") -> float | None:
    return (_by((section or {}).get(key), "clients", clients) or {}).get("tokens_per_s")


def _replica_key(shares: dict[str, float]) -> str:
    return next((k for k in shares if "LLMServer" in k), "")


# ---- the plot ---------------------------------------------------------------------------


def write_plot(r: dict[str, Any], path: Path) -> bool:
    """tokens/s and TTFT p50 against concurrency; False (no plot) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    service = r.get("service") or {}
    lc_service = _lc_section(r, "llama_cpp_service")
    # Fixed colours, so a series keeps its colour whichever others are missing.
    series = [("our service (ipex_llm), HTTP", service.get("http"), "o-", "tab:blue"),
              ("our service (ipex_llm), handle", service.get("handle"), "s--", "tab:orange"),
              ("our service (llama_cpp), HTTP", lc_service.get("http"), "D-", "tab:red"),
              ("llama.cpp server (-np 8)", (r.get("llama") or {}).get("sweep"), "^-",
               "tab:green")]
    for label, rows, style, color in series:
        if rows:
            xs = [row["clients"] for row in rows]
            left.plot(xs, [row["tokens_per_s"] for row in rows], style, color=color,
                      label=label)
            right.plot(xs, [row["ttft_p50_s"] * 1000 for row in rows], style, color=color,
                       label=label)
    inproc = r.get("inprocess") or {}
    if inproc.get("ceiling"):
        left.plot([row["batch_size"] for row in inproc["ceiling"]],
                  [row["tokens_per_s"] for row in inproc["ceiling"]], "k:", marker="x",
                  label="ipex_llm in-process generate (x = batch)")
    lc_alone = _lc_section(r, "llama_cpp_engine").get("engine") or []
    if lc_alone:
        left.plot([row["batch_size"] for row in lc_alone],
                  [row["tokens_per_s"] for row in lc_alone], ":", color="tab:red",
                  marker="+", label="engine llama_cpp alone (+ = batch)")
    if inproc.get("sequential"):
        left.axhline(inproc["sequential"]["tokens_per_s"], color="grey", linestyle="-.",
                     label="one request at a time")
    ticks = sorted({row["clients"] for _, rows, _, _ in series for row in rows or ()}
                   | {row["batch_size"] for row in inproc.get("ceiling") or ()}
                   | {row["batch_size"] for row in lc_alone})
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.minorticks_off()
        axis.set_xlabel("concurrent clients")
        axis.grid(True, alpha=0.3)
    left.set_ylabel("output tokens/s")
    right.set_ylabel("TTFT p50 (ms)")
    right.set_yscale("log")
    left.set_title("Throughput")
    right.set_title("Time to first token")
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    m = r["machine"]
    model = "SmolLM2-135M (ipex_llm: sym_int4; llama.cpp: Q4_1)" \
        if lc_service or lc_alone or _ok(r.get("llama")) else "SmolLM2-135M sym_int4"
    fig.suptitle(f"{model}, {r['workload']['max_tokens']}-token answers — "
                 f"{m['cpu_model']}, {m['logical_cpus']} CPUs, {m['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(r: dict[str, Any], out_dir: Path) -> list[Path]:
    plot = out_dir / "throughput.png"
    has_plot = write_plot(r, plot)
    targets, values = _targets(r)
    lines = _header(r) + targets
    if has_plot:
        lines += [f"![throughput and TTFT]({plot.name})", ""]
    else:
        lines += ["_No plot: matplotlib is not installed (`.venv/bin/pip install "
                  "matplotlib`)._", ""]
    lines += _analysis(r, values) + _inprocess(r) + _service(r) + _ipex_turns(r) + \
        _llama_cpp_engine(r) + \
        _llama_cpp_service(r) + _llama(r) + _head_to_head(r) + _coldstart(r) + _mixed(r) + \
        _profile(r)
    report = out_dir / "RESULTS.md"
    report.write_text("\n".join(lines).rstrip() + "\n")
    return [report, out_dir / "results.json"] + ([plot] if has_plot else [])
