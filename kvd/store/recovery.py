"""SSD record keys, and rebuilding the store's index from the SSD tier at start.

Each SSD record's key names its entry completely (namespace, fingerprint, hash, head class, kind and
position), and the record's header carries its codec, shape and checksum; registered models are
persisted beside the records (``model/<fingerprint>`` meta records). So at start the daemon can put
every entry back into its index, before any engine reconnects, without reading a payload.
"""

from __future__ import annotations

import logging

from kvd.core import protocol as P
from kvd.store.entries import Entry, EntryKey, Extent, ModelRecord
from kvd.tiers.base import Location
from kvd.tiers.ssd import SsdRecordInfo

logger = logging.getLogger(__name__)

_SEP = "\x1f"  # unit separator: never in a namespace, fingerprint or hash
MODEL_META = "model/"


def ssd_key(e: Entry, head_class: str) -> bytes:
    """Everything needed to rebuild the index entry from the key alone (headers carry the rest)."""
    return _SEP.join([e.namespace, e.fingerprint, e.hash, head_class, e.kind, str(e.start_token),
                      str(e.end_token), str(e.num_tokens)]).encode()


def parse_ssd_key(key: bytes) -> tuple[str, str, str, str, str, int, int, int] | None:
    parts = key.decode(errors="replace").split(_SEP)
    if len(parts) != 8:
        return None
    ns, fp, h, cls, kind, start, end, n = parts
    try:
        return ns, fp, h, cls, kind, int(start), int(end), int(n)
    except ValueError:
        return None


def model_records(raw_by_fp: dict[str, bytes | None]) -> list[P.RegisterModelRequest]:
    out = []
    for fp, raw in raw_by_fp.items():
        if raw is None:
            continue
        try:
            out.append(P.RegisterModelRequest.model_validate_json(raw))
        except ValueError:
            logger.warning("ssd tier: the persisted registration of model %s is unreadable", fp)
    return out


def rebuild_entries(records: list[SsdRecordInfo], models: dict[str, ModelRecord], now: float
                    ) -> tuple[list[Entry], list[Location]]:
    """Entries rebuilt from SSD records, and the records that fit no known model or shape (orphans)."""
    by_entry: dict[EntryKey, list[tuple[tuple, SsdRecordInfo]]] = {}
    orphans: list[Location] = []
    for rec in records:
        parsed = parse_ssd_key(rec.header.key)
        if parsed is None:
            orphans.append(rec.location)
            continue
        by_entry.setdefault(parsed[:3], []).append((parsed, rec))
    entries = []
    for key, parts in by_entry.items():
        model = models.get(key[1])
        if model is None:
            orphans += [rec.location for _, rec in parts]
            continue
        (_, _, _, _, kind, start, end, num_tokens) = parts[0][0]
        extents = {c: Extent(plan=p) for c, p in model.plans(num_tokens).items()}
        for parsed, rec in parts:
            x = extents.get(parsed[3])
            if x is None or rec.header.raw_nbytes != x.nbytes:
                orphans.append(rec.location)
                continue
            x.ssd, x.ssd_codec, x.checksum = rec.location, rec.header.codec, rec.header.raw_xxh
        for x in extents.values():
            if x.ssd is None:  # never written: placement "drop", or a crash before its write-back
                x.dropped = True
        e = Entry(key=key, kind=kind, num_tokens=num_tokens, start_token=start, end_token=end, extents=extents,
                  created=now, last_access=now)
        if e.fastest_tier() is not None:
            entries.append(e)
    return entries, orphans


def fingerprints(records: list[SsdRecordInfo]) -> set[str]:
    return {p[1] for r in records if (p := parse_ssd_key(r.header.key)) is not None}
