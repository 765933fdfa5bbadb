"""Chunk entries in the daemon (``DaemonChunkStore``), through the one transfer transaction, against a
real daemon: round trip, head classes, a corrupted entry, a daemon that is gone."""

from __future__ import annotations

import pytest
import torch

from kvd.client.prefix import register
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec, content_hash
from kvd.reuse.chunks import DaemonChunkStore
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("toy-chunks", num_layers=3, num_kv_heads=2, head_dim=16, kv_dtype="bfloat16")
HM = HeadMap.from_classes("toy-chunks", [[True, False]] * 3, sink=4, window=64)  # head 0 global, 1 local


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProc(tmp_path).start()
    yield d
    d.kill()


def kv_for(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, n, SPEC.head_dim, generator=g).bfloat16()


def key(h, seed: int) -> str:
    return content_hash([seed] * 10, namespace=h.namespace, fingerprint=h.fingerprint)


def test_put_then_get_round_trips_any_length_and_only_the_asked_classes(daemon):
    with daemon.client() as c:
        h = register(c, SPEC, HM)
        store = DaemonChunkStore(h)
        a, b = kv_for(100, 1), kv_for(37, 2)
        assert store.put(key(h, 1), a) and store.put(key(h, 2), b)
        assert store.put(key(h, 1), a)  # stored already: still True
        got = store.get([key(h, 2), key(h, 3), key(h, 1)])  # a miss is simply absent
        assert set(got) == {key(h, 1), key(h, 2)}
        assert torch.equal(got[key(h, 1)], a) and torch.equal(got[key(h, 2)], b)
        local = store.get([key(h, 1)], classes=["local"])[key(h, 1)]
        assert torch.equal(local[:, :, 1], a[:, :, 1]) and not local[:, :, 0].any()  # global rows: zeros
        assert c.stats().leases_held == 0


def test_a_corrupted_chunk_is_absent_and_the_others_load(daemon):
    with daemon.client() as c:
        h = register(c, SPEC, HM)
        store = DaemonChunkStore(h)
        for s in (1, 2):
            store.put(key(h, s), kv_for(64, s))
        from kvd.client.transfer import open_lease

        with open_lease(h, [key(h, 1)]) as lease:  # a stray write into chunk 1's bytes
            lease.entry(0).extents[0].view.view(torch.uint8).view(-1)[:4] ^= 0xFF
        got = store.get([key(h, 1), key(h, 2)])
        assert list(got) == [key(h, 2)] and torch.equal(got[key(h, 2)], kv_for(64, 2))


def test_daemon_gone_means_misses_and_failed_puts(daemon):
    with daemon.client(timeout_s=1.0) as c:
        h = register(c, SPEC, HM)
        store = DaemonChunkStore(h)
        daemon.kill()
        assert store.get([key(h, 1)]) == {}
        assert store.put(key(h, 1), kv_for(8, 1)) is False
