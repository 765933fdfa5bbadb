"""Audit 36: crash consistency of the SSD tier and the start-up rebuild (kvd.store.recovery)."""

from __future__ import annotations

import lmdb

from kvd.core import protocol as P
from kvd.daemon.metrics import Metrics
from kvd.store.recovery import recover
from kvd.store.store import Store
from kvd.tiers.host import HostTier
from kvd.tiers.ssd import SsdTier
from tests.store.test_pipeline import World


async def restart_unregistered(w: World) -> int:
    """``World.restart`` as the daemon restarts: the index rebuilt before any engine registers again."""
    await w.store.background.close()
    await w.store.admin.close()
    w.ssd.close()
    w.host.close()
    s = w.settings
    w.host = HostTier(w.tmp_path / "arena", int(s.host.capacity_bytes), int(s.host.slot_bytes))
    w.ssd = SsdTier(w.tmp_path / "ssd", s.ssd)
    w.store = Store(s, [w.host, w.ssd], metrics=Metrics(), cpu=w.cpu, io=w.io, clock=w.clock)
    return await recover(w.store)


async def test_records_are_written_only_once_their_model_registration_is_durable_beside_them(tmp_path, monkeypatch):
    """A registration is persisted beside the records (``model/<fp>``) by a task nobody awaited, once,
    when it first changes: one that failed (a full disk: LMDB's EIO, MapFullError) was never written
    again, the model's records were still written and flushes acknowledged, and the restart dropped
    every one of them as records of an unknown model."""
    real = SsdTier.put_meta
    calls = []

    def failing_once(self, name, value):
        calls.append(name)
        if len(calls) == 1:
            raise lmdb.DiskError("No space left on device")
        return real(self, name, value)

    monkeypatch.setattr(SsdTier, "put_meta", failing_once)
    w = World(tmp_path, ssd={"admit_after": 100})
    try:
        await w.store.admin.close()  # the registration's persist task ran (and failed)
        assert calls and w.ssd.get_meta(calls[0]) is None
        hs, data = await w.store_seq(1, chunks=2)
        done = await w.store.admin.flush(P.FlushRequest(namespace="default", fingerprint=w.fp, hashes=hs))
        assert done == 2  # acknowledged: durably on SSD
        for h in hs:  # on SSD only now
            for lv in w.store.index.memory:
                w.store.pipeline.drop_copies(w.entry(h), lv)
        await w.store.pipeline.drain()
        assert await restart_unregistered(w) == 2
        assert await w.read_back(hs) == (["ok", "ok"], data)
    finally:
        w.close()
