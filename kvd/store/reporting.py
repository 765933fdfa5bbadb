"""Read-only views of the store for ``kvctl`` and the admin routes: entry listings, stats, models.

Kept apart from the store's operations because nothing here changes state: these functions walk the
index and the metrics registry and build protocol models. Counters come from the daemon's one
counter source, its Prometheus registry, so ``kvctl stats`` and ``/metrics`` always agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvd.core import protocol as P

if TYPE_CHECKING:
    from kvd.store.store import Store


def list_entries(store: Store, *, fingerprint: str | None = None, namespace: str | None = None,
                 tier: str | None = None, limit: int = 1000) -> P.EntriesResponse:
    now = store.clock()
    out = []
    for e in store.index:
        if (fingerprint and e.fingerprint != fingerprint) or (namespace and e.namespace != namespace):
            continue
        tiers = e.tiers()
        if tier and tier not in tiers:
            continue
        if len(out) == limit:
            return P.EntriesResponse(entries=out, truncated=True)
        out.append(P.EntryInfo(hash=e.hash, namespace=e.namespace, fingerprint=e.fingerprint, kind=e.kind,
                               num_tokens=e.num_tokens, tiers=tiers, nbytes=e.kept_nbytes, pinned=e.pinned,
                               leases=e.holds, reuse_count=e.reuse_count, age_s=now - e.created,
                               idle_s=now - e.last_access))
    return P.EntriesResponse(entries=out, truncated=False)


def entry_counts(store: Store) -> dict[str, tuple[int, int]]:
    """``tier -> (entries, segments)`` for the metrics collector."""
    counts: dict[str, list[int]] = {}
    for e in store.index:
        for x in e.extents.values():
            for t in x.copies:
                counts.setdefault(t, [0, 0])[1] += x.plan.num_segments
        for t in e.tiers():
            counts.setdefault(t, [0, 0])[0] += 1
    return {t: (c[0], c[1]) for t, c in counts.items()}


def counters(store: Store) -> dict[str, float]:
    """Every counter of the daemon's registry as ``name{label="value",...} -> value`` (the sample
    names ``/metrics`` shows), plus the compression ratio of each codec that encoded something."""
    out: dict[str, float] = {}
    for metric in store.metrics.registry.collect():
        if metric.type != "counter":
            continue
        for s in metric.samples:
            if not s.name.endswith("_total"):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    for codec in ("raw", "lossless", "fp8", "int8"):
        raw = out.get(f'kvd_codec_raw_bytes_total{{codec="{codec}",op="encode"}}', 0.0)
        enc = out.get(f'kvd_codec_encoded_bytes_total{{codec="{codec}",op="encode"}}', 0.0)
        if raw and enc:
            out[f"compression_ratio_{codec}"] = raw / enc
    return out


def stats(store: Store) -> P.StatsResponse:
    c = counters(store)
    hits: dict[str, int] = {}
    for name, value in c.items():
        if name.startswith("kvd_hit_tokens_total{"):
            tier = name.split('tier="', 1)[1].split('"', 1)[0]
            hits[tier] = hits.get(tier, 0) + int(value)
    lookups = int(sum(v for k, v in c.items() if k.startswith("kvd_lookup_tokens_total")))
    return P.StatsResponse(
        uptime_s=store.clock() - store.started_at,
        tiers=[P.TierStatsBody(name=s.name, capacity_bytes=s.capacity_bytes, used_bytes=s.used_bytes,
                               num_records=s.num_records) for s in store.tier_stats()],
        num_entries=len(store.index), num_models=len(store.registry.models), leases_held=len(store.holds.leases),
        reservations_open=len(store.holds.reservations), lookup_tokens=lookups, hit_tokens_by_tier=hits,
        counters=c)


def models_info(store: Store, counted: Callable[[str], bool] | None = None) -> P.ModelsResponse:
    """Every registered model, with the entries and bytes of those namespaces ``counted`` accepts (None: all)."""
    per_model: dict[str, tuple[int, dict[str, int]]] = {fp: (0, {}) for fp in store.registry.models}
    for e in store.index:
        if counted is not None and not counted(e.namespace):
            continue
        n, by_tier = per_model.setdefault(e.fingerprint, (0, {}))
        for x in e.extents.values():
            for t in x.copies:
                by_tier[t] = by_tier.get(t, 0) + x.nbytes
        per_model[e.fingerprint] = (n + 1, by_tier)
    out = []
    for m in store.registry.models.values():
        s = m.spec
        n, by_tier = per_model[m.fingerprint]
        out.append(P.ModelInfo(fingerprint=m.fingerprint, model_id=s.model_id, revision=s.revision,
                               num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                               kv_dtype=s.kv_dtype, layout=s.layout, head_map_method=m.head_map.method,
                               num_global_heads=m.num_global_heads, num_entries=n, bytes_by_tier=by_tier))
    return P.ModelsResponse(models=out)
