"""The lookup report: what lookups answered from the shared index (``kvd.client.local_lookup``) tell
the daemon afterwards, so that its hit counters and its admission see them as they see socket lookups.

``POST /v1/lookup/report`` (JSON, answered with a ``CountResponse`` of the sightings applied). Per
namespace and model: how many lookups, the prefix tokens they asked about (each capped at its
``max_tokens``, as ``kvd.store.answers.count_hits`` caps them), the tokens they could load by tier
(the leading complete entries), and how often each found hash was seen. The daemon checks the
caller's right to each namespace (403), the model (404) and every count (400), like any request.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field

from kvd.core.protocol import Hash, NamespaceStr, TierName, _Model

Count = Annotated[int, Field(ge=0, le=1 << 40)]


class ReportItem(_Model):
    namespace: NamespaceStr
    fingerprint: str
    lookups: Count
    asked_tokens: Count
    hit_tokens: dict[TierName, Count]
    seen: list[tuple[Hash, Annotated[int, Field(ge=1, le=1 << 30)]]]


class LookupReport(_Model):
    items: list[ReportItem]


def reports_of(noted: list[tuple], max_seen: int = 2048) -> list[LookupReport]:
    """Reports of the answers noted since the last: ``(namespace, fingerprint, times asked, hashes
    asked, chunk tokens, max_tokens, values of the leading hits, the hashes, indices found, tier
    names)``; each
    names at most ``max_seen`` hashes (a request names at most ``daemon.max_entries_per_request``)."""
    items: dict[tuple[str, str], dict] = {}
    for ns, fp, times, n, chunk, cap, lead_vals, hashes, found, tiers in noted:
        it = items.get((ns, fp))
        if it is None:
            it = items[(ns, fp)] = {"lookups": 0, "asked_tokens": 0, "hit_tokens": {}, "seen": {}}
        it["lookups"] += times
        asked = n * chunk if cap is None else min(n * chunk, cap)
        it["asked_tokens"] += asked * times
        left = asked
        toks = (lead_vals >> np.uint64(32)).tolist()
        levels = (lead_vals & np.uint64(0xFF)).tolist()
        hit = it["hit_tokens"]
        for t, lv in zip(toks, levels, strict=True):
            take = min(t, left)
            left -= take
            if take:
                hit[tiers[lv]] = hit.get(tiers[lv], 0) + take * times
        seen = it["seen"]
        for i in found.tolist():
            seen[hashes[i]] = seen.get(hashes[i], 0) + times
    out: list[LookupReport] = []
    room = 0
    for (ns, fp), v in items.items():
        seen = list(v["seen"].items())
        first = True
        while first or seen:
            if not out or room == 0:
                out.append(LookupReport(items=[]))
                room = max_seen
            part, seen = seen[:room], seen[room:]
            room -= len(part)
            out[-1].items.append(ReportItem(  # the counts ride with the first part
                namespace=ns, fingerprint=fp, lookups=v["lookups"] if first else 0,
                asked_tokens=v["asked_tokens"] if first else 0, hit_tokens=v["hit_tokens"] if first else {},
                seen=part))
            first = False
    return out
