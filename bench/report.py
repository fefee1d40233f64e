"""RESULTS.md and throughput.png from a run's results.json, and nothing else.

The report is tables of the measured numbers and a targets table (ratios of those numbers
against the project's goals); it writes no analysis. Analysis is a dated note written by
hand in RESULTS.md between the NOTES markers, which a rewrite keeps as it is.

    python -m bench.report [bench/results.json]   # render again, measuring nothing
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.coldstart import bare_load_s
from bench.stats import ratio

NOTES_START = "<!-- notes: written by hand; python -m bench.report keeps this part -->"
NOTES_END = "<!-- /notes -->"
NO_NOTES = "## Notes\n\n_None yet: add a dated note here by hand._"
SERVERS = {"service_ipex_llm": "our service, engine ipex_llm",
           "service_llama_cpp": "our service, engine llama_cpp", "llama_server": "llama-server"}
NA = "n/a"


def _num(value: Any, digits: int = 1, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    return f"{value * scale:.{digits}f}"


def _x(value: float | None) -> str:
    return NA if value is None else f"{value:.2f}x"


def _ms(seconds: float | None) -> str:
    return _num(seconds, 0, 1000)


def _mib(size: int | None) -> str:
    return _num(size, 0, 2**-20)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def _ok(section: dict[str, Any] | None) -> bool:
    return bool(section) and "failed" not in section and "skipped" not in section


def _sec(r: dict[str, Any], name: str) -> dict[str, Any]:
    """Section ``name``'s results; {} if it did not run, failed or was skipped."""
    section = r["sections"].get(name)
    return section if _ok(section) else {}


def _missing(r: dict[str, Any], *names: str) -> list[str]:
    """A line for each named section that has no results, saying why."""
    lines = []
    for name in names:
        section = r["sections"].get(name)
        if not _ok(section):
            why = "not run" if section is None else section.get("failed") or section["skipped"]
            lines.append(f"_`{name}`: {why}._")
    return [*lines, ""] if lines else []


def _run(r: dict[str, Any], name: str) -> dict[str, Any]:
    return _sec(r, name).get("run") or {}


def _level(r: dict[str, Any], server: str, clients: int) -> dict[str, Any]:
    return next((lv for lv in _run(r, server).get("levels", []) if lv["clients"] == clients),
                {})


def _rows(r: dict[str, Any], section: str, kind: str = "batches") -> dict[int, dict[str, Any]]:
    return {row["batch"]: row for row in _sec(r, section).get(kind, [])}


def _turns(r: dict[str, Any], section: str, a_key: str, b_key: str) -> dict[str, Any] | None:
    return next((x for x in _sec(r, section).get("ratios", [])
                 if (x["a_key"], x["b_key"]) == (a_key, b_key)), None)


# ---- targets ----------------------------------------------------------------------------


def _verdict(value: float | None, goal: str) -> str:
    if value is None or goal == "-":
        return "not measured" if value is None and goal != "-" else ""
    op, bound = goal.split()
    met = {">=": value >= float(bound), ">": value > float(bound),
           "<=": value <= float(bound), "<": value < float(bound)}[op]
    return "**met**" if met else "**not met**"


def _measured(a: float | None, b: float | None, unit: str = "tok/s") -> tuple[str, float | None]:
    value = ratio(a, b)
    return f"{_num(a)} / {_num(b)} {unit} = {_x(value)}", value


def _or_turns(plain: tuple[str, float | None], turns: dict[str, Any] | None
              ) -> tuple[str, float | None]:
    """The alternating turns' median ratio when they ran (and the separate sections'
    ratio beside it), else the separate sections'."""
    if turns is None or turns["median"] is None:
        return plain
    each = ", ".join(_x(x) for x in turns["per_turn"])
    return (f"alternating turns {each}: median {_x(turns['median'])}; separate sections: "
            f"{_x(plain[1])}", turns["median"])


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, measured, goal, verdict) rows."""
    def tps(server: str, clients: int) -> float | None:
        return _level(r, server, clients).get("tokens_per_s")

    generate = _rows(r, "engine_ipex_llm", "generate")
    alone = _rows(r, "engine_llama_cpp")
    ipex8 = tps("service_ipex_llm", 8)
    rows = [
        ("engine ipex_llm, 8 clients over HTTP vs ipex-llm generate at batch 8",
         *_or_turns(_measured(ipex8, generate.get(8, {}).get("tokens_per_s")),
                    _turns(r, "turns_ipex_llm", "8", "8")), ">= 0.9"),
        ("engine ipex_llm, 8 clients over HTTP vs one request at a time (generate, batch 1)",
         *_or_turns(_measured(ipex8, generate.get(1, {}).get("tokens_per_s")),
                    _turns(r, "turns_ipex_llm", "8", "1")), ">= 1.9"),
        *((f"engine ipex_llm, {c} clients over HTTP vs llama-server",
           *_measured(tps("service_ipex_llm", c), tps("llama_server", c)), "-")
          for c in (8, 16)),
        ("engine ipex_llm, replica ready (serve.run) vs the bare path (imports + "
         "load_low_bit + Ray actor start)", *_ready(r), "< 2"),
        *((f"engine {engine}, short requests' p50 latency next to long ones vs alone",
           _x(_mixed(r, engine)), _mixed(r, engine), "<= 1.5")
          for engine in ("ipex_llm", "llama_cpp")),
        *((f"engine llama_cpp, {c} clients over HTTP vs llama-server",
           *_or_turns(_measured(tps("service_llama_cpp", c), tps("llama_server", c)),
                      _turns(r, "turns_llama_cpp", str(c), str(c))), "> 1")
          for c in (8, 16)),
        ("engine llama_cpp, 8 clients over HTTP vs its engine alone at batch 8",
         *_measured(tps("service_llama_cpp", 8), alone.get(8, {}).get("tokens_per_s")),
         ">= 0.9"),
        *((f"json_schema answers vs plain ones, 8 clients, {where.replace('_', ' ')}",
           *_measured(*_structured(r, where, "8")), ">= 0.9")
          for where in ("engine_alone", "over_http")),
        *_pinned_targets(r),
    ]
    return [(name, text, goal if goal == "-" else f"{goal}{_unit(name)}",
             _verdict(value, goal)) for name, text, value, goal in rows]


def _unit(target: str) -> str:
    """The unit of a target's goal: a ratio unless the target names another."""
    return " ms" if "serving cost" in target else " cores" if "idle stack" in target else "x"


PINNED = {"pinned_demo": "demo model", "pinned_1b": "1.1B model"}


def _pinned_tps(section: dict[str, Any], engine: str, where: str, clients: int
                ) -> float | None:
    """tokens/s at ``clients`` of one row of a like-for-like section: ``alone`` (the
    engine, batch = clients), ``http``, ``handle``, or ``llama_server``."""
    if where == "llama_server":
        levels = ((section.get("llama_server") or {}).get("run") or {}).get("levels", [])
    elif where == "alone":
        rows = ((section.get(engine) or {}).get("alone") or {}).get("batches", [])
        return next((b["tokens_per_s"] for b in rows if b["batch"] == clients), None)
    else:
        service = (section.get(engine) or {}).get("service") or {}
        levels = (service.get(where) or {}).get("levels", [])
    return next((lv["tokens_per_s"] for lv in levels if lv["clients"] == clients), None)


def _pinned_targets(r: dict[str, Any]) -> list[tuple[str, str, float | None, str]]:
    rows: list[tuple[str, str, float | None, str]] = []
    for name, model in PINNED.items():
        sec = _sec(r, name)
        for engine in ("ipex_llm", "llama_cpp"):
            rows += [(f"same cores, {model}: engine {engine}, 8 clients {where} vs its engine "
                      "alone at batch 8",
                      *_measured(_pinned_tps(sec, engine, where, 8),
                                 _pinned_tps(sec, engine, "alone", 8)), ">= 0.9")
                     for where in ("http", "handle")]
        rows += [(f"same cores, {model}: engine llama_cpp, {c} clients over HTTP vs "
                  "llama-server", *_measured(_pinned_tps(sec, "llama_cpp", "http", c),
                                             _pinned_tps(sec, "", "llama_server", c)), ">= 1")
                 for c in (8, 16)]
    demo = _sec(r, "pinned_demo")
    for engine in ("ipex_llm", "llama_cpp"):
        service = (demo.get(engine) or {}).get("service") or {}
        mixed = (service.get("http") or {}).get("mixed") or {}
        rows.append((f"same cores, demo model: engine {engine}, short requests' p50 next to "
                     "long ones vs alone", _x(mixed.get("short_p50_ratio")),
                     mixed.get("short_p50_ratio"), "<= 1.5"))
        cost = (service.get("cost") or {}).get("cpu_ms_per_token")
        rows.append((f"same cores, demo model: engine {engine}, serving cost at 8 clients "
                     "(CPU ms per token outside the compute threads)",
                     f"{_num(cost, 3)} ms", cost, "<= 1"))
        idle = service.get("idle_cores")
        rows.append((f"same cores, demo model: engine {engine}, idle stack (cores)",
                     _num(idle, 3), idle, "<= 0.05"))
    return rows


def _pinned_tables(r: dict[str, Any]) -> list[str]:
    lines = ["## Same cores for everyone (bench.pinned)", "",
             "Every system computes on the same core(s) and runs everything else on the same "
             "spare core(s): the engine alone with its threads on the compute cores; our "
             "service started through the core reservation (`reserved_cores: 1`: Ray, Serve, "
             "the router and the replica's other threads on the spare core); llama-server "
             "with `-t` = compute cores, its decoding main thread on the compute core and its "
             "HTTP threads on the spare one. Load generators on the spare core. tokens/s; "
             "serving cost = CPU of the service's processes outside the model's compute "
             "threads.", ""]
    for name, model in PINNED.items():
        sec = _sec(r, name)
        lines += [f"### {model}" + (f" ({sec['model']}, {sec['workload']})"
                                    if sec.get("model") else ""), ""]
        if not _ok(sec):
            lines += _missing(r, name)
            continue
        lines.append(f"Compute CPUs {sec['compute_cpus']}, spare CPUs {sec['spare_cpus']}.")
        lines.append("")
        rows = []
        for clients in (8, 16):
            rows.append((clients, *(_num(_pinned_tps(sec, e, w, clients))
                                    for e in ("ipex_llm", "llama_cpp")
                                    for w in ("alone", "http", "handle")),
                         _num(_pinned_tps(sec, "", "llama_server", clients))))
        lines += _table(("clients", "ipex_llm alone", "ipex_llm HTTP", "ipex_llm handle",
                         "llama_cpp alone", "llama_cpp HTTP", "llama_cpp handle",
                         "llama-server"), rows)
        cost_rows = []
        for engine in ("ipex_llm", "llama_cpp"):
            service = (sec.get(engine) or {}).get("service") or {}
            cost = service.get("cost") or {}
            if cost:
                cost_rows.append((engine, _num(service.get("idle_cores"), 3),
                                  _num(cost.get("cpu_ms_per_token"), 3),
                                  _num(cost.get("outside_cpu_s"), 2), cost.get("tokens"),
                                  _num(cost.get("wall_s"), 1)))
        if cost_rows:
            lines += ["", *_table(("engine", "idle stack (cores)",
                                   "CPU ms/token outside compute, 8 clients",
                                   "outside CPU s", "tokens", "wall s"), cost_rows)]
        lines.append("")
    return lines


def _structured(r: dict[str, Any], where: str, clients: str
                ) -> tuple[float | None, float | None]:
    row = (_sec(r, "structured").get(where) or {}).get(clients) or {}
    return row.get("json_schema_tokens_per_s"), row.get("plain_tokens_per_s")


def _structured_table(r: dict[str, Any]) -> list[str]:
    rows = [(where.replace("_", " "), clients, _num(row["plain_tokens_per_s"]),
             _num(row["json_schema_tokens_per_s"]), f"{row['ratio']:.2f}x")
            for where in ("engine_alone", "over_http")
            for clients, row in (_sec(r, "structured").get(where) or {}).items()]
    return ["## Constrained decoding (bench.structured)", "",
            "Engine ipex_llm, chat answers at temperature 0.8 with and without a JSON schema "
            "(llguidance's token mask in the shared sampler), rounds alternating, medians. "
            "tokens/s.", "", *_missing(r, "structured"),
            *(_table(("where", "clients", "plain", "json_schema", "ratio"), rows)
              if rows else [])]


def _mixed(r: dict[str, Any], engine: str) -> float | None:
    return (_run(r, f"service_{engine}").get("mixed") or {}).get("short_p50_ratio")


def _ready(r: dict[str, Any]) -> tuple[str, float | None]:
    startup = _sec(r, "service_ipex_llm").get("startup") or {}
    load = _sec(r, "coldstart").get("load") or {}
    if "serve_run_to_ready_s" not in startup or "import_s" not in load:
        return NA, None
    bare = bare_load_s(load) + startup["bare_actor_start_s"]
    value = startup["serve_run_to_ready_s"] / bare
    runs = ", ".join(_num(x) for x in startup["serve_run_to_ready_runs_s"])
    return (f"{_num(startup['serve_run_to_ready_s'])} s (starts: {runs}) / "
            f"{_num(bare)} s = {_x(value)}", value)


# ---- tables -----------------------------------------------------------------------------


def _header(r: dict[str, Any]) -> list[str]:
    m, w = r["machine"], r["workload"]
    quick = " (quick smoke run: not for comparison)" if w["name"] == "quick" else ""
    prompt = next((lv["prompt_tokens"] for s in SERVERS for c in w["clients"]
                   if (lv := _level(r, s, c)).get("prompt_tokens")), None)
    return [
        f"# Benchmarks{quick}", "",
        f"Made by `{r['command']}` from the repository root (`make bench` runs "
        f"`python -m bench.run`): {m['date']} to {r.get('finished', '?')} "
        f"({r.get('total_seconds', 0) / 60:.0f} min), commit {m['git_commit']}.", "",
        f"- Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs "
        f"({m['physical_cores']} cores), {m['memory_gib']} GiB; kernel {m['kernel']}",
        f"- Stack: Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "- Checkpoints: " + ", ".join(f"{k} `{v}`" for k, v in r["checkpoints"].items()),
        f"- Workload: one fixed prompt ({prompt or NA} tokens), every answer "
        f"{w['max_tokens']} tokens (greedy, `ignore_eos`); closed-loop clients over HTTP, "
        f"each level ceil({w['min_requests']} / clients) rounds after a warm-up round. "
        "Times in ms unless marked.",
        "- Other load: CPU cores other processes used during a measurement (0.2 or more: "
        "measured once more, the quieter attempt kept).",
        "- Fields: bench/loadgen.py (`Run`, `Level`, `Mixed`, `Interleaved`) and "
        "bench/engine.py (`EngineRun`) document results.json.",
        *(["- Kept from an earlier run (`--merge`): " + ", ".join(
            f"{name} ({section['from_run']})" for name, section in r["sections"].items()
            if section.get("from_run"))]
          if any(section.get("from_run") for section in r["sections"].values()) else []),
        ""]


def _engine_tables(r: dict[str, Any]) -> list[str]:
    ipex, gen = _rows(r, "engine_ipex_llm"), _rows(r, "engine_ipex_llm", "generate")
    lcpp = _rows(r, "engine_llama_cpp")
    rows = [(b, _num(ipex.get(b, {}).get("tokens_per_s")), _num(ipex.get(b, {}).get("step_ms")),
             _num(gen.get(b, {}).get("tokens_per_s")), _num(lcpp.get(b, {}).get("tokens_per_s")),
             _num(lcpp.get(b, {}).get("step_ms")),
             _num(max(x[b]["foreign_cores"] for x in (ipex, gen, lcpp) if b in x), 2))
            for b in sorted({*ipex, *gen, *lcpp})]
    return ["## Engine alone (bench.engine)", "",
            "`step()` in a loop, the batch added at once; ipex-llm's batched `generate` on "
            "the same model (batch 1: one request at a time). tokens/s.", "",
            *_missing(r, "engine_ipex_llm", "engine_llama_cpp"),
            *_table(("batch", "ipex_llm step()", "step ms", "ipex-llm generate",
                     "llama_cpp step()", "step ms", "other load"), rows)]


def _server_tables(r: dict[str, Any]) -> list[str]:
    rows = []
    for name, label in SERVERS.items():
        for lv in _run(r, name).get("levels", []):
            rows.append((label, lv["clients"], _num(lv["tokens_per_s"]), _ms(lv["ttft_p50_s"]),
                         _ms(lv["ttft_p99_s"]), _ms(lv["tpot_p50_s"]), _ms(lv["itl_p99_s"]),
                         _ms(lv["e2e_p50_s"]), f"{lv['requests']} ({lv['errors']})",
                         lv["short_answers"], _num(lv["prompt_cached_share"], 0, 100),
                         _num(lv["foreign_cores"], 2)))
    return ["## Servers over HTTP (bench.loadgen)", "", *_missing(r, *SERVERS),
            *_table(("server", "clients", "tokens/s", "TTFT p50", "TTFT p99", "TPOT p50",
                     "ITL p99", "e2e p50", "requests (errors)", "short answers",
                     "prompt cached %", "other load"), rows)]


def _mixed_table(r: dict[str, Any]) -> list[str]:
    rows = []
    for name in ("service_ipex_llm", "service_llama_cpp"):
        if mixed := _run(r, name).get("mixed"):
            for kind in ("short", "long"):
                alone, together = mixed[f"{kind}_alone"], mixed[f"{kind}_mixed"]
                rows.append((SERVERS[name], kind, alone["max_tokens"],
                             f"{together['requests']} ({together['errors']})",
                             _ms(alone["ttft_p50_s"]), _ms(together["ttft_p50_s"]),
                             _ms(alone["e2e_p50_s"]), _ms(together["e2e_p50_s"]),
                             _x(mixed[f"{kind}_p50_ratio"]), _num(mixed["foreign_cores"], 2)))
    w = r["workload"]
    return ["## Short requests next to long ones (bench.loadgen --mixed)", "",
            f"{w['mixed_clients']} clients send {w['mixed_rounds']} short requests each, "
            f"alone, then while {w['mixed_clients']} clients keep long requests running; "
            "long alone: as many at once; long mixed: those running when the first short "
            "one came.", "",
            *_table(("server", "requests", "tokens", "n mixed (errors)", "TTFT p50 alone",
                     "TTFT p50 mixed", "e2e p50 alone", "e2e p50 mixed", "mixed / alone",
                     "other load"), rows)]


def _turn_tables(r: dict[str, Any]) -> list[str]:
    lines = ["## Alternating turns (bench.loadgen.interleave)", "",
             "Each turn starts each side afresh, alone on the machine; ratios are taken "
             "within a turn. Keys are client counts (generate: batch sizes).", "",
             *_missing(r, "turns_ipex_llm", "turns_llama_cpp")]
    for name in ("turns_ipex_llm", "turns_llama_cpp"):
        if not (found := _sec(r, name)):
            continue
        a, b = found["a"], found["b"]
        header = ["turn", "order", *(f"{a} {x['a_key']} / {b} {x['b_key']}"
                                     for x in found["ratios"])]
        rows = [(i + 1, " then ".join(turn["order"]),
                 *(f"{_num(turn['sides'][a]['tokens_per_s'].get(x['a_key']))} / "
                   f"{_num(turn['sides'][b]['tokens_per_s'].get(x['b_key']))} = "
                   f"{_x(x['per_turn'][i])}" for x in found["ratios"]))
                for i, turn in enumerate(found["turns"])]
        rows.append(("median", "", *(_x(x["median"]) for x in found["ratios"])))
        lines += [f"### `{name}`", "", *_table(header, rows)]
    return lines


def _startup_tables(r: dict[str, Any]) -> list[str]:
    load, convert = (_sec(r, "coldstart").get(k) or {} for k in ("load", "convert"))
    starts = {e: _sec(r, f"service_{e}").get("startup") or {} for e in ("ipex_llm", "llama_cpp")}
    peer = _sec(r, "llama_server")

    def runs(key: str, engine: str) -> str:
        each = starts[engine].get(f"{key}_runs_s") or []
        return _num(starts[engine].get(f"{key}_s"), 2) + \
            (f" ({', '.join(_num(x, 2) for x in each)})" if len(each) > 1 else "")

    seconds = [(f"engine ipex_llm load, fresh process: {label}", _num(load.get(key), 2))
               for key, label in (("import_s", "import torch, transformers, ipex_llm"),
                                  ("verify_s", "verify checkpoint (sha256)"),
                                  ("dynamo_import_s", "import torch._dynamo (bare path only)"),
                                  ("load_low_bit_s", "`load_low_bit`"),
                                  ("tokenizer_s", "tokenizer"),
                                  ("first_forward_s", "first forward pass"))]
    seconds += [("bare path: imports + load_low_bit (each start)",
                 ", ".join(_num(x, 2) for x in load.get("bare_load_runs_s", []))),
                ("convert GGUF -> sym_int4 checkpoint, after imports",
                 _num(convert.get("convert_s"), 2)),
                *((f"engine {e}: {label}", runs(key, e)) for e in starts
                  for key, label in (("bare_actor_start", "bare Ray actor start"),
                                     ("serve_run_to_ready", "`serve.run` to RUNNING"))),
                ("llama-server ready", _num(peer.get("ready_s"), 2))]
    memory = [("checkpoint on disk", _mib(load.get("checkpoint_bytes"))),
              ("fresh process after load + forward (VmHWM)", _mib(load.get("peak_rss_bytes"))),
              ("converting process (VmHWM)", _mib(convert.get("peak_rss_bytes"))),
              *((f"engine {e} replica: ready / after the runs (VmHWM)",
                 f"{_mib(s.get('replica_rss_ready_bytes'))} / "
                 f"{_mib(s.get('replica_peak_rss_bytes'))}") for e, s in starts.items()),
              ("llama-server after its runs (VmHWM)", _mib(peer.get("peak_rss_bytes")))]
    return ["## Start-up and memory (bench.coldstart, bench.service)", "",
            "Medians of the starts, each start in brackets.", "",
            *_missing(r, "coldstart"), *_table(("step", "seconds"), seconds),
            *_table(("what", "MiB"), memory)]


# ---- plot and file ----------------------------------------------------------------------


def write_plot(r: dict[str, Any], path: Path) -> bool:
    """tokens/s and TTFT p50 against clients; False (no plot) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = dict(zip(SERVERS, ("tab:blue", "tab:red", "tab:green"), strict=True))
    ticks: set[int] = set()
    for name, label in SERVERS.items():
        if levels := [lv for lv in _run(r, name).get("levels", [])
                      if lv["tokens_per_s"] is not None]:
            xs = [lv["clients"] for lv in levels]
            ticks.update(xs)
            left.plot(xs, [lv["tokens_per_s"] for lv in levels], "o-", color=colors[name],
                      label=label)
            right.plot(xs, [1000 * (lv["ttft_p50_s"] or math.nan) for lv in levels], "o-",
                       color=colors[name], label=label)
    for section, kind, label, color in (
            ("engine_ipex_llm", "batches", "engine ipex_llm alone", "tab:blue"),
            ("engine_ipex_llm", "generate", "ipex-llm generate", "black"),
            ("engine_llama_cpp", "batches", "engine llama_cpp alone", "tab:red")):
        if rows := _rows(r, section, kind):
            ticks.update(rows)
            left.plot(list(rows), [row["tokens_per_s"] for row in rows.values()], "x:",
                      color=color, label=f"{label} (x = batch)")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        axis.minorticks_off()
        axis.set_xlabel("concurrent clients")
        axis.grid(True, alpha=0.3)
    left.set(ylabel="output tokens/s", title="Throughput")
    right.set(ylabel="TTFT p50 (ms)", title="Time to first token", yscale="log")
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    m = r["machine"]
    fig.suptitle(f"SmolLM2-135M, {r['workload']['max_tokens']}-token answers: "
                 f"{m['cpu_model']}, {m['logical_cpus']} CPUs, {m['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def notes(text: str) -> str:
    """The hand-written part of an existing RESULTS.md, markers included."""
    start, end = text.find(NOTES_START), text.find(NOTES_END)
    if start < 0 or end < start:
        return f"{NOTES_START}\n{NO_NOTES}\n{NOTES_END}"
    return text[start:end + len(NOTES_END)]


def render(r: dict[str, Any], kept_notes: str, plot: str | None) -> str:
    lines = [*_header(r), "## Targets", "",
             *_table(("target", "measured", "goal", "verdict"), targets(r))]
    lines += [f"![throughput and TTFT]({plot})" if plot else
              "_No plot: matplotlib is not installed (`pip install -e '.[bench]'`)._", ""]
    lines += _engine_tables(r) + _server_tables(r) + _mixed_table(r) + _turn_tables(r)
    lines += _startup_tables(r) + _structured_table(r) + _pinned_tables(r)
    return "\n".join(lines).rstrip() + "\n\n" + kept_notes + "\n"


def write_report(r: dict[str, Any], out_dir: Path) -> list[Path]:
    plot, report = out_dir / "throughput.png", out_dir / "RESULTS.md"
    has_plot = write_plot(r, plot)
    old = report.read_text() if report.exists() else ""
    report.write_text(render(r, notes(old), plot.name if has_plot else None))
    return [report, out_dir / "results.json"] + ([plot] if has_plot else [])


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results.json")
    print(*write_report(json.loads(source.read_text()), source.parent), sep="\n")
