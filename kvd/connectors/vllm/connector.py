"""``KvdConnector``: kvd as a vLLM (v1 connector API, vLLM 0.32) KV connector. A facade only.

Use it with::

    --kv-transfer-config '{"kv_connector": "KvdConnector", "kv_connector_module_path": "kvd.connectors.vllm",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"socket": "/run/kvd/kvd.sock", "namespace": "prod"}}'

vLLM builds the class twice: in the EngineCore process with the scheduler role and in each worker
with the worker role. Every hook delegates: scheduler hooks to ``SchedulerPlanner``
(``scheduler``: lookups, which entries to load and save), worker hooks to ``WorkerIO`` (``worker``:
leases and reservations through ``kvd.client.transfer``, per-layer copies through ``copy``), both over
one ``kvd.client.session.DaemonSession`` (registration, circuit breaker, counters) opened with the
validated extra config (``settings``). The session's counters reach vLLM's log lines and its
``/metrics`` through the KV-connector stats hooks (``stats``). docs/vllm.md is the user guide.

Under tensor parallelism each worker stores and loads its own rank's KV heads as a model of its own
(``[tp<rank>/<size>]`` in its model id); the scheduler offers a chunk only when every rank holds it.

Decisions (the reasons are in those modules): a request whose chunks must first come back from SSD
or the remote store waits unscheduled while the daemon promotes them (``get_num_new_matched_tokens``
answers None), so no step waits for a disk; loads are synchronous and layer by layer; saves are
synchronous within the step that completes a chunk, so ``request_finished`` never delays freeing
blocks; ``requires_kv_delivery`` is False (a cache, not a hand-off); only prompt entries are stored
(full chunks and the tail entry, with prefix aliases); ``kv_role`` ``kv_consumer`` only loads,
``kv_producer`` only stores.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvd.connectors.vllm.copy import make_copier
from kvd.connectors.vllm.layout import probe_block_layout
from kvd.connectors.vllm.plan import StepPlan
from kvd.connectors.vllm.scheduler import SchedulerPlanner
from kvd.connectors.vllm.settings import (
    ConnectorSettings,
    load_head_map,
    model_spec_from_vllm,
    open_session,
    tp_size,
)
from kvd.connectors.vllm.stats import KvdConnectorStats, KvdPromMetrics
from kvd.connectors.vllm.strided import StridedCopier
from kvd.connectors.vllm.worker import WorkerIO

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from kvd.core.headmap import HeadMap
    from kvd.core.keys import ModelSpec

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = ("0.32",)  # the connector API and KV layouts this module was written and tested against


class KvdConnectorMetadata(KVConnectorMetadata):
    """One step's plan, pickled from the scheduler to the workers."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


def _tp_rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())


def _tp_min(values: list[int]) -> list[int]:
    """Element-wise minimum over the tensor-parallel ranks (``kvd.connectors.vllm.failures``), on vLLM's
    CPU (gloo) group of the TP ranks."""
    import torch.distributed as dist
    from vllm.distributed.parallel_state import get_tp_group

    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=get_tp_group().cpu_group)
    return t.tolist()


def _route_logs_through_vllm() -> None:
    """kvd's modules log under ``kvd.*``; inside vLLM, show them the way vLLM shows its own logs."""
    kvd_logger = logging.getLogger("kvd")
    if not kvd_logger.handlers:
        for handler in logging.getLogger("vllm").handlers:
            kvd_logger.addHandler(handler)
        kvd_logger.setLevel(logging.getLogger("vllm").level or logging.INFO)
        kvd_logger.propagate = False


class KvdConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _route_logs_through_vllm()
        tc = self._kv_transfer_config
        self.settings = ConnectorSettings.parse(tc.kv_connector_extra_config)
        is_scheduler = role == KVConnectorRole.SCHEDULER
        # Tensor parallelism: each worker keys its own rank's heads as a model of its own; the scheduler
        # holds rank 0's model (its keys seed every rank's) and looks the others up through ``shards``.
        tp = tp_size(vllm_config)
        rank = 0 if is_scheduler or tp == 1 else _tp_rank()
        whole = model_spec_from_vllm(vllm_config, kv_cache_config, self.settings, tp_rank=None) if tp > 1 else None

        def rank_spec(r: int) -> tuple[ModelSpec, HeadMap | None]:  # a rank's model and its part of the head map
            s = model_spec_from_vllm(vllm_config, kv_cache_config, self.settings, tp_rank=r)
            return s, load_head_map(self.settings, s, whole=whole, rank=r, size=tp)

        self.block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        self.session = open_session(self.settings, *rank_spec(rank),
                                    block_size=self.block_size, role="scheduler" if is_scheduler else "worker")
        self._reported: Counter[str] = Counter()
        self.planner: SchedulerPlanner | None = None
        self.worker: WorkerIO | None = None
        if is_scheduler:
            if tc.kv_load_failure_policy != "recompute":
                logger.warning("kv_load_failure_policy is %r: a chunk evicted or a daemon lost between lookup and "
                               "load fails the request; set \"kv_load_failure_policy\": \"recompute\" in "
                               "--kv-transfer-config so vLLM recomputes instead", tc.kv_load_failure_policy)
            shards = [open_session(self.settings, *rank_spec(r), block_size=self.block_size,
                                   role=f"scheduler (tp rank {r})", client=self.session.client) for r in range(1, tp)]
            self.planner = SchedulerPlanner(self.session, self.settings, block_size=self.block_size,
                                            can_load=tc.is_kv_consumer, can_save=tc.is_kv_producer, shards=shards)
        self.session.require_compatible()

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # best-effort cache: a dropped save is a future miss, never a failed request

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # per-layer loads and saves cannot be captured in a CUDA graph

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KvdConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVConnectorPromMetrics | None:
        return KvdPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)  # vLLM's /metrics

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        now = Counter({k: v for k, v in self.session.counters.items() if v})
        delta = {k: v - self._reported.get(k, 0) for k, v in now.items() if v != self._reported.get(k, 0)}
        self._reported = now
        return KvdConnectorStats(data=delta) if delta else None

    # ---- worker side ------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        ordered = {n: kv_caches[n] for n in names}
        attn = self._vllm_config.compilation_config.static_forward_context[names[0]]

        def engine_write(key, value, kv, slots) -> None:  # the backend's own cache write, for the probe
            attn.impl.do_kv_cache_update(attn, key, value, kv, slots)

        layout = probe_block_layout(engine_write, ordered[names[0]])
        copier = make_copier(layout.to(ordered[names[0]].device), ordered[names[0]])
        by_engine = isinstance(copier, StridedCopier) and copier.adopt_engine_write(engine_write, ordered[names[0]])
        self.worker = WorkerIO(self.session, self.settings, ordered, copier, block_size=self.block_size,
                               num_blocks=self._kv_cache_config.num_blocks,
                               recompute_failures=self._kv_transfer_config.kv_load_failure_policy == "recompute",
                               merge_failures=_tp_min if tp_size(self._vllm_config) > 1 else None)
        logger.info("kvd worker: %d layers, KV block layout %s (%s), copies by %s%s", len(names), layout.name,
                    self._vllm_config.cache_config.kv_cache_layout, type(copier).__name__,
                    ", loads packed by the engine's cache write" + (
                        ", head-split entries straight from their extents" if copier.engine_split else
                        ", head-split entries through the staging (its write failed the head-view check)")
                    if by_engine else "")

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None and isinstance(connector_metadata, KvdConnectorMetadata):
            self.worker.begin_step(connector_metadata.plan)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.start_loads()

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.worker is not None:
            self.worker.load_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.save_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        if self.worker is not None:
            self.worker.end_step()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors() if self.worker is not None else set()

    def shutdown(self) -> None:
        c = self.session.counters
        logger.info("kvd %s shutting down: %s", self.session.role,
                    ", ".join(f"{k}={round(v, 3)}" for k, v in sorted(c.items())) or "no traffic")
        self.session.close()

    # ---- scheduler side ---------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.planner is not None, "scheduler hook called on a worker-role connector"
        return self.planner.num_new_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self.planner is not None, "scheduler hook called on a worker-role connector"
        self.planner.after_alloc(request, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        assert self.planner is not None, "scheduler hook called on a worker-role connector"
        by_tier = self.planner.hit_sources(request, num_external_tokens)
        if not by_tier:
            return super().get_external_cache_hit_sources(request, num_external_tokens)
        return {CacheHitSource.HOST if t == "host" else CacheHitSource.DISK: n for t, n in by_tier.items()}

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.planner is not None, "scheduler hook called on a worker-role connector"
        return KvdConnectorMetadata(self.planner.build(scheduler_output))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self.planner is not None and connector_output.invalid_block_ids:
            self.planner.on_load_errors(connector_output.invalid_block_ids)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.planner is not None:
            self.planner.finished(request.request_id)
        return False, None  # saves completed inside their step: the blocks may be freed now
