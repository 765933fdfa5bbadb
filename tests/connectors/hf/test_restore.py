"""The Lil guard's parts without a model: the compression signal, the trip logic, the host stash of
trimmed pages and the restore that puts them back bit for bit (kvd.connectors.hf.guard / restore)."""

from __future__ import annotations

import random

import pytest
import torch

from kvd.connectors.hf.guard import GuardConfig, LilGuard, compression_ratio
from kvd.connectors.hf.pool import PagePool
from kvd.connectors.hf.restore import TrimStash, restore_full_kv
from kvd.core.headmap import HeadMap

D, N = 8, 16  # head_dim, page_tokens


def _map() -> HeadMap:
    # layer 0: global, local w=20, local w=40; layer 1: local w=16, global, local w=64 (sink 4)
    return HeadMap.from_classes("t", [[True, False, False], [False, True, False]], sink=4,
                                window=[[0, 20, 40], [16, 0, 64]])


def _kv(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, t, D, generator=g), torch.randn(3, t, D, generator=g)


def _decode(pool: PagePool, steps: list[int]) -> None:
    """Append ``steps[i]`` tokens per step to both layers and trim, as attention does."""
    for i, n in enumerate(steps):
        for layer in range(2):
            k, v = _kv(n, 100 * i + layer)
            pool.append(layer, k, v)
            pool.trim(layer)


def test_compression_ratio_separates_a_loop_from_fresh_tokens():
    rng = random.Random(0)
    fresh = [rng.randrange(50000) for _ in range(64)]
    loop = [11, 22, 33, 44, 55, 66, 77, 88] * 8
    assert compression_ratio(fresh) < 2.0 < 5.0 < compression_ratio(loop)
    assert compression_ratio([]) == 1.0


def test_guard_config_refuses_what_cannot_work():
    with pytest.raises(ValueError):
        GuardConfig(action="rewind")
    with pytest.raises(ValueError):
        GuardConfig(window=4)
    with pytest.raises(ValueError):
        GuardConfig(ratio=1.0)


def test_guard_trips_once_on_a_loop_and_counts_tokens_per_mode():
    calls = []
    g = LilGuard(GuardConfig(window=32, ratio=3.0), lambda: calls.append(1))
    g.start(10)  # prompt of 10 tokens
    seq = list(range(1000, 1010))
    rng = random.Random(1)
    for _ in range(20):  # fresh text: no trip
        seq.append(rng.randrange(40000))
        g.see(seq)
        g.count(1)
    assert g.mode == "head_aware" and g.stats.trips == 0
    for _ in range(40):  # a 4-token loop
        seq.append([7, 8, 9, 10][len(seq) % 4])
        g.see(seq)
        g.count(1)
    st = g.stats
    assert calls == [1] and st.trips == 1 and st.restores == 1 and g.mode == "exact"
    assert st.trip_position == 10 + st.trip_generated - 1 and st.trip_reason.startswith("ratio")
    assert st.tokens_head_aware + st.tokens_exact == 60 and st.tokens_head_aware == st.trip_generated - 1
    for _ in range(40):  # the loop goes on after the restore: a whole exact window of it stops the request
        seq.append([7, 8, 9, 10][len(seq) % 4])
        g.see(seq)
    assert g.stopped and st.stops == 1 and st.trips == 1 and st.trip_reason.startswith("ratio")


def test_guard_keeps_decoding_exact_when_the_restore_ends_the_loop():
    g = LilGuard(GuardConfig(window=32, ratio=3.0), lambda: None)
    g.start(0)
    seq = [5, 6] * 20  # trips
    g.see(seq)
    assert g.mode == "exact"
    rng = random.Random(2)
    seq += [rng.randrange(40000) for _ in range(80)]  # fresh text after the restore
    for n in range(len(seq) - 79, len(seq) + 1):
        g.see(seq[:n])
    assert g.mode == "exact" and g.stats.stops == 0
    off = LilGuard(GuardConfig(window=32, ratio=3.0, stop_if_still_looping=False), lambda: None)
    off.start(0)
    off.see([5, 6] * 60)
    assert off.mode == "exact"


def test_guard_stops_when_restore_fails_or_when_asked():
    g = LilGuard(GuardConfig(window=8, ratio=2.0), lambda: "the daemon failed")
    g.start(1)
    seq = [0] + [5] * 8
    g.see(seq)
    assert g.stopped and g.stats.restore_failures == 1 and g.stats.stops == 1
    assert bool(g(torch.tensor([seq]), None)[0])
    s = LilGuard(GuardConfig(action="stop", window=8, expected_tokens=4, length_slack=1.5), lambda: None)
    s.start(1)
    s.see([0, 1, 2, 3, 4, 5, 6, 7])  # 7 generated > 1.5 x 4, fresh tokens: the length trips it
    assert s.stopped and s.stats.trip_reason == "length 7 > 1.5 x 4" and s.stats.restores == 0


def test_stash_and_restore_give_back_exactly_what_a_pool_that_never_trimmed_holds():
    hm = _map()
    steps = [50] + [1] * 70  # a prefill, then decode
    trimmed = PagePool(hm, head_dim=D, dtype=torch.float32, device="cpu", page_tokens=N, initial_pages=4)
    stash = TrimStash()
    stash.attach(trimmed)
    _decode(trimmed, steps)
    full = PagePool(HeadMap.all_global("t", 2, 3), head_dim=D, dtype=torch.float32, device="cpu", page_tokens=N)
    _decode(full, steps)
    assert trimmed.kv_bytes() < full.kv_bytes() and stash.nbytes > 0
    res = restore_full_kv(trimmed, stash)
    assert res.from_daemon == 0 and res.from_stash > 0
    pos = torch.arange(120)
    for layer in range(2):
        assert torch.equal(trimmed.read(layer, pos)[0], full.read(layer, pos)[0])
        assert torch.equal(trimmed.read(layer, pos)[1], full.read(layer, pos)[1])
    assert trimmed.head_map.is_all_global and stash.nbytes == 0
    _decode(trimmed, [1] * 40)  # after the restore nothing is trimmed any more
    assert bool((trimmed.tables[0] >= 0).all())


def test_restore_refuses_a_hole_and_leaves_the_pool_as_it_was():
    hm = _map()
    pool = PagePool(hm, head_dim=D, dtype=torch.float32, device="cpu", page_tokens=N)
    stash = TrimStash()
    stash.attach(pool)
    _decode(pool, [64] + [1] * 40)
    stash.forget_below(48, N)  # as if the daemon held [0, 48): but no daemon is given
    before = [t.clone() for t in pool.tables]
    assert "no daemon handle" in restore_full_kv(pool, stash)
    assert all(torch.equal(a, b) for a, b in zip(before, pool.tables)) and not pool.head_map.is_all_global


def test_forget_below_keeps_only_pages_past_the_daemons_chunks():
    pool = PagePool(_map(), head_dim=D, dtype=torch.float32, device="cpu", page_tokens=N)
    stash = TrimStash()
    stash.attach(pool)
    _decode(pool, [96] + [1] * 64)
    total = stash.nbytes
    stash.forget_below(64, N)
    kept = sum(int(r.numel()) for parts in stash.pages.values() for r, _, _, _ in parts)
    assert all(bool((c * N >= 64).all()) for parts in stash.pages.values() for _, c, _, _ in parts)
    assert stash.nbytes == kept * 2 * N * D * 4 < total
