"""cluster/'s Prometheus config and Grafana dashboard refer only to metrics we define."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from deployments import metrics

ROOT = Path(__file__).resolve().parents[2]
SERIES_SUFFIXES = ("_bucket", "_sum", "_count")


def defined_series() -> set[str]:
    names = {m._name for m in vars(metrics).values() if isinstance(m, metrics._Metric)}
    return names | {n + s for n in names for s in SERIES_SUFFIXES}


def test_every_dashboard_query_names_a_defined_metric():
    dashboard = json.loads((ROOT / "cluster/grafana/ipex-llm-serve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    used = {m for e in exprs for m in re.findall(r"\$\{prefix\}(\w+)", e)}
    assert used and used <= defined_series(), used - defined_series()
    charted = {re.sub(r"_(bucket|sum|count)$", "", u) for u in used}
    assert {"llm_time_to_first_token_seconds", "llm_inter_token_latency_seconds",
            "llm_batch_size", "llm_requests_total"} <= charted


def test_prometheus_scrapes_rays_service_discovery_and_the_router():
    config = yaml.safe_load((ROOT / "cluster/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    files = jobs["ray"]["file_sd_configs"][0]["files"]
    assert files == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert jobs["ipex-llm-serve-node"]["metrics_path"] == "/metrics"
