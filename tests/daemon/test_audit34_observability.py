"""Audit 34 (observability): what ``/metrics``, the dashboard and ``kvctl stats`` show against a real
daemon, for states the other tests pass by: an empty store, a tier emptied by eviction."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvd.client import prefix as kvio
from kvd.core import protocol as P
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec
from tests.daemon.prometheus_proc import PrometheusProc
from tests.daemon.test_dashboard import dashboard_exprs
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("toy", num_layers=3, num_kv_heads=2, head_dim=64, kv_dtype="bfloat16")
HM = HeadMap.from_classes("toy", [[True, False]] * 3, sink=4, window=64)


def _gauges(port: int, *names: str) -> dict[tuple[str, str], float]:
    """``(metric, tier) -> value`` of the tier-labelled gauges ``names`` as ``/metrics`` serves them."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, s.labels["tier"]): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name in names}


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProc(tmp_path).start()
    yield d
    d.kill()


def test_tier_entries_and_segments_read_zero_for_an_empty_tier(daemon):
    """kvd_tier_entries and kvd_tier_segments had a series only for tiers holding an entry: on an empty
    store both were absent, and a tier emptied by eviction lost its series (Prometheus marks it stale)
    instead of reading 0, so the dashboard's entry and segment panels showed nothing."""
    names = ("kvd_tier_entries", "kvd_tier_segments")
    empty = _gauges(daemon.port, *names)
    assert empty == {(n, t): 0.0 for n in names for t in ("host", "ssd")}
    with daemon.client() as c:
        h = kvio.register(c, SPEC, HM)
        tokens = list(range(512))
        kvio.store_prefix(h, tokens, torch.zeros(3, 2, 2, 512, 64, dtype=torch.bfloat16))
        c.flush(P.FlushRequest())
        c.evict(P.EvictRequest(tier="host"))
        assert not c.entries(tier="host").entries and len(c.entries(tier="ssd").entries) == 2
    after = _gauges(daemon.port, *names)
    assert after[("kvd_tier_entries", "host")] == after[("kvd_tier_segments", "host")] == 0
    assert after[("kvd_tier_entries", "ssd")] == 2 and after[("kvd_tier_segments", "ssd")] == 2 * 3 * 2


@pytest.mark.skipif(PrometheusProc.binary() is None, reason="needs Prometheus on PATH")
def test_the_dashboards_tier_gauges_have_data_on_an_empty_store(daemon, tmp_path):
    """Every tier gauge panel of the dashboard answers for a fresh daemon (0 entries), per tier."""
    (tmp_path / "prom").mkdir()
    p = PrometheusProc(tmp_path / "prom", f"127.0.0.1:{daemon.port}")
    try:
        p.start()
        p.wait_for_scrapes(2)
        for title, expr in dashboard_exprs():
            if expr.startswith("sum by (tier) (kvd_tier_"):
                result = p.query(expr.replace('instance=~"$instance"', 'job="kvd"'))
                assert {r["metric"]["tier"] for r in result} == {"host", "ssd"}, (title, expr, result)
    finally:
        p.stop()


def test_tokens_of_a_load_failed_after_the_copy_are_not_also_counted_loaded(tmp_path):
    """A chunk failing its checksum after the copy (the default, checksums taken with the copy) had
    its tokens and every later one's counted in vllm:kvd_load_failed_tokens_total and, all the same,
    in vllm:kvd_loaded_tokens_total: loaded + failed came to more than the tokens the step asked for."""
    from kvd.connectors.vllm.plan import LoadSpec, StepPlan
    from tests.connectors.vllm.test_worker import NS, corrupt_chunk, make_worker, run_step, stored_prompt

    d = DaemonProc(tmp_path).start()
    try:
        src, hs = stored_prompt(d, "audit34-loaded", 7)
        corrupt_chunk(src, hs[1])
        dst = make_worker(d, "audit34-loaded", seed=8)
        assert dst.sums_with_copy
        assert run_step(dst, StepPlan(loads=(LoadSpec("b", NS, 0, hs, 0, 768, tuple(range(10, 16))),))) == {
            12, 13, 14, 15}
        assert dst.counters["checksum_failures"] == 1 and dst.counters["load_failed_tokens"] == 512
        assert dst.counters["loaded_tokens"] == 256  # chunk 0 only: vLLM recomputes the rest
    finally:
        d.kill()


def test_stray_requests_to_the_metrics_port_are_not_counted_as_control_api_errors(daemon):
    """A browser, a probe or a scraper with the wrong path on the metrics port (GET /, /favicon.ico,
    /metrics/) was answered 404 and counted in kvd_requests_total{route="unmatched", status="404"} and
    the latency histogram: the dashboard's request-error share rose with no engine request failing."""
    for path in ("/", "/favicon.ico", "/metrics/"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}{path}", timeout=10)
        assert e.value.code == 404
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics", timeout=10).read().decode()
    counted = {(s.labels["route"], s.labels["status"]): s.value for f in text_string_to_metric_families(text)
               if f.name == "kvd_requests" for s in f.samples if s.name == "kvd_requests_total" and s.value}
    assert counted == {("/v1/health", "200"): 1.0}  # DaemonProc.start's readiness probe, on the socket
