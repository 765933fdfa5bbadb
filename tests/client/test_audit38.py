"""Audit 38: state an engine's client keeps for the life of the process must stay bounded."""

from __future__ import annotations

import torch

from kvd.client import local_lookup
from kvd.client import prefix as kvio
from kvd.client.client import KvdClient
from kvd.core import protocol as P
from kvd.core.keys import ModelSpec
from tests.daemon_thread import ThreadDaemon, settings_for

SPEC = ModelSpec("audit38", num_layers=1, num_kv_heads=2, head_dim=16, kv_dtype="bfloat16")
TOKENS = list(range(256))


def test_namespaces_vouched_for_stay_bounded(tmp_path, monkeypatch):
    """Every (namespace, model) pair a client looked up through the daemon was kept until the daemon
    restarted: the vLLM connector puts a request's cache_salt in its namespace, so an engine salting per
    user grew the set by one pair per user for months. It is now bounded, least recently used first
    forgotten; a forgotten pair is asked of the daemon once more, then answered locally again."""
    monkeypatch.setattr(local_lookup, "MAX_VOUCHED", 32, raising=False)  # (absent before the bound)
    d = ThreadDaemon(settings_for(tmp_path)).start()
    c = KvdClient(d.socket, register_cuda=False)
    try:
        h = kvio.register(c, SPEC)
        assert kvio.store_prefix(h, TOKENS, torch.randn(1, 2, 2, 256, 16).to(torch.bfloat16)).stored == 1

        def ask(ns: str) -> bool:
            """A lookup in ``ns``; whether the client answered it from the index."""
            before = c.local.answered
            c.lookup_compact(P.LookupRequest(fingerprint=h.fingerprint, namespace=ns, prefix_hashes=["ab" * 16],
                                             prefetch=False))
            return c.local.answered == before + 1

        hot = h.namespace
        assert not ask(hot) and ask(hot)  # vouched by the daemon's answer, then local
        for i in range(500):  # one salted namespace per user
            assert not ask(f"{hot}:salt-{i}")
            assert ask(hot)  # in use: never the one forgotten
        assert len(c.local._vouched) <= 32
        assert not ask(f"{hot}:salt-0") and ask(f"{hot}:salt-0")  # forgotten: one trip to the daemon
    finally:
        c.close()
        d.stop()
