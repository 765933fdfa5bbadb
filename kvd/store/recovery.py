"""Filling the store's index from the tiers below the arena: the persistent tiers at start, before any
engine reconnects, and the shared tier (the remote cluster) when a lookup misses locally.

Every record's key names its extent completely (``kvd.tiers.base.ExtentName``) and its header carries
its codec, size and checksum; registered models are kept beside the records (``model/<fingerprint>``
meta records, ``kvd.store.admin.persist_model``). So the index is rebuilt from keys and headers
alone, without reading a payload.

What comes back: an entry of a known model whose records all fit its layout. A local-head extent
with no record was let go on purpose (placement ``drop``) or lost in a crash before its write-back:
it is marked dropped, and exact readers see the entry as incomplete. An entry whose global extent is
missing is of no use to any reader: its records are dropped, as are records of unknown models, of
another layout, or keyed in an older format.

In a shared tier "no record" may also mean "not written yet": the host that stored the entry writes
its global and hot local extents through at commit and its cold local ones back later
(``remote.write_policy``). So an entry this host holds with an extent that has no copy anywhere is
asked for again by the next exact lookup or lease, and extents other hosts have written since are
added to it (``fill``); without this, a host that looked an entry up between another host's commit
and its write-back would keep it incomplete for exact readers forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kvd.core import protocol as P
from kvd.core.errors import KvdError, TierUnavailable
from kvd.core.extents import ExtentPlan, class_kind, keep_span
from kvd.store.admin import MODEL_META
from kvd.store.entries import Copy, Entry, EntryKey, Extent
from kvd.tiers.base import StoredRecord
from kvd.tiers.record import other_layout

logger = logging.getLogger(__name__)


async def recover(store) -> int:
    """Put every entry the persistent tiers hold back into ``store``'s index; returns how many."""
    found: dict[EntryKey, list[tuple[str, StoredRecord]]] = {}  # entry -> [(tier, record)]
    scanned = []
    for lv in store.index.records:
        try:
            records = await store.pipeline.on_io(lv, lv.tier.scan)
            for rec in records:
                n = rec.name
                found.setdefault((n.namespace, n.fingerprint, n.hash), []).append((lv.name, rec))
            scanned.append(lv)
        except TierUnavailable as e:  # a shared tier that is down at start: its entries come with lookups
            logger.warning("%s tier not scanned at start: %s", lv.name, e)
    # This host's own registration first: another host's of the same model (another head map) may
    # have overwritten the shared tier's, even where this host's tiers hold no record of the model.
    for lv in sorted(scanned, key=lambda lv: lv.tier.shared):
        try:
            for fp in {k[1] for k in found} - set(store.registry.models):
                raw = await store.pipeline.on_io(lv, lv.tier.get_meta, MODEL_META + fp)
                if raw is not None:
                    _register(store, fp, raw)
        except TierUnavailable as e:
            logger.warning("%s tier: registrations not read at start: %s", lv.name, e)
    count = adopt(store, found)
    store.metrics.recovered_entries.inc(count)
    return count


def adopt(store, found: dict[EntryKey, list[tuple[str, StoredRecord]]]) -> int:
    """Index the entries ``found`` in tiers below the arena (at start, or found in a shared tier by a
    lookup); returns how many. Records that fit no known model or layout are dropped from private
    tiers; a shared tier's records belong to every host and are only left out of this index."""
    now = store.clock()
    count = 0
    orphans: dict[str, list] = {}
    # Tail first, as every batch reaches the policies (``kvd.store.index.tail_first``): in the order
    # found (record keys, i.e. hashes) a sequence's head could be its first victim after a restart.
    for key, parts in sorted(found.items(), key=lambda kv: -kv[1][0][1].name.start_token):
        if key in store.index.pending:
            continue  # being stored here: this host's copies will serve it
        if (known := store.index.get(key)) is not None:
            count += fill(store.index, known, parts)  # known here: only extents it has no copy of are added
            continue
        e = _rebuild(store, key, parts, now)
        if e is None:
            for tier, rec in parts:
                if not store.index.by_name[tier].tier.shared:
                    orphans.setdefault(tier, []).append(rec.location)
            continue
        store.index.insert(e)
        count += 1
    for tier, locs in orphans.items():
        logger.warning("%s tier: %d records of unknown models, layouts or missing global extents dropped",
                       tier, len(locs))
        store.pipeline.discard(store.index.by_name[tier], locs)
    return count


def lacks(e: Entry) -> bool:
    """Some extent of ``e`` has no copy in any tier (dropped, lost, or not written by its host yet)."""
    return any(not x.copies for x in e.extents.values())


async def find_shared(store, namespace: str, fingerprint: str, hashes: list[str], *, exact: bool = True) -> int:
    """Ask the shared tiers (the remote cluster) for the entries among ``hashes`` this index lacks, in
    one round trip per tier (shared with the lookups asking meanwhile: ``kvd.store.shared_find``),
    waiting at most ``remote.lookup_deadline_s``; index what other hosts stored. For an ``exact`` reader,
    entries held here with an extent that has no copy are asked for again (another host may have
    written it back since). Returns how many entries the batches this lookup was in adopted or
    completed. A tier that is down or slow costs only the wait."""
    idx = store.index

    def wanted(h: str) -> EntryKey | None:
        key = (namespace, fingerprint, h)
        if key in idx.pending:
            return None
        found = idx.resolve(key)
        if found is None:
            return key
        return found[0].key if exact and lacks(found[0]) else None

    missing = list(dict.fromkeys(k for h in hashes if (k := wanted(h)) is not None))
    adopted = 0
    for lv in idx.records:
        if not missing or not lv.tier.shared or not lv.tier.is_available:
            continue
        try:
            async with asyncio.timeout(store.settings.remote.lookup_deadline_s):
                adopted += await store.finds.find(lv, missing)  # with the lookups asking meanwhile
        except (TimeoutError, TierUnavailable) as e:
            store.metrics.tier_errors.labels(lv.name, "find").inc()
            logger.debug("remote lookup skipped: %s", e)
            continue
        missing = [k for k in missing if (e := idx.get(k)) is None or (exact and lacks(e))]
    return adopted


async def find_and_adopt(store, lv, keys: list[EntryKey]) -> int:
    """One find of ``keys`` in the shared level ``lv`` (one pipelined round trip) and the adoption of what
    it found; returns how many entries were adopted or completed. ``kvd.store.shared_find`` batches it."""
    records = await store.pipeline.on_io(lv, lv.tier.find, keys)
    found: dict[EntryKey, list[tuple[str, StoredRecord]]] = {}
    for rec in records:
        n = rec.name
        found.setdefault((n.namespace, n.fingerprint, n.hash), []).append((lv.name, rec))
    return adopt(store, found)


def fill(index, e: Entry, parts: list[tuple[str, StoredRecord]]) -> int:
    """Add to ``e`` the shared tier's records of extents it has no copy of; 1 if any was added. A
    record must match the entry exactly (name, size, and the exact checksum where the entry knows
    it): anything else is left out, never served."""
    added = 0
    for tier, rec in parts:
        x = e.extents.get(rec.name.head_class)
        plan = _fits(rec, x, e, index.by_name[tier].tier.shared) if x is not None and not x.copies else None
        if plan is None:
            continue
        copy = _copy(rec)
        if not copy.is_lossy and x.checksum is not None and x.checksum != rec.raw_xxh:
            logger.warning("remote record %r does not match this host's checksum: left out", rec.location.key)
            continue
        x.set_plan(plan)
        index.place(e, x, index.by_name[tier], copy)  # counted, policed
        x.dropped = False
        if not copy.is_lossy:
            x.checksum = rec.raw_xxh
        added = 1
    return added


def _fits(rec: StoredRecord, x: Extent, span, shared: bool) -> ExtentPlan | None:
    """The layout ``rec`` holds of extent ``x`` of the entry ``span`` (an ``Entry`` or the ``ExtentName``
    of one of its records), or None if it is not one of its: the same heads (the plan's layout tag:
    another daemon's head map makes extents of the same names and sizes of other heads; a record
    with none, written before tags, only from a private tier), kind, tokens and attention, and
    the size of ``x``'s layout or of its trimmed form (capacity mode; ``keep_span`` is a function of
    the entry alone, so the span is found again, whatever the settings now)."""
    if other_layout(rec.layout, x.plan.layout, shared):
        return None
    n = rec.name
    if (n.kind, n.start_token, n.end_token, n.num_tokens, n.computed_under) != (
            span.kind, span.start_token, span.end_token, span.num_tokens, span.computed_under):
        return None
    if rec.raw_nbytes == x.nbytes:
        return x.plan
    if x.plan.is_trimmed or n.kind != "prefix":
        return None
    keep = keep_span(x.plan, n.start_token, n.num_tokens, max(n.end_token, n.start_token + n.num_tokens))
    if keep is None or keep == (0, n.num_tokens):
        return None
    trimmed = x.plan.trim(*keep)
    return trimmed if rec.raw_nbytes == trimmed.nbytes else None


def _copy(rec: StoredRecord) -> Copy:
    return Copy(rec.location, rec.codec, rec.raw_xxh)


def _register(store, fp: str, raw: bytes) -> None:
    try:
        req = P.RegisterModelRequest.model_validate_json(raw)
    except ValueError:
        logger.warning("the persisted registration of model %s is unreadable", fp)
        return
    with contextlib.suppress(KvdError):
        store.register_model(req, persist=False)


def _rebuild(store, key: EntryKey, parts: list[tuple[str, StoredRecord]], now: float) -> Entry | None:
    model = store.registry.models.get(key[1])
    if model is None:
        return None
    first = parts[0][1].name
    extents = {c: Extent(plan=p) for c, p in model.plans(first.num_tokens).items()}
    for tier, rec in parts:
        x = extents.get(rec.name.head_class)
        shared = store.index.by_name[tier].tier.shared
        plan = _fits(rec, x, first, shared) if x is not None and tier not in x.copies else None
        if plan is None:
            if shared:  # another host's record (another head map's, say): left out, never served; the
                continue  # entry's own records here are not dropped for it
            return None
        x.set_plan(plan)
        x.copies[tier] = copy = _copy(rec)
        if not copy.is_lossy:
            x.checksum = rec.raw_xxh
    for c, x in extents.items():
        if not x.copies:
            if class_kind(c) != "local":
                return None
            x.dropped = True
    return Entry(key=key, kind=first.kind, num_tokens=first.num_tokens, start_token=first.start_token,
                 end_token=first.end_token, computed_under=first.computed_under, extents=extents, created=now,
                 last_access=now)
