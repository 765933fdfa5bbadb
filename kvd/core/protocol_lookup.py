"""The lookup report: what lookups answered from the shared index (``kvd.client.local_lookup``) tell
the daemon afterwards, so that its hit counters and its admission see them as they see socket lookups.

``POST /v1/lookup/report`` (JSON, answered with a ``CountResponse`` of the sightings applied). Per
namespace and model: how many lookups, the prefix tokens they asked about (each capped at its
``max_tokens``, as ``kvd.store.answers.count_hits`` caps them), the tokens they could load by tier
(the leading complete entries), and how often each found hash was seen. The daemon checks the
caller's right to each namespace (403), the model (404) and every count (400), like any request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
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


def prefix_hit_tokens(num_hashes: int, chunk_tokens: int, max_tokens: int | None,
                      leading: Iterable[tuple[int, str]]) -> tuple[int, dict[str, int]]:
    """What one prefix lookup adds to ``kvd_lookup_tokens_total`` (the tokens it asked about, at most
    ``max_tokens``) and to ``kvd_hit_tokens_total`` by tier (its leading hits' ``(tokens, tier)``,
    within the same cap). The one rule for lookups the daemon answers (``kvd.store.answers.count_hits``)
    and those answered from the shared index (``reports_of``)."""
    asked = num_hashes * chunk_tokens
    if max_tokens is not None:
        asked = min(asked, max_tokens)
    left, per_tier = asked, {}
    for n, tier in leading:
        n = min(n, left)
        left -= n
        if n:
            per_tier[tier] = per_tier.get(tier, 0) + n
    return asked, per_tier


@dataclass(slots=True)
class Noted:
    """One distinct lookup answered from the shared index since the last report, and how often: the
    latest answer stands for all of them (``kvd.client.local_lookup``)."""

    namespace: str
    fingerprint: str
    chunk_tokens: int
    max_tokens: int | None
    hashes: list[str]
    lead_vals: np.ndarray  # the index values of the leading hits
    found: np.ndarray  # indices of the hashes found
    tiers: list[str]  # tier names by level, as the index named them
    times: int = 1


def reports_of(noted: Iterable[Noted], max_seen: int = 2048) -> list[LookupReport]:
    """Reports of the answers noted since the last, each naming at most ``max_seen`` hashes (a
    request names at most ``daemon.max_entries_per_request``)."""
    items: dict[tuple[str, str], dict] = {}
    for x in noted:
        it = items.get((x.namespace, x.fingerprint))
        if it is None:
            it = items[(x.namespace, x.fingerprint)] = {"lookups": 0, "asked_tokens": 0, "hit_tokens": {}, "seen": {}}
        lead = zip((x.lead_vals >> np.uint64(32)).tolist(),
                   [x.tiers[lv] for lv in (x.lead_vals & np.uint64(0xFF)).tolist()], strict=True)
        asked, per_tier = prefix_hit_tokens(len(x.hashes), x.chunk_tokens, x.max_tokens, lead)
        it["lookups"] += x.times
        it["asked_tokens"] += asked * x.times
        hit = it["hit_tokens"]
        for tier, n in per_tier.items():
            hit[tier] = hit.get(tier, 0) + n * x.times
        seen = it["seen"]
        for i in x.found.tolist():
            seen[x.hashes[i]] = seen.get(x.hashes[i], 0) + x.times
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
