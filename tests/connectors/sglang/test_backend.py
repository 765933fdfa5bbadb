"""``KvdHiCacheStorage`` driven by SGLang's own code against a real daemon.

SGLang's ``HiCacheController`` builds the backend with its factory from the extra-config JSON a user
writes, and its backup and prefetch threads make the calls (``batch_set_v1``, ``batch_exists``,
``batch_get_v1``; the legacy ``batch_set`` / ``batch_get`` without ``interface_v1``); pages live in
SGLang's ``MHATokenToKVPoolHost``, SmolLM2-shaped (30 layers x 3 KV heads x 64, bf16) on the CPU.
"""

from __future__ import annotations

import time

import pytest
import torch

from kvd.client.transfer import open_lease
from kvd.connectors.sglang.pages import SUPPORTED, HostPages
from kvd.core.errors import ConfigError
from tests.connectors.sglang.conftest import extra_config
from tests.connectors.sglang.sglang_env import Controller, fill_random, make_pool, page_bytes, page_keys

P = 64


def tokens(seed: int, num_pages: int) -> list[int]:
    return torch.randint(3, 49000, (num_pages * P,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def controller(sglang_version, daemon):
    made = []

    def make(layout: str = "page_first", *, num_pages: int = 32, **cfg) -> Controller:
        c = Controller(make_pool(layout, num_pages=num_pages, page_size=P), extra_config(daemon.socket, **cfg))
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.mark.parametrize("layout", SUPPORTED)
def test_round_trip_through_the_controller_is_bit_exact(controller, layout):
    c = controller(layout)
    toks = tokens(SUPPORTED.index(layout), 5)
    idx = c.pool.alloc(5 * P)
    fill_random(c.pool, idx, seed=11)
    stored = page_bytes(c.pool, idx)
    assert c.backup(idx, toks, page_keys(toks, P)) == 5 * P  # backup thread -> batch_set_v1
    loaded, idx2 = c.prefetch(toks)  # prefetch thread -> batch_exists; I/O thread -> batch_get_v1
    assert loaded == 5 * P
    assert not set(idx2.tolist()) & set(idx.tolist())  # other host pages than the stored ones
    assert all(torch.equal(a, b) for a, b in zip(stored, page_bytes(c.pool, idx2)))
    assert c.backend.counters["loaded_pages"] == 5


def test_arena_holds_the_pages_as_per_head_segments(controller):
    """Each page is a kvd entry whose segment (layer l, head h) is K[P, D] | V[P, D] of that head."""
    c = controller("page_head")
    toks = tokens(21, 2)
    idx = c.pool.alloc(2 * P)
    fill_random(c.pool, idx, seed=21)
    keys = page_keys(toks, P)
    assert c.backup(idx, toks, keys) == 2 * P
    io, pages = c.backend.io, HostPages(c.pool)
    h = io.session.handle()
    with open_lease(h, io.hashes(h, keys)) as lease:
        assert lease.num_leading == 2
        for i, s in enumerate(idx[::P].tolist()):
            page = pages.kv(s)  # [L, 2, H, P, D]
            for plan, view, *_ in lease.entry(i).extents:  # view [segments, 2, P, D]
                for j, (layer, head) in enumerate(plan.heads):
                    assert torch.equal(view[j].view(torch.int16), page[layer, :, head].view(torch.int16))


def test_batch_exists_counts_the_leading_pages_present(controller):
    c = controller("page_first")
    toks = tokens(31, 5)
    keys = page_keys(toks, P)
    idx = c.pool.alloc(5 * P)
    fill_random(c.pool, idx, seed=31)
    b = c.backend
    stored = b.batch_set_v1([keys[i] for i in (0, 1, 2, 4)], torch.cat([idx[i * P:(i + 1) * P] for i in (0, 1, 2, 4)]))
    assert stored == [True] * 4
    assert b.batch_exists(keys) == 3  # page 3 is missing: page 4 does not count
    assert b.batch_exists(keys[3:]) == 0
    assert b.batch_exists(keys[4:]) == 1
    assert c.prefetch(toks)[0] == 3 * P  # the controller loads the three leading pages only
    assert b.batch_get_v1(keys, idx) == [True, True, True, False, False]


def test_legacy_api_stores_what_v1_loads(controller):
    """Without ``interface_v1`` SGLang flattens pages itself (``get_data_page``) and calls
    ``batch_set``; a v1 controller on another pool then loads them bit-exact."""
    legacy = controller("page_first", interface_v1=0)
    assert legacy.cc.page_set_func.__name__ == "_generic_page_set"
    toks = tokens(41, 3)
    idx = legacy.pool.alloc(3 * P)
    fill_random(legacy.pool, idx, seed=41)
    assert legacy.backup(idx, toks, page_keys(toks, P)) == 3 * P
    v1 = controller("page_first")
    loaded, idx2 = v1.prefetch(toks)
    assert loaded == 3 * P
    assert all(torch.equal(a, b) for a, b in zip(page_bytes(legacy.pool, idx), page_bytes(v1.pool, idx2)))
    # and back: the legacy controller's get path (dummy flat pages, set_from_flat_data_page)
    loaded, idx3 = legacy.prefetch(toks)
    assert loaded == 3 * P
    assert all(torch.equal(a, b) for a, b in zip(page_bytes(legacy.pool, idx), page_bytes(legacy.pool, idx3)))


def test_pages_are_shared_across_host_layouts(controller):
    """kvd stores canonical per-head segments: a page_first pool's pages load into a page_head pool."""
    a, b = controller("page_first"), controller("page_head")
    toks = tokens(51, 2)
    idx = a.pool.alloc(2 * P)
    fill_random(a.pool, idx, seed=51)
    assert a.backup(idx, toks, page_keys(toks, P)) == 2 * P
    loaded, idx2 = b.prefetch(toks)
    assert loaded == 2 * P
    pa, pb = HostPages(a.pool), HostPages(b.pool)
    for s, t in zip(idx[::P].tolist(), idx2[::P].tolist()):
        assert torch.equal(pa.kv(s).view(torch.int16), pb.kv(t).view(torch.int16))


def test_a_corrupt_page_ends_the_loaded_run(controller, daemon):
    c = controller("page_first")
    toks = tokens(61, 3)
    keys = page_keys(toks, P)
    idx = c.pool.alloc(3 * P)
    fill_random(c.pool, idx, seed=61)
    assert c.backup(idx, toks, keys) == 3 * P
    io = c.backend.io
    h = io.session.handle()
    with open_lease(h, io.hashes(h, keys)[1:2]) as lease:  # flip one byte of page 1 in the arena
        x = lease.entry(0).extents[0].view.view(torch.uint8).view(-1)
        x[100] ^= 0xFF
    dst = c.pool.alloc(3 * P)
    before = page_bytes(c.pool, dst)
    assert c.backend.batch_get_v1(keys, dst) == [True, False, False]
    assert c.backend.counters["checksum_failures"] == 1
    after = page_bytes(c.pool, dst)
    assert torch.equal(after[0], page_bytes(c.pool, idx)[0])
    assert torch.equal(after[1], before[1])  # the corrupt page: checked before its copy, never written
    # Page 2 is hashed and copied on another thread, maybe before page 1 failed: its slots were
    # allocated for this prefetch and SGLang frees them unread, since only the leading True pages count.


def test_unknown_extra_config_key_fails_at_attach(sglang_version, daemon):
    with pytest.raises(ConfigError, match="sockett"):
        Controller(make_pool("page_first", num_pages=32, page_size=P), {**extra_config(daemon.socket), "sockett": "x"})


def test_daemon_down_means_misses_and_the_backend_reconnects(sglang_version, tmp_path):
    """No daemon at start: SGLang serves on (misses, failed backups, nothing raised); the daemon
    comes up; after the breaker's retry interval the same backend stores and loads."""
    from tests.daemon_proc import DaemonProc

    d = DaemonProc(tmp_path)
    c = Controller(make_pool("page_head", num_pages=32, page_size=P),
                   extra_config(d.socket, retry_interval_s=0.2, max_retry_interval_s=0.2, timeout_s=1.0))
    try:
        toks = tokens(71, 2)
        keys = page_keys(toks, P)
        idx = c.pool.alloc(2 * P)
        fill_random(c.pool, idx, seed=71)
        assert c.backup(idx, toks, keys) == 0
        assert c.prefetch(toks) == (0, None)
        assert c.backend.batch_get_v1(keys, idx) == [False, False]
        d.start()
        time.sleep(0.3)  # the breaker's retry interval
        assert c.backup(idx, toks, keys) == 2 * P
        assert c.prefetch(toks)[0] == 2 * P
        assert c.backend.counters["daemon_failures"] >= 1
    finally:
        c.close()
        d.kill()


def test_side_pools_are_refused_at_attach(controller):
    """Hybrid models (SWA, Mamba, indexer, draft sidecars) register side pools next to the KV pool
    (``HybridCacheController.attach_storage_backend``) and then ask ``batch_exists_v2`` /
    ``batch_get_v2`` / ``batch_set_v2``, which kvd does not implement: such a set-up is refused when
    the pool registers, not failed with NotImplementedError on every hit query and backup."""
    from sglang.srt.mem_cache.hicache_storage import PoolName

    c = controller("page_first")
    c.backend.register_mem_host_pool_v2(c.pool, PoolName.KV)  # the anchor KV pool: kvd's own
    with pytest.raises(ConfigError, match="swa"):
        c.backend.register_mem_host_pool_v2(make_pool("page_first", num_pages=32, page_size=P), PoolName.SWA)


def test_transfer_log_is_kept_only_for_storage_metrics(controller):
    """``get_stats`` (which takes the per-call sizes and speeds) is called by SGLang only with
    ``--enable-storage-metrics``; without it nothing may pile up per call for the server's lifetime."""
    c = controller("page_first")
    assert not c.cc.enable_storage_metrics
    toks = tokens(91, 2)
    keys = page_keys(toks, P)
    idx = c.pool.alloc(2 * P)
    fill_random(c.pool, idx, seed=91)
    for _ in range(3):
        assert c.backend.batch_set_v1(keys, idx) == [True, True]
        assert c.backend.batch_get_v1(keys, idx) == [True, True]
    log = c.backend.io.log
    assert (log.prefetch_pgs, log.backup_pgs, log.prefetch_bandwidth, log.backup_bandwidth) == ([], [], [], [])
