"""The connector's counters in vLLM's own logs and ``/metrics`` (vLLM 0.32's KV-connector stats hooks).

Flow: each worker's and the scheduler's ``get_kv_connector_stats`` hands vLLM the change of its
session counters since the last call (``KvdConnectorStats``); vLLM sums them across workers
(``aggregate``), logs them (``reduce``) and passes the summed dict to ``KvdPromMetrics.observe`` in the
API server process, which adds them to counters registered through vLLM's metric classes, labelled
``model_name`` and ``engine`` like vLLM's own series. Names start ``vllm:kvd_`` (vLLM unregisters
``vllm:*`` collectors when it rebuilds its loggers).

``vllm:kvd_store_chunks_total{outcome}`` counts every chunk a save touched: ``stored``, ``exists``
(already in the daemon), ``no_space``, ``aborted``, ``failed``. ``vllm:kvd_calls_total{call, outcome}``
counts daemon calls not made (``skipped``: circuit breaker open) or refused by the daemon.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

# session counter -> (metric name without "vllm:kvd_" and "_total", documentation)
COUNTERS = {
    "lookups": ("lookups", "Prompt lookups kvd answered (re-polls of a waiting request included)"),
    "lookup_hit_tokens": ("lookup_hit_tokens", "Tokens vLLM took from kvd beyond its own prefix cache"),
    "loaded_tokens": ("loaded_tokens", "Tokens loaded from kvd into vLLM's KV cache"),
    "load_failed_tokens": ("load_failed_tokens", "Tokens offered but not loaded (vLLM recomputed them)"),
    "checksum_failures": ("checksum_failures", "Extents whose bytes failed verification before a load"),
    "promote_waits": ("promote_waits", "Requests held unscheduled while their chunks came up from SSD or remote"),
    "promote_wait_timeouts": ("promote_wait_timeouts", "Of those, the ones scheduled after load_wait_s "
                              "with only the chunks that had arrived"),
    "promote_wait_s": ("promote_wait_seconds", "Seconds requests were held unscheduled for promotions"),
    "decode_chunks_planned": ("decode_chunks_planned", "Chunks of generated tokens the scheduler planned to save"),
    "requests_not_keyed": ("requests_not_keyed", "Requests kvd could not key (no token ids)"),
    "daemon_failures": ("daemon_failures", "Failed daemon calls (each opens the circuit breaker)"),
    "load_s": ("load_seconds", "Seconds workers spent loading KV from kvd"),
    "save_s": ("save_seconds", "Seconds workers spent saving KV to kvd"),
}
STORE_OUTCOMES = {"stored_chunks": "stored", "store_exists_chunks": "exists", "store_no_space_chunks": "no_space",
                  "store_aborted_chunks": "aborted", "store_failed_chunks": "failed"}
CALL_OUTCOMES = ("skipped", "refused")  # session counters "<call>_skipped", "<call>_refused"
CALLS = ("lookup", "lease", "renew", "release", "reserve", "commit", "abort")  # the vLLM connector's session calls


class KvdConnectorStats(KVConnectorStats):
    """kvd's counters for one interval (``loaded_tokens``, ``stored_chunks``, ``load_failed_tokens``,
    ``lookup_hit_tokens``, ``load_s``, ``save_s``, ...), summed across workers and the scheduler."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KvdConnectorStats:
        out = dict(self.data)
        for k, v in other.data.items():
            out[k] = out.get(k, 0) + v
        return KvdConnectorStats(data=out)

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in sorted(self.data.items())}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KvdPromMetrics(KVConnectorPromMetrics):
    """kvd's counters, registered through vLLM's metric classes, one child per engine."""

    def __init__(self, vllm_config, metric_types, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {key: create_metric_per_engine(
            self._counter_cls(name=f"vllm:kvd_{name}_total", documentation=doc, labelnames=labelnames),
            per_engine_labelvalues) for key, (name, doc) in COUNTERS.items()}
        self._stores = self._counter_cls(name="vllm:kvd_store_chunks_total", labelnames=labelnames + ["outcome"],
                                         documentation="Chunks a save touched, by outcome")
        self._calls = self._counter_cls(name="vllm:kvd_calls_total", labelnames=labelnames + ["call", "outcome"],
                                        documentation="Daemon calls not made (skipped: breaker open) or refused")
        self._other = self._counter_cls(name="vllm:kvd_events_total", labelnames=labelnames + ["event"],
                                        documentation="Other connector counters, by name")
        for values in per_engine_labelvalues.values():
            for outcome in STORE_OUTCOMES.values():
                self._stores.labels(*values, outcome)
            for call in CALLS:
                for outcome in CALL_OUTCOMES:
                    self._calls.labels(*values, call, outcome)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        values = self.per_engine_labelvalues[engine_idx]
        for key, amount in transfer_stats_data.items():
            if amount <= 0:
                continue
            if key in self._counters:
                self._counters[key][engine_idx].inc(amount)
            elif key in STORE_OUTCOMES:
                self._stores.labels(*values, STORE_OUTCOMES[key]).inc(amount)
            elif key.rsplit("_", 1)[-1] in CALL_OUTCOMES:
                call, outcome = key.rsplit("_", 1)
                self._calls.labels(*values, call, outcome).inc(amount)
            else:
                self._other.labels(*values, key).inc(amount)
