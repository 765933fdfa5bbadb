"""Audit 38: what the daemon keeps per model must not outlive the model's use."""

from __future__ import annotations

import time

import torch

from kvd.client import prefix as kvio
from kvd.client.client import KvdClient
from kvd.core import protocol as P
from kvd.core.keys import ModelSpec
from tests.daemon_thread import ThreadDaemon, settings_for

TOKENS = list(range(256))


def spec(revision: str) -> ModelSpec:
    return ModelSpec("audit38", num_layers=1, num_kv_heads=2, head_dim=16, kv_dtype="bfloat16", revision=revision)


def kv():
    return torch.randn(1, 2, 2, 256, 16).to(torch.bfloat16)


def wait_until(cond, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_models_without_entries_are_forgotten_once_idle(tmp_path):
    """Every model registered (each checkpoint or revision an engine ever ran) stayed in the registry with
    its head map and registration document for the daemon's whole run (about 270 KB a model with a
    profiled head map), although a restart keeps only models with records. A model with no entries and
    unused for ``daemon.model_idle_s`` is now forgotten; a model with entries never is, and a client
    that registered a forgotten one registers it again on its next call."""
    d = ThreadDaemon(settings_for(tmp_path, daemon={"model_idle_s": 0.5})).start()
    store = d.store
    c = KvdClient(d.socket, register_cuda=False)
    try:
        kept = kvio.register(c, spec("kept"))
        assert kvio.store_prefix(kept, TOKENS, kv()).stored == 1
        handles = []
        for i in range(100):  # checkpoints come and go; their KV is deleted with them
            h = kvio.register(c, spec(f"ckpt-{i}"))
            assert kvio.store_prefix(h, TOKENS, kv()).stored == 1
            c.delete(P.EntriesRequest(fingerprint=h.fingerprint, hashes=h.hashes(TOKENS)))
            handles.append(h)
        assert wait_until(lambda: set(store.registry.models) == {kept.fingerprint}), len(store.registry.models)
        assert set(store.admin._docs) == {kept.fingerprint}
        assert all(fps <= {kept.fingerprint} for fps in store.admin._durable.values())
        assert kvio.lookup_prefix(kept, TOKENS).num_prefix_hits == 1  # its entry holds it
        # A forgotten model's client is told "not registered" and registers it again, transparently.
        assert kvio.store_prefix(handles[0], TOKENS, kv()).stored == 1
        assert kvio.lookup_prefix(handles[0], TOKENS).num_prefix_hits == 1
        assert handles[0].fingerprint in store.registry.models
    finally:
        c.close()
        d.stop()
