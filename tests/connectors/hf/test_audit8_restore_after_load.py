"""Eighth audit: the Lil guard's restore after a prefix load through the daemon (real SmolLM2, real daemon).

A head-aware load leases only the local window groups its map reads at the load's end; the others'
rows of the loaded tensor are zeros. The pages trimmed right after the load must not go to the guard's
host stash as if they held the prompt's KV: a restore would then put zeros back and decode "exact"
over them. Reference: the same prompt computed by the first request, restored from its own stash
(every trimmed page as computed), which the loaded request must equal bit for bit. With
``keep_prompt`` (or chunks that are not whole pages) the stash keeps the prompt's pages, so the load
reads every row (an exact read of the map's entries).
"""

from __future__ import annotations

import pytest
import torch

from kvd.connectors.hf import cache as hf
from kvd.connectors.hf.guard import GuardConfig
from kvd.core.headmap import HeadMap
from tests.daemon_proc import DaemonProc

pytestmark = pytest.mark.model


def _map() -> HeadMap:
    """Local heads with windows of 16-48 tokens (sink 4), a seeded fifth global."""
    g = torch.Generator().manual_seed(4)
    is_global = (torch.rand(30, 3, generator=g) < 0.2).tolist()
    return HeadMap.from_classes("smollm2-test", is_global, sink=4,
                                window=torch.randint(16, 48, (30, 3), generator=g).tolist())


def test_restore_after_a_head_aware_prefix_load_gives_the_stored_kv_back(model, tmp_path):
    ids = torch.randint(100, 20000, (1, 100), generator=torch.Generator().manual_seed(4))
    d = DaemonProc(tmp_path, env_extra={"KVD_KEYS__CHUNK_TOKENS": "32"}).start()
    try:
        with d.client() as client, torch.no_grad():
            first = hf.attach(model, head_map=_map(), client=client, guard=GuardConfig(keep_prompt=True))
            model(ids, past_key_values=first)  # computes all 100 tokens, stores 3 chunks of 32
            assert first.stored_chunks == 3
            second = first.fresh()
            model(ids, past_key_values=second)  # loads 96 tokens, computes 4
            assert second.token_ids == ids[0].tolist() and second.stored_chunks == 3
            assert first._restore_full_kv() is None
            failed = second._restore_full_kv()
    finally:
        d.kill()
    assert failed is None, failed
    for layer in range(30):
        k1, v1 = first.pool.read(layer, torch.arange(96))
        k2, v2 = second.pool.read(layer, torch.arange(96))
        assert torch.equal(k1, k2) and torch.equal(v1, v2), layer
