"""Audit 18 (policies and the store's use of them): defects found in admission, eviction order and room."""

from __future__ import annotations

from kvd.core import protocol as P
from tests.store.test_pipeline import World


async def test_an_entry_admitted_by_a_second_store_is_written_back(tmp_path):
    """A store of a key already stored is a sighting (docs/tiers.md, Admission: "each store or lookup
    hit counts one"): its count went up, but the store never told the background, so an entry
    admitted that way was not queued for write-back and stayed in the arena alone (lost on restart)."""
    w = World(tmp_path)  # admit_after 2
    try:
        hs, data = await w.store_seq(1)
        await w.step()
        assert w.ssd.stats().num_records == 0  # seen once: not admitted
        r = await w.store.reserve(P.ReserveRequest(fingerprint=w.fp, entries=[  # stored again: its 2nd sighting
            P.ReserveEntry(hash=h, num_tokens=256, start_token=i * 256, end_token=1024) for i, h in enumerate(hs)]))
        assert [e.status for e in r.entries] == ["exists"] * 4
        assert all(w.entry(h).seen == 2 for h in hs)
        await w.step()
        assert all("ssd" in x.copies for h in hs for x in w.entry(h).extents.values()), \
            "an entry admitted by its second store was never written back"
        assert w.store.background.admission.seen(w.entry(hs[0]).key) == 2
    finally:
        w.close()

