"""Read-only views of the store for ``kvctl`` and the admin routes: entry listings, stats, models.

Kept apart from ``kvd.store`` because nothing here changes state: these functions walk the index and
the metrics registry and build protocol models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvd.core import protocol as P

if TYPE_CHECKING:
    from kvd.store.store import Store


def list_entries(store: Store, *, fingerprint: str | None = None, namespace: str | None = None,
                 tier: str | None = None, limit: int = 1000) -> P.EntriesResponse:
    now = store.clock()
    out = []
    for e in store.iter_entries():
        if (fingerprint and e.fingerprint != fingerprint) or (namespace and e.namespace != namespace):
            continue
        tiers = e.tiers()
        if tier and tier not in tiers:
            continue
        if len(out) == limit:
            return P.EntriesResponse(entries=out, truncated=True)
        out.append(P.EntryInfo(hash=e.hash, namespace=e.namespace, fingerprint=e.fingerprint, kind=e.kind,
                               num_tokens=e.num_tokens, tiers=tiers, nbytes=e.nbytes, pinned=e.pinned,
                               leases=e.leases, reuse_count=e.reuse_count, age_s=now - e.created,
                               idle_s=now - e.last_access))
    return P.EntriesResponse(entries=out, truncated=False)


def entry_counts(store: Store) -> dict[str, tuple[int, int]]:
    """``tier -> (entries, segments)`` for the metrics collector."""
    counts: dict[str, list[int]] = {}
    for e in store.iter_entries():
        for x in e.extents.values():
            for t in x.tiers():
                counts.setdefault(t, [0, 0])[1] += x.plan.num_segments
        for t in e.tiers():
            counts.setdefault(t, [0, 0])[0] += 1
    return {t: (c[0], c[1]) for t, c in counts.items()}


def stats(store: Store) -> P.StatsResponse:
    hits: dict[str, int] = {}
    lookups = 0
    for metric in store.metrics.registry.collect():
        for s in metric.samples:
            if s.name == "kvd_hit_tokens_total":
                hits[s.labels["tier"]] = hits.get(s.labels["tier"], 0) + int(s.value)
            elif s.name == "kvd_lookup_tokens_total":
                lookups += int(s.value)
    counters = store.mover.counters() if store.mover is not None else {}
    return P.StatsResponse(
        uptime_s=store.clock() - store.started_at,
        tiers=[P.TierStatsBody(name=s.name, capacity_bytes=s.capacity_bytes, used_bytes=s.used_bytes,
                               num_records=s.num_records) for s in store.tier_stats()],
        num_entries=store.num_entries(), num_models=len(store.models), leases_held=store.num_leases(),
        reservations_open=store.num_reservations(), lookup_tokens=lookups, hit_tokens_by_tier=hits,
        counters=counters)


def models_info(store: Store) -> P.ModelsResponse:
    per_model: dict[str, tuple[int, dict[str, int]]] = {fp: (0, {}) for fp in store.models}
    for e in store.iter_entries():
        n, by_tier = per_model.setdefault(e.fingerprint, (0, {}))
        for x in e.extents.values():
            for t in x.tiers():
                by_tier[t] = by_tier.get(t, 0) + x.nbytes
        per_model[e.fingerprint] = (n + 1, by_tier)
    out = []
    for m in store.models.values():
        s = m.spec
        n, by_tier = per_model[m.fingerprint]
        out.append(P.ModelInfo(fingerprint=m.fingerprint, model_id=s.model_id, revision=s.revision,
                               num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                               kv_dtype=s.kv_dtype, layout=s.layout, head_map_method=m.head_map.method,
                               num_global_heads=m.num_global_heads, num_entries=n, bytes_by_tier=by_tier))
    return P.ModelsResponse(models=out)
