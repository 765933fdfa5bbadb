"""A chunk get whose copy outlasts its lease (audit 4): the daemon takes the lease back, the slots go
to another entry, and the release answers NotFound. What was copied may be the other entry's bytes,
so it must not be returned as the asked chunk."""

from __future__ import annotations

import time

import torch

from kvd.client.prefix import register
from kvd.client.views import EntryView
from kvd.core import protocol as P
from kvd.reuse.chunks import DaemonChunkStore
from tests.daemon_proc import DaemonProc
from tests.reuse.test_chunks import HM, SPEC, key, kv_for

TTL = 1.0


def test_a_chunk_copied_after_its_lease_lapsed_is_not_returned(tmp_path, monkeypatch):
    d = DaemonProc(tmp_path, env_extra={"KVD_HOST__LEASE_TTL_S": str(TTL)}).start()
    try:
        with d.client() as c, d.client() as other:
            h = register(c, SPEC, HM)
            h2 = register(other, SPEC, HM)
            store, store2 = DaemonChunkStore(h), DaemonChunkStore(h2)
            a, b = kv_for(64, 1), kv_for(64, 2)
            assert store.put(key(h, 1), a)
            real = EntryView.read_into

            def slow_read(self, kv, *args, **kw):  # a copy on a slow, busy CPU
                time.sleep(TTL + 2.0)  # past the TTL and the daemon's expiry pass
                other.delete(P.EntriesRequest(namespace=h.namespace, fingerprint=h.fingerprint, hashes=[key(h, 1)]))
                assert store2.put(key(h2, 2), b)  # the freed slots: another entry's bytes
                real(self, kv, *args, **kw)

            monkeypatch.setattr(EntryView, "read_into", slow_read)
            got = store.get([key(h, 1)])
            assert key(h, 1) not in got or torch.equal(got[key(h, 1)], a), "another entry's bytes returned"
    finally:
        d.kill()
