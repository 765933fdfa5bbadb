"""A real Prometheus scrapes a real daemon under a small load; every PromQL expression of the Grafana
dashboard (dashboards/kvd.json) returns data through Prometheus' HTTP API, and every series of the
README's metrics table is in what Prometheus scraped.

The load runs each path the dashboard shows: stores, lookups (one for an unknown model: a 404),
loads, a flush to SSD (demotion, encoding), an eviction from the arena, lookups that promote from SSD
(prefetch, decoding), deletions.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

from kvd.client import prefix as kvio
from kvd.core import protocol as P
from kvd.core.errors import NotFound
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec
from tests.daemon.prometheus_proc import PrometheusProc
from tests.daemon.test_metrics import readme_table
from tests.daemon_proc import DaemonProc

pytestmark = pytest.mark.skipif(PrometheusProc.binary() is None,
                                reason="needs Prometheus on PATH (Debian's prometheus; make test installs it)")

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "kvd.json"
SPEC = ModelSpec("toy", num_layers=3, num_kv_heads=2, head_dim=64, kv_dtype="bfloat16")
HM = HeadMap.from_classes("toy", [[True, False]] * 3, sink=4, window=64)
LOAD_S = 6.0
# Grafana's variables, as Grafana would fill them for "all instances" and a 1 s scrape interval.
VARIABLES = {"$__rate_interval": "30s", "$instance": ".*"}


def _cycle(c, h, i: int) -> None:
    tokens = list(range(i * 10_000, i * 10_000 + 768))
    kv = torch.randn(3, 2, 2, 768, 64, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
    kvio.store_prefix(h, tokens, kv)
    with kvio.load_prefix(h, tokens) as loaded:
        loaded.to_tensor()
    c.flush(P.FlushRequest())  # demote to SSD: encode, write
    c.evict(P.EvictRequest(tier="host"))  # leave the arena: the next load promotes from SSD
    assert kvio.lookup_prefix(h, tokens).num_prefix_hits == 3
    with kvio.load_prefix(h, tokens) as loaded:
        loaded.to_tensor()
    c.delete(P.EntriesRequest(fingerprint=h.fingerprint, hashes=h.hashes(tokens)[:1]))
    try:
        c.lookup(P.LookupRequest(fingerprint="0" * 32, prefix_hashes=[]))
    except NotFound:
        pass  # the 404 the error panels show


@pytest.fixture(scope="module")
def prom(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    (root / "kvd").mkdir()
    (root / "prom").mkdir()
    daemon = DaemonProc(root / "kvd").start()
    p = PrometheusProc(root / "prom", f"127.0.0.1:{daemon.port}")
    try:
        p.start()
        p.wait_for_scrapes(1)
        with daemon.client() as c:
            h = kvio.register(c, SPEC, HM)
            t0, i = time.monotonic(), 0
            while time.monotonic() - t0 < LOAD_S:
                _cycle(c, h, i)
                i += 1
                time.sleep(0.2)
        p.wait_for_scrapes(3)
        yield p
    finally:
        p.stop()
        daemon.kill()


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expression) for every query target of the dashboard."""
    doc = json.loads(DASHBOARD.read_text())
    panels = [q for p in doc["panels"] for q in [p, *p.get("panels", [])]]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def _fill(expr: str) -> str:
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unfilled Grafana variable in {expr}"
    return expr


def test_the_dashboard_covers_what_the_issue_names():
    titles = " ".join(t.lower() for t, _ in dashboard_exprs())
    for topic in ("tier", "hit rate", "bytes moved", "latency", "evictions", "demotions", "promotions",
                  "compression ratio", "failures", "errors", "leases"):
        assert topic in titles, topic
    assert any("kvd_lookup_tokens_total" in e and "kvd_hit_tokens_total" in e for _, e in dashboard_exprs())


def test_the_dashboard_is_well_formed_for_grafana():
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["schemaVersion"] >= 36 and {"datasource", "instance"} <= {
        v["name"] for v in doc["templating"]["list"]}
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for t in p.get("targets", []):
            assert t["refId"] and t["datasource"]["uid"] == "${datasource}", p["title"]
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])


def test_every_dashboard_query_returns_data(prom):
    empty = []
    for title, expr in dashboard_exprs():
        result = prom.query(_fill(expr))
        values = [float(r["value"][1]) for r in result]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title}: {expr} -> {values or 'no series'}")
    assert not empty, "dashboard queries without data:\n  " + "\n  ".join(empty)


def test_every_readme_series_was_scraped(prom):
    missing = []
    for names, _labels, _what in readme_table():
        for name in names:
            if name.endswith("*") or name.startswith("kvd_gpu_"):
                continue  # a wildcard; GPU telemetry (no GPU here)
            if not prom.query(f'{{__name__=~"{re.escape(name)}(_count)?", job="kvd"}}'):
                missing.append(name)
    assert not missing, f"README lists series Prometheus did not scrape: {missing}"
    (up,) = prom.query('up{job="kvd"}')
    assert up["value"][1] == "1"
