"""Prometheus metrics of the daemon, and NVML GPU telemetry where a GPU exists.

Every metric lives in the daemon's own ``CollectorRegistry`` (never the global one), so several
daemons in one test process do not collide. Names are ``kvd_*`` in base units (bytes, seconds),
counters end in ``_total``, and every hit counter has its denominator: ``kvd_lookup_tokens_total``
(tokens asked about) beside ``kvd_hit_tokens_total{tier, head_class}`` (tokens found).

Tier gauges are read at scrape time from the store (a callback collector), so they are never stale.
GPU metrics are *absent* on machines without an NVIDIA GPU or NVML, not zero.

What ``/metrics`` serves (``served``): the registry without ``_created`` series (one per labelled child,
which no dashboard reads and which doubled the exposition), with ``process_*`` (CPU, memory, open
files), ``python_info`` and ``kvd_build_info{version, distribution, api, python}``. Every labelled
counter has its known children from the start (kinds, tiers, directions, head classes, codecs,
reasons), so ``rate()`` and ratios work before the first event instead of the series being absent.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvd import __version__
from kvd.codecs.framing import CODEC_NAMES
from kvd.core.extents import HEAD_CLASSES
from kvd.core.protocol import API_VERSION
from kvd.daemon.collector import GENERATIONS as GC_GENERATIONS
from kvd.tiers.base import TierStats

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
DISTRIBUTION = "kvd-cache"
# Label values known before any event (the store passes these; a new one just appears when first used).
ENTRY_KINDS = ("prefix", "chunk")
LEASE_REASONS = ("ttl", "owner_died")
ERROR_KINDS = ("internal", "promote", "background")
TIER_ERROR_OPS = ("read", "find")


class _TierCollector(Collector):
    def __init__(self, read: Callable[[], list[TierStats]], read_entries: Callable[[], dict[str, tuple[int, int]]],
                 on_tiers: Callable[[list[str]], None]):
        self._read = read
        self._read_entries = read_entries
        self._on_tiers = on_tiers  # a tier that joins later (the remote one) gets its children too

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily("kvd_tier_used_bytes", "Bytes held in the tier", labels=["tier"])
        cap = GaugeMetricFamily("kvd_tier_capacity_bytes", "Capacity of the tier in bytes", labels=["tier"])
        ents = GaugeMetricFamily("kvd_tier_entries", "Entries with at least one extent in the tier", labels=["tier"])
        segs = GaugeMetricFamily("kvd_tier_segments", "(entry, layer, KV head) segments in the tier", labels=["tier"])
        stats = self._read()
        self._on_tiers([s.name for s in stats])
        counts = self._read_entries()  # only tiers holding something: an empty one reads 0, not absent
        for s in stats:
            used.add_metric([s.name], s.used_bytes)
            cap.add_metric([s.name], s.capacity_bytes)
            num_entries, num_segments = counts.get(s.name, (0, 0))
            ents.add_metric([s.name], num_entries)
            segs.add_metric([s.name], num_segments)
        yield from (used, cap, ents, segs)


class _NvmlCollector(Collector):
    """GPU memory, utilisation and PCIe throughput per device, through nvidia-ml-py."""

    def __init__(self, nvml) -> None:  # the imported pynvml module, initialised
        self._nvml = nvml
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nv = self._nvml
        mem_used = GaugeMetricFamily("kvd_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        mem_total = GaugeMetricFamily("kvd_gpu_memory_total_bytes", "GPU memory in total", labels=["gpu"])
        util = GaugeMetricFamily("kvd_gpu_utilization_ratio", "GPU utilisation (0-1)", labels=["gpu"])
        pcie = GaugeMetricFamily("kvd_gpu_pcie_bytes_per_second", "PCIe throughput", labels=["gpu", "direction"])
        for i, h in enumerate(self._handles):
            try:
                m = nv.nvmlDeviceGetMemoryInfo(h)
                mem_used.add_metric([str(i)], m.used)
                mem_total.add_metric([str(i)], m.total)
                util.add_metric([str(i)], nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
                for direction, counter in (("tx", nv.NVML_PCIE_UTIL_TX_BYTES), ("rx", nv.NVML_PCIE_UTIL_RX_BYTES)):
                    # NVML reports KB/s over a 20 ms window.
                    pcie.add_metric([str(i), direction], nv.nvmlDeviceGetPcieThroughput(h, counter) * 1024.0)
            except Exception:  # noqa: BLE001 - telemetry must never break a scrape
                logger.debug("NVML read failed for GPU %d", i, exc_info=True)
        yield from (mem_used, mem_total, util, pcie)


def _nvml_collector() -> Collector | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        return _NvmlCollector(pynvml)
    except Exception:  # noqa: BLE001 - no driver, no library, no GPU: GPU metrics are absent
        return None


class _Served:
    """The registry as ``/metrics`` serves it: without ``_created`` samples. prometheus_client's
    switch for that (``disable_created_metrics``) is process-wide; this keeps it to the daemon's
    registry. ``restricted_registry`` serves ``?name[]=...`` scrapes."""

    def __init__(self, registry: CollectorRegistry | Iterable) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for m in self._registry.collect():
            m.samples = [s for s in m.samples if not s.name.endswith("_created")]
            yield m

    def restricted_registry(self, names: Iterable[str]) -> _Served:
        return _Served(self._registry.restricted_registry(names))


class Metrics:
    """All of the daemon's metrics. The store and the API update them; ``/metrics`` renders them."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.served = _Served(r)
        self._tiers_known: tuple[str, ...] = ()
        self._routes_known: frozenset[str] = frozenset()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info("kvd_build", "The running kvd: version, distribution, control API version, Python", registry=r).info(
            {"version": __version__, "distribution": DISTRIBUTION, "api": API_VERSION,
             "python": platform.python_version()})
        self.lookup_tokens = Counter("kvd_lookup_tokens", "Tokens asked about by lookups", ["kind"], registry=r)
        self.local_lookups = Counter(
            "kvd_local_lookups", "Lookups clients answered from the shared lookup index without a round trip "
            "(reported afterwards; kvd.client.local_lookup)", registry=r)
        self.hit_tokens = Counter(
            "kvd_hit_tokens", "Tokens a reader can load, found by lookups (leading complete prefix entries, "
            "complete chunk entries), by the tier they are read from", ["kind", "tier"], registry=r)
        self.moved_bytes = Counter(
            "kvd_moved_bytes", "Bytes moved, by direction (store: engine->arena or GPU pool, load: the reverse, "
            "demote: down to a tier, promote: up from a tier) and the tier on the far side (host or gpu for "
            "store/load)",
            ["direction", "tier"], registry=r)
        self.moved_seconds = Counter(
            "kvd_moved_seconds", "Seconds spent moving bytes, by direction and tier (client-reported for "
            "store/load)", ["direction", "tier"], registry=r)
        self.route_latency = Histogram(
            "kvd_request_duration_seconds", "Control API request latency by route", ["route"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("kvd_requests", "Control API requests by route and status", ["route", "status"],
                                registry=r)
        self.leases_held = Gauge("kvd_leases_held", "Read leases currently held", registry=r)
        self.leases_expired = Counter("kvd_leases_expired", "Leases taken back (TTL or client death)", ["reason"],
                                      registry=r)
        self.reservations_open = Gauge("kvd_reservations_open", "Reservations not yet committed", registry=r)
        self.reservations_expired = Counter("kvd_reservations_expired", "Reservations taken back uncommitted",
                                            registry=r)
        self.committed_entries = Counter("kvd_committed_entries", "Entries committed", ["kind"], registry=r)
        self.no_space = Counter("kvd_reserve_no_space", "Entries refused because nothing could be evicted",
                                registry=r)
        self.evicted_entries = Counter("kvd_evicted_entries", "Entries (or their extents) evicted from a tier",
                                       ["tier"], registry=r)
        self.checksum_failures = Counter("kvd_checksum_failures", "Extents whose bytes failed verification",
                                         ["tier"], registry=r)
        self.demotions = Counter("kvd_demotions", "Extents written down to a tier (write-back, demotion)",
                                 ["tier", "head_class"], registry=r)
        self.promotions = Counter("kvd_promotions", "Extents read from a tier into the arena", ["tier", "head_class"],
                                  registry=r)
        self.admission_refusals = Counter("kvd_admission_refusals", "Lookups of entries not (yet) admitted below "
                                          "the arena", registry=r)
        self.background_yield_seconds = Counter(
            "kvd_background_yield_seconds", "Seconds write-back and write-through batches waited for engines' "
            "loads (ssd.yield_to_loads_s)", registry=r)
        self.prefetch_latency = Histogram("kvd_prefetch_duration_seconds", "Promotion latency per entry",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.prefetches = Counter("kvd_prefetches", "Promotions that brought every extent asked into the arena", registry=r)
        self.prefetch_failures = Counter("kvd_prefetch_failures", "Promotions that found no room", registry=r)
        self.tier_writes = Counter("kvd_tier_writes", "Records written to a tier", ["tier"], registry=r)
        self.tier_write_failures = Counter("kvd_tier_write_failures", "Records a tier could not take", ["tier"],
                                           registry=r)
        self.tier_drops = Counter("kvd_tier_drops", "Records deleted from a blocking tier", ["tier"], registry=r)
        self.tier_errors = Counter("kvd_tier_errors", "Operations a tier could not do (unreachable, timeout, "
                                   "unreadable)", ["tier", "op"], registry=r)
        self.tier_misses = Counter("kvd_tier_misses", "Copies the index expected that a tier no longer held "
                                   "(evicted by the remote cluster)", ["tier"], registry=r)
        self.tier_io_seconds = Histogram("kvd_tier_io_seconds", "Latency of blocking tier operations",
                                         ["tier", "op"], buckets=LATENCY_BUCKETS, registry=r)
        self.dropped_cold_extents = Counter("kvd_dropped_cold_extents", "Cold local-head extents let go by "
                                            "placement (codec.local_cold_codec = drop)", registry=r)
        self.trimmed_bytes = Counter("kvd_trimmed_bytes", "KV bytes let go at commit by trimming local-head extents "
                                     "to the tokens readers read (capacity mode)", registry=r)
        self.recovered_entries = Counter("kvd_recovered_entries", "Entries rebuilt from persistent tiers at start",
                                         registry=r)
        self.codec_raw_bytes = Counter("kvd_codec_raw_bytes", "Raw bytes through a codec", ["codec", "op"],
                                       registry=r)
        self.codec_encoded_bytes = Counter("kvd_codec_encoded_bytes", "Encoded bytes through a codec",
                                           ["codec", "op"], registry=r)
        self.codec_seconds = Counter("kvd_codec_seconds", "Seconds spent in a codec", ["codec", "op"], registry=r)
        self.errors = Counter("kvd_errors", "Handled failures by kind", ["kind"], registry=r)
        self.gc_pauses = Histogram("kvd_gc_pause_seconds", "Pauses of Python's cyclic garbage collector by generation "
                                   "(maintenance: the periodic full pass; kvd.daemon.collector)", ["generation"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.gc_frozen = Gauge("kvd_gc_frozen_objects", "Objects frozen out of the collector's scans", registry=r)
        self._init_children()

    def _init_children(self) -> None:
        for kind in ENTRY_KINDS:
            self.lookup_tokens.labels(kind)
            self.committed_entries.labels(kind)
        for reason in LEASE_REASONS:
            self.leases_expired.labels(reason)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        for generation in GC_GENERATIONS:
            self.gc_pauses.labels(generation)
        for codec in CODEC_NAMES.values():
            self.codec_raw_bytes.labels(codec, "encode")
            self.codec_encoded_bytes.labels(codec, "encode")  # decodes count raw bytes and seconds only
            self.codec_raw_bytes.labels(codec, "decode")
            for op in ("encode", "decode"):
                self.codec_seconds.labels(codec, op)
        for direction in ("store", "load"):  # between engines and the arena, the top tier
            self.moved_bytes.labels(direction, "host")
            self.moved_seconds.labels(direction, "host")

    def init_tiers(self, names: list[str]) -> None:
        """Children of the tier-labelled counters for ``names`` (top first: the arena, then the
        tiers below it, which demotions write to and promotions read from)."""
        if tuple(names) == self._tiers_known:
            return
        self._tiers_known = tuple(names)
        for tier in names:
            if tier == "gpu":  # engines store into and load from the GPU pool too
                for direction in ("store", "load"):
                    self.moved_bytes.labels(direction, tier)
                    self.moved_seconds.labels(direction, tier)
            self.evicted_entries.labels(tier)
            self.checksum_failures.labels(tier)
            for kind in ENTRY_KINDS:
                self.hit_tokens.labels(kind, tier)
        for tier in names[1:]:
            for direction in ("demote", "promote"):
                self.moved_bytes.labels(direction, tier)
                self.moved_seconds.labels(direction, tier)
            for head_class in HEAD_CLASSES:
                self.demotions.labels(tier, head_class)
                self.promotions.labels(tier, head_class)
            for counter in (self.tier_writes, self.tier_write_failures, self.tier_drops, self.tier_misses):
                counter.labels(tier)
            for op in TIER_ERROR_OPS:
                self.tier_errors.labels(tier, op)

    def init_routes(self, routes: Iterable[str]) -> None:
        """A ``status="200"`` request count per control route (the latency histogram's children
        come with the first request: 16 zero buckets per unused route are noise, not a signal)."""
        routes = frozenset(routes)
        if routes <= self._routes_known:
            return
        self._routes_known |= routes
        for route in routes:
            self.requests.labels(route, "200")

    def attach_tiers(self, read: Callable[[], list[TierStats]],
                     read_entries: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self.init_tiers([s.name for s in read()])
        self.registry.register(_TierCollector(read, read_entries, self.init_tiers))

    def attach_gpu(self) -> bool:
        c = _nvml_collector()
        if c is not None:
            self.registry.register(c)
        return c is not None
