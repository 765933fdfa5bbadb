"""The connector's counters in vLLM's ``/metrics``, through vLLM 0.32's own KV-connector plumbing.

``KVConnectorProm`` is what vLLM's ``PrometheusStatLogger`` builds for the configured connector: it
finds ``KvdConnector`` by its module path, calls ``build_prom_metrics``, and feeds it the stats dict
the scheduler summed from every worker (``KvdConnectorStats.aggregate``). The connector only logged
them before.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY, generate_latest

pytestmark = pytest.mark.vllm


@pytest.fixture
def prom():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorProm
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics

    unregister_vllm_metrics()  # as PrometheusStatLogger does before it registers
    config = SimpleNamespace(kv_transfer_config=KVTransferConfig(
        kv_connector="KvdConnector", kv_connector_module_path="kvd.connectors.vllm", kv_role="kv_both"))
    yield KVConnectorProm(config, ["model_name", "engine"], {0: ["m", "0"], 1: ["m", "1"]})
    unregister_vllm_metrics()


def _series() -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for s in fam.samples:
            if s.name.startswith("vllm:kvd_") and s.name.endswith("_total"):
                out[s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"] = s.value
    return out


def test_summed_worker_stats_reach_vllms_registry(prom):
    from kvd.connectors.vllm.connector import KvdConnector

    assert prom.prom_metrics is not None  # vLLM found the hook through the connector's module path
    before = _series()
    assert before["vllm:kvd_loaded_tokens_total{engine=0,model_name=m}"] == 0  # there before any event
    assert before["vllm:kvd_store_chunks_total{engine=1,model_name=m,outcome=no_space}"] == 0
    w1 = KvdConnector.build_kv_connector_stats({"loaded_tokens": 256, "stored_chunks": 2, "load_s": 0.25})
    w2 = KvdConnector.build_kv_connector_stats({"loaded_tokens": 512, "store_no_space_chunks": 1,
                                                "lease_skipped": 3, "new_counter": 4})
    prom.observe(w1.aggregate(w2).to_dict(), engine_idx=1)
    after = _series()
    assert after["vllm:kvd_loaded_tokens_total{engine=1,model_name=m}"] == 768
    assert after["vllm:kvd_load_seconds_total{engine=1,model_name=m}"] == 0.25
    assert after["vllm:kvd_store_chunks_total{engine=1,model_name=m,outcome=stored}"] == 2
    assert after["vllm:kvd_store_chunks_total{engine=1,model_name=m,outcome=no_space}"] == 1
    assert after["vllm:kvd_calls_total{call=lease,engine=1,model_name=m,outcome=skipped}"] == 3
    assert after["vllm:kvd_events_total{engine=1,event=new_counter,model_name=m}"] == 4
    assert after["vllm:kvd_loaded_tokens_total{engine=0,model_name=m}"] == 0  # the other engine untouched


def test_stats_log_line_sums_workers():
    from kvd.connectors.vllm.stats import KvdConnectorStats

    s = KvdConnectorStats(data={"loaded_tokens": 1, "load_s": 0.123456}).aggregate(
        KvdConnectorStats(data={"loaded_tokens": 2}))
    assert s.reduce() == {"load_s": 0.1235, "loaded_tokens": 3} and not s.is_empty()
