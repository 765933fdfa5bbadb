"""The vLLM connector's worker side (``WorkerIO``) against a real daemon, with stand-in KV layers.

Layers are ``[num_blocks, H, N, 2D]`` tensors in the CPU backend's ``vec`` packing; each test drives
the hooks in vLLM's order (begin_step, start_loads, per layer load/save, end_step) with hand-built
plans, and checks the blocks, the daemon's entries and the blocks reported as failed.
"""

from __future__ import annotations

import time

import pytest
import torch

from kvd.connectors.vllm.copy import make_copier
from kvd.connectors.vllm.layout import BlockLayout, known_layout
from kvd.connectors.vllm.plan import LoadSpec, SaveSpec, StepPlan
from kvd.connectors.vllm.settings import ConnectorSettings, open_session
from kvd.connectors.vllm.worker import WorkerIO
from kvd.core import protocol as P
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec, prefix_hashes, prefix_tail_hash
from tests.daemon_proc import DaemonProc

L, H, D, N = 3, 2, 16, 128
C = 256
NUM_BLOCKS = 24
NS = "worker"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProc(tmp_path_factory.mktemp("kvd")).start()
    yield d
    d.kill()


def layout(n: int = N) -> BlockLayout:
    to = known_layout("LBHNC_KT", H, n, D)
    fr = torch.empty_like(to)
    fr[to] = torch.arange(to.numel())
    return BlockLayout("LBHNC_KT", H, n, D, to, fr)


def make_worker(d: DaemonProc, model: str, *, head_map=None, ratio: int = 1, seed: int = 0, client=None,
                **kw) -> WorkerIO:
    spec = ModelSpec(model, num_layers=L, num_kv_heads=H, head_dim=D, kv_dtype="bfloat16")
    settings = ConnectorSettings(socket=d.socket, namespace=NS, timeout_s=1.0, **kw)
    s = open_session(settings, spec, head_map, block_size=N, role="worker", client=client)
    g = torch.Generator().manual_seed(seed)
    n = N // ratio  # kernel blocks smaller than vLLM's blocks: dim 0 has ratio x as many
    kv = {f"model.layers.{i}.self_attn.attn": torch.randn(NUM_BLOCKS * ratio, H, n, 2 * D, generator=g).bfloat16()
          for i in range(L)}
    return WorkerIO(s, settings, kv, make_copier(layout(n), next(iter(kv.values()))), block_size=N, num_blocks=NUM_BLOCKS)


def hashes(w: WorkerIO, toks: list[int]) -> tuple[str, ...]:
    return tuple(prefix_hashes(toks, chunk_tokens=C, namespace=NS, fingerprint=w.session.spec.fingerprint()))


def run_step(w: WorkerIO, plan: StepPlan, *, layers: int = L) -> set[int]:
    w.begin_step(plan)
    w.start_loads()
    for name, kv in list(w.kv_caches.items())[:layers]:
        w.load_layer(name)
        w.save_layer(name, kv)
    w.end_step()
    return w.take_load_errors()


def blocks_equal(a: WorkerIO, a_ids, b: WorkerIO, b_ids) -> bool:
    r = a.ratio
    ka = [x * r + j for x in a_ids for j in range(r)]
    kb = [x * r + j for x in b_ids for j in range(r)]
    return all(torch.equal(ta[ka], tb[kb]) for ta, tb in zip(a.kv_caches.values(), b.kv_caches.values()))


def toks_for(seed: int, n: int = 800) -> list[int]:
    return [(seed * 104729 + i * 17) % 49000 for i in range(n)]


def stored_prompt(d: DaemonProc, model: str, seed: int) -> tuple[WorkerIO, tuple[str, ...]]:
    """A worker that stored an 800-token prompt's three chunks from blocks 1-7, and their keys."""
    src = make_worker(d, model, seed=seed)
    toks = toks_for(seed)
    hs = hashes(src, toks)
    run_step(src, StepPlan(saves=(SaveSpec("a", NS, 0, hs, tuple(range(1, 8)), len(toks)),)))
    return src, hs


@pytest.mark.parametrize("ratio", [1, 2], ids=["block=kernel", "block=2-kernel-blocks"])
@pytest.mark.parametrize("two_classes", [False, True], ids=["all-global", "head-map"])
def test_save_then_load_round_trip_is_bit_exact(daemon, ratio, two_classes):
    hm = HeadMap.from_classes("m", [[True, False]] * L, sink=4, window=64) if two_classes else None
    model = f"m-{ratio}-{two_classes}"
    src = make_worker(daemon, model, head_map=hm, ratio=ratio, seed=1)
    toks = toks_for(ratio * 10 + two_classes)
    hs = hashes(src, toks)
    src_blocks = (5, 2, 11, 7, 19, 3, 8)
    assert run_step(src, StepPlan(saves=(SaveSpec("a", NS, 0, hs, src_blocks, len(toks)),))) == set()
    assert src.counters["stored_chunks"] == 3
    dst = make_worker(daemon, model, head_map=hm, ratio=ratio, seed=2)
    dst_blocks = (4, 9, 1, 13, 6, 20, 12)
    assert run_step(dst, StepPlan(loads=(LoadSpec("b", NS, 0, hs, 0, 768, dst_blocks),))) == set()
    assert blocks_equal(src, src_blocks[:6], dst, dst_blocks[:6])
    assert dst.counters["loaded_tokens"] == 768
    with daemon.client() as c:
        assert c.stats().leases_held == 0  # released at the end of the step


def test_load_starting_inside_a_chunk_leaves_the_local_hit_alone(daemon):
    src, hs = stored_prompt(daemon, "partial", 3)
    dst = make_worker(daemon, "partial", seed=4)
    before = {n: t.clone() for n, t in dst.kv_caches.items()}
    blocks = (14, 15, 16, 17, 18, 19)
    assert run_step(dst, StepPlan(loads=(LoadSpec("b", NS, 0, hs, 128, 768, blocks),))) == set()
    assert blocks_equal(src, (2, 3, 4, 5, 6), dst, blocks[1:])
    assert all(torch.equal(before[n][14], t[14]) for n, t in dst.kv_caches.items())  # vLLM's own block


def test_load_ending_inside_the_last_chunk_copies_only_its_first_blocks(daemon):
    src = make_worker(daemon, "partial-end", seed=5)
    toks = toks_for(5, 768)
    hs = hashes(src, toks)
    run_step(src, StepPlan(saves=(SaveSpec("a", NS, 0, hs, tuple(range(1, 7)), len(toks)),)))
    dst = make_worker(daemon, "partial-end", seed=6)
    before = {n: t.clone() for n, t in dst.kv_caches.items()}
    blocks = (14, 15, 16, 17, 18, 19)
    # A load that ends on a block boundary inside chunk 2 (vLLM took fewer tokens than offered).
    assert run_step(dst, StepPlan(loads=(LoadSpec("b", NS, 0, hs, 0, 640, blocks),))) == set()
    assert blocks_equal(src, (1, 2, 3, 4, 5), dst, blocks[:5])
    assert all(torch.equal(before[n][19], t[19]) for n, t in dst.kv_caches.items())  # left to vLLM
    assert dst.counters["loaded_tokens"] == 640


@pytest.mark.parametrize("two_classes", [False, True], ids=["all-global", "head-map"])
def test_tail_entry_round_trip_and_shape_check(daemon, two_classes):
    hm = HeadMap.from_classes("m", [[True, False]] * L, sink=4, window=64) if two_classes else None
    model = f"tail-{two_classes}"
    src = make_worker(daemon, model, head_map=hm, seed=7)
    toks = toks_for(7, 700)  # 2 chunks + a tail of one block: tokens [512, 640)
    hs = hashes(src, toks)
    tail = prefix_tail_hash(toks, chunk_tokens=C, tail_tokens=128, namespace=NS,
                            fingerprint=src.session.spec.fingerprint(), parent=hs[-1])
    src_blocks = (3, 8, 1, 6, 2, 9)
    plan = StepPlan(saves=(SaveSpec("a", NS, 0, (*hs, tail), src_blocks, len(toks), last_tokens=128),))
    assert run_step(src, plan) == set()
    assert src.counters["stored_chunks"] == 3
    with daemon.client() as c:
        (row,) = [r for r in c.lookup(P.LookupRequest(fingerprint=src.session.handle().fingerprint, namespace=NS,
                                                      prefix_hashes=[*hs, tail])).prefix if r.hash == tail]
        assert row.num_tokens == 128
    dst = make_worker(daemon, model, head_map=hm, seed=8)
    before = {n: t.clone() for n, t in dst.kv_caches.items()}
    dst_blocks = (10, 4, 14, 7, 11, 13)
    load = LoadSpec("b", NS, 0, (*hs, tail), 0, 640, dst_blocks, last_tokens=128)
    assert run_step(dst, StepPlan(loads=(load,))) == set()
    assert blocks_equal(src, src_blocks[:5], dst, dst_blocks[:5])
    assert all(torch.equal(before[n][13], t[13]) for n, t in dst.kv_caches.items())  # the last block: vLLM's
    # A spec that takes the tail for a full chunk (wrong shape) is refused, its blocks reported, not copied.
    dst2 = make_worker(daemon, model, head_map=hm, seed=9)
    before = {n: t.clone() for n, t in dst2.kv_caches.items()}
    errors = run_step(dst2, StepPlan(loads=(LoadSpec("c", NS, 0, (*hs, tail), 0, 768, dst_blocks + (15,)),)))
    assert errors == {11, 13}  # tokens [512, 768): the entry that does not have the expected shape
    assert blocks_equal(src, src_blocks[:4], dst2, dst_blocks[:4])  # the two full chunks still load
    assert all(torch.equal(before[n][b], t[b]) for n, t in dst2.kv_caches.items() for b in (11, 13))


def test_missing_chunk_reports_its_blocks_and_loads_the_rest(daemon):
    src = make_worker(daemon, "missing", seed=5)
    toks = toks_for(5)
    hs = hashes(src, toks)
    run_step(src, StepPlan(saves=(SaveSpec("a", NS, 0, hs[:2], tuple(range(1, 8)), len(toks)),)))
    dst = make_worker(daemon, "missing", seed=6)
    blocks = (10, 11, 12, 13, 14, 15)
    errors = run_step(dst, StepPlan(loads=(LoadSpec("b", NS, 0, hs, 0, 768, blocks),)))
    assert errors == {14, 15}  # chunk 2's blocks: vLLM recomputes from there
    assert blocks_equal(src, (1, 2, 3, 4), dst, blocks[:4])
    assert dst.counters["load_failed_tokens"] == 256


def corrupt_chunk(w: WorkerIO, key: str) -> None:
    """Flip bits of the first extent of entry ``key`` in the arena, as a stray write would."""
    c, h = w.session.client, w.session.handle()
    lease = c.lease(P.LeaseRequest(fingerprint=h.fingerprint, namespace=NS, hashes=[key]))
    x = lease.entries[0].extents[0]
    view = c.arena(lease.arena_id).bytes_at(x.offset, 4)
    view[:] = bytes(b ^ 0xFF for b in view)
    c.release(P.ReleaseRequest(lease_id=lease.lease_id))


@pytest.mark.parametrize("mode", ["with-copy", "before-copy", "before-copy-fail-policy"])
def test_a_corrupt_extent_fails_its_blocks_and_the_requests_store(daemon, mode):
    """Checksums taken during the copy (the default) or before it (``verify_with_copy=false``, or any
    policy but recompute): either way the corrupt chunk's blocks and those after it are reported failed
    and the request stores nothing in that step; before the copy, the blocks are not even written."""
    src, hs = stored_prompt(daemon, f"corrupt-{mode}", 7)
    corrupt_chunk(src, hs[1])
    dst = make_worker(daemon, f"corrupt-{mode}", seed=8, verify_with_copy=mode == "with-copy")
    if mode == "before-copy-fail-policy":
        dst = WorkerIO(dst.session, ConnectorSettings(socket=daemon.socket, namespace=NS, timeout_s=1.0),
                       dst.kv_caches, dst.copier, block_size=N, num_blocks=NUM_BLOCKS, recompute_failures=False)
    assert dst.sums_with_copy == (mode == "with-copy")
    before = {n: t.clone() for n, t in dst.kv_caches.items()}
    more = toks_for(70, 1024)  # the same request also stores chunks it computes in this step
    plan = StepPlan(loads=(LoadSpec("b", NS, 0, hs, 0, 768, tuple(range(10, 16))),),
                    saves=(SaveSpec("b", NS, 0, hashes(dst, more)[3:], tuple(range(16, 24)), len(more)),))
    assert run_step(dst, plan) == {12, 13, 14, 15}
    assert dst.counters["checksum_failures"] == 1 and dst.counters["stored_chunks"] == 0
    assert blocks_equal(src, (1, 2), dst, (10, 11))  # chunk 0 loaded
    untouched = all(torch.equal(before[n][12:14], t[12:14]) for n, t in dst.kv_caches.items())
    assert untouched == (mode != "with-copy")


def test_checksums_taken_with_the_copy_accept_a_clean_load_whatever_the_layer_order(daemon):
    src, hs = stored_prompt(daemon, "sums-order", 11)
    dst = make_worker(daemon, "sums-order", seed=12)
    dst.begin_step(StepPlan(loads=(LoadSpec("b", NS, 0, hs, 0, 768, tuple(range(10, 16))),)))
    dst.start_loads()
    for name in reversed(list(dst.kv_caches)):  # out of order: the extents are hashed whole at the end
        dst.load_layer(name)
    dst.end_step()
    assert dst.take_load_errors() == set() and dst.counters["checksum_failures"] == 0
    assert blocks_equal(src, (1, 2, 3, 4, 5, 6), dst, tuple(range(10, 16)))


def test_a_request_whose_load_failed_stores_nothing_that_step(daemon):
    w = make_worker(daemon, "no-bad-store", seed=9)
    toks = toks_for(9)
    hs = hashes(w, toks)
    plan = StepPlan(loads=(LoadSpec("r", NS, 0, hs[:2], 0, 512, tuple(range(1, 8))),),
                    saves=(SaveSpec("r", NS, 2, hs[2:], tuple(range(1, 8)), len(toks)),))
    assert run_step(w, plan) == {1, 2, 3, 4}  # nothing stored: the lease finds no chunk
    assert w.counters["stored_chunks"] == 0
    with daemon.client() as c:
        assert c.lookup(P.LookupRequest(
            fingerprint=w.session.spec.fingerprint(), namespace=NS, prefix_hashes=list(hs))).prefix == []


def test_store_is_aborted_unless_every_layer_was_written(daemon):
    w = make_worker(daemon, "short", seed=10)
    toks = toks_for(10)
    hs = hashes(w, toks)
    run_step(w, StepPlan(saves=(SaveSpec("r", NS, 0, hs, tuple(range(1, 8)), len(toks)),)), layers=L - 1)
    assert w.counters["stored_chunks"] == 0 and w.counters["store_aborted_chunks"] == 3
    with daemon.client() as c:
        assert c.stats().reservations_open == 0


def test_daemon_killed_loads_fail_fast_and_stores_are_skipped(tmp_path):
    d = DaemonProc(tmp_path).start()
    w = make_worker(d, "killed", seed=11)
    toks = toks_for(11)
    hs = hashes(w, toks)
    run_step(w, StepPlan(saves=(SaveSpec("a", NS, 0, hs, tuple(range(1, 8)), len(toks)),)))
    d.kill()
    t0 = time.monotonic()
    for _ in range(5):
        errors = run_step(w, StepPlan(loads=(LoadSpec("b", NS, 0, hs, 0, 768, tuple(range(10, 16))),),
                                      saves=(SaveSpec("c", NS, 0, hs, tuple(range(1, 8)), len(toks)),)))
        assert errors == set(range(10, 16))
    assert time.monotonic() - t0 < 3.0
    assert w.counters["stored_chunks"] == 3  # only the first step's


def slow_step(w: WorkerIO, plan: StepPlan, pause_s: float) -> set[int]:
    """``run_step`` with ``pause_s`` of model compute before each layer (a forward on a slow CPU)."""
    w.begin_step(plan)
    w.start_loads()
    for name, kv in w.kv_caches.items():
        time.sleep(pause_s)
        w.load_layer(name)
        w.save_layer(name, kv)
    w.end_step()
    return w.take_load_errors()


def test_a_step_longer_than_the_ttl_keeps_its_lease_and_reservation(tmp_path):
    """Seen on a 2-core AVX2 VM: a 1,000-token forward took 43 s, longer than the 30 s TTL, and the
    commit was refused. Renewed between layers, both holds outlive the TTL: the store commits, the
    load copies every layer, nothing is reported failed."""
    ttl = 0.9
    d = DaemonProc(tmp_path, env_extra={"KVD_HOST__LEASE_TTL_S": str(ttl),
                                        "KVD_HOST__RESERVATION_TTL_S": str(ttl)}).start()
    try:
        src = make_worker(d, "slow", seed=13)
        toks = toks_for(13)
        hs = hashes(src, toks)
        save = StepPlan(saves=(SaveSpec("a", NS, 0, hs, tuple(range(1, 8)), len(toks)),))
        assert slow_step(src, save, pause_s=ttl * 0.6) == set()  # 3 layers: 1.6 s, about 2 TTLs
        assert src.counters["stored_chunks"] == 3 and src.counters["renew_refused"] == 0
        dst = make_worker(d, "slow", seed=14)
        blocks = tuple(range(10, 16))
        assert slow_step(dst, StepPlan(loads=(LoadSpec("b", NS, 0, hs, 0, 768, blocks),)), pause_s=ttl * 0.6) == set()
        assert blocks_equal(src, (1, 2, 3, 4, 5, 6), dst, blocks)
        with d.client() as c:
            assert c.stats().leases_held == 0 and c.stats().reservations_open == 0
        # a pause longer than the TTL between two layers: the lease lapses before the next copy, whose
        # bytes may be anyone's by then; every block of the load is reported, vLLM recomputes them
        late = make_worker(d, "slow", seed=15)
        errors = slow_step(late, StepPlan(loads=(LoadSpec("c", NS, 0, hs, 0, 768, blocks),)), pause_s=ttl + 0.7)
        assert errors == set(blocks) and late.counters["renew_refused"] == 1
    finally:
        d.kill()


# ---- issue 11: defects found with held-out prompts ------------------------------------------------


def test_entry_holding_more_tokens_than_its_key_names_loads_its_leading_blocks(daemon):
    """A strict prefix of a stored prompt finds its tail key as an alias of the stored chunk: the lease
    answers with the chunk's extents (256 tokens) for a key that names 128. The worker refused any
    entry whose size was not exactly the planned one; it must copy the leading 128 tokens, and still
    never use an entry holding fewer tokens than it needs."""
    src = make_worker(daemon, "alias", seed=12)
    toks = toks_for(12)
    hs = hashes(src, toks)
    short_tail = prefix_tail_hash(toks[:700], chunk_tokens=C, tail_tokens=128, namespace=NS,
                                  fingerprint=src.session.spec.fingerprint(), parent=hs[1])
    # Chunk 2 stored under the short prompt's tail key, as the daemon resolves that alias.
    src_blocks = (5, 2, 11, 7, 19, 3)
    assert run_step(src, StepPlan(saves=(SaveSpec("a", NS, 0, (hs[0], hs[1], short_tail), src_blocks, 800),))) == set()
    dst = make_worker(daemon, "alias", seed=13)
    before = {n: t.clone() for n, t in dst.kv_caches.items()}
    dst_blocks = (4, 9, 1, 13, 6, 20)
    load = LoadSpec("b", NS, 0, (hs[0], hs[1], short_tail), 0, 640, dst_blocks, last_tokens=128)
    assert run_step(dst, StepPlan(loads=(load,))) == set()
    assert blocks_equal(src, src_blocks[:5], dst, dst_blocks[:5])
    assert all(torch.equal(before[n][20], t[20]) for n, t in dst.kv_caches.items())  # the rest of the chunk: not read
    assert dst.counters["loaded_tokens"] == 640


def test_saves_send_their_prefix_aliases(daemon):
    from tests.client.recording import RecordingClient

    with RecordingClient(daemon.socket, timeout_s=1.0) as client:
        w = make_worker(daemon, "aliases-sent", seed=14, client=client)
        toks = toks_for(14, 600)
        hs = hashes(w, toks)
        aliases = ((("ab" * 16, 128),), (("cd" * 16, 128),))
        assert run_step(w, StepPlan(saves=(SaveSpec("a", NS, 0, hs, (1, 2, 3, 4), 600, aliases=aliases),))) == set()
        sent = client.last(P.ReserveRequest)
        assert [[(a.hash, a.num_tokens) for a in e.aliases] for e in sent.entries] == [[("ab" * 16, 128)],
                                                                                       [("cd" * 16, 128)]]


def test_load_up_to_the_last_prompt_token_fills_its_block_in_part(daemon):
    """A 768-token prompt whose chunks are all stored loads 767 tokens: the last block in part."""
    src = make_worker(daemon, "to-last-token", seed=7)
    toks = toks_for(7, 768)
    hs = hashes(src, toks)
    run_step(src, StepPlan(saves=(SaveSpec("a", NS, 0, hs, (1, 2, 3, 4, 5, 6), len(toks)),)))
    dst = make_worker(daemon, "to-last-token", seed=8)
    lay = layout()
    before = {n: t.clone() for n, t in dst.kv_caches.items()}
    assert run_step(dst, StepPlan(loads=(LoadSpec("b", NS, 0, hs, 0, 767, (9, 10, 11, 12, 13, 14)),))) == set()
    assert blocks_equal(src, (1, 2, 3, 4, 5), dst, (9, 10, 11, 12, 13))
    for (name, s), d in zip(src.kv_caches.items(), dst.kv_caches.values()):
        got = d[14].reshape(-1)[lay.to_canon].view(H, 2, N, D)
        assert torch.equal(got[:, :, :127], s[6].reshape(-1)[lay.to_canon].view(H, 2, N, D)[:, :, :127])
        assert torch.equal(got[:, :, 127], before[name][14].reshape(-1)[lay.to_canon].view(H, 2, N, D)[:, :, 127])
    assert dst.counters["loaded_tokens"] == 767


def test_a_copier_of_whole_blocks_stops_before_a_block_it_would_fill_in_part(daemon):
    """PermCopier moves whole blocks: the load stops at the block boundary and reports the last block
    failed (vLLM recomputes it) instead of overwriting what vLLM computed there."""
    from kvd.connectors.vllm.copy import PermCopier

    src = make_worker(daemon, "whole-only", seed=9)
    toks = toks_for(9, 768)
    hs = hashes(src, toks)
    run_step(src, StepPlan(saves=(SaveSpec("a", NS, 0, hs, (1, 2, 3, 4, 5, 6), len(toks)),)))
    dst = make_worker(daemon, "whole-only", seed=10)
    dst.copier = PermCopier(layout())
    before = {n: t[14].clone() for n, t in dst.kv_caches.items()}
    errors = run_step(dst, StepPlan(loads=(LoadSpec("b", NS, 0, hs, 0, 767, (9, 10, 11, 12, 13, 14)),)))
    assert errors == {14}
    assert blocks_equal(src, (1, 2, 3, 4, 5), dst, (9, 10, 11, 12, 13))
    assert all(torch.equal(before[n], t[14]) for n, t in dst.kv_caches.items())


def test_checksums_are_taken_during_the_copy_only_where_the_copier_feeds_them(daemon):
    """The strided copier hashes rows on the CPU only: for KV on another device (a GPU build with a
    probed layout) and for the other copiers, each lease is hashed before the copy."""
    from kvd.connectors.vllm.copy import PermCopier

    w = make_worker(daemon, "sums-where", seed=13)
    assert w.sums_with_copy
    w.kv_caches = {n: t.to("meta") for n, t in w.kv_caches.items()}
    assert not w.sums_with_copy
    w = make_worker(daemon, "sums-where", seed=13)
    w.copier = PermCopier(layout())
    assert not w.sums_with_copy


def test_a_failed_load_taints_the_requests_saves_until_the_scheduler_has_heard_of_it(daemon):
    """Under vLLM's async scheduling, step R+1 is planned and run before step R's load errors reach the
    scheduler: a prefill chunk computed in R+1 attends to the blocks R failed to fill, so it must not
    be stored either (found by an audit, 2026-12-07). A save planned after the scheduler learnt of the
    failure (a newer ``epoch``: vLLM recomputed those blocks) is stored."""
    w = make_worker(daemon, "async-taint", seed=11)
    toks = toks_for(11, 1100)
    hs = hashes(w, toks)
    blocks = tuple(range(1, 10))
    step_r = StepPlan(loads=(LoadSpec("r", NS, 0, hs[:2], 0, 512, blocks),),
                      saves=(SaveSpec("r", NS, 2, hs[2:3], blocks, len(toks)),))
    assert run_step(w, step_r) == {1, 2, 3, 4}  # the lease finds nothing: blocks 1-4 hold garbage
    # Step R+1, planned before R's errors were known: the next prefill chunk completes chunk 3.
    run_step(w, StepPlan(saves=(SaveSpec("r", NS, 3, hs[3:4], blocks, len(toks)),)))

    def stored(*keys: str) -> list:
        with daemon.client() as c:
            return c.lookup(P.LookupRequest(fingerprint=w.session.spec.fingerprint(), namespace=NS,
                                            prefix_hashes=list(keys))).prefix

    assert stored(hs[3]) == [] and w.counters["stored_chunks"] == 0
    assert w.counters["store_aborted_chunks"] == 2  # chunk 2 in step R, chunk 3 in step R+1
    other = SaveSpec("q", NS, 0, hs[:1], blocks, len(toks))  # another request is not affected
    run_step(w, StepPlan(saves=(other,)))
    assert len(stored(hs[0])) == 1
    # The scheduler has heard (epoch 1) and vLLM recomputed the blocks: the request stores again.
    run_step(w, StepPlan(saves=(SaveSpec("r", NS, 1, hs[1:4], blocks, len(toks), epoch=1),)))
    assert len(stored(*hs[:4])) == 4 and "r" not in w.failures.tainted
    # A request that fails and finishes is forgotten at the next plan.
    run_step(w, StepPlan(loads=(LoadSpec("s", NS, 0, hashes(w, toks_for(12, 600))[:1], 0, 256, blocks),)))
    assert "s" in w.failures.tainted
    run_step(w, StepPlan(finished=("s",)))
    assert "s" not in w.failures.tainted


def test_with_speculative_decoding_a_corrupt_load_is_reported_in_its_own_step(daemon):
    """With a speculative config vLLM defers ``wait_for_save`` until after the drafter ran, and takes
    ``get_block_ids_with_load_errors`` before it (``_get_kv_connector_output(defer_finalize=True)``,
    0.32). A chunk failing its checksum (found after the copy) must still be reported in the step that
    read it: reported a step late, vLLM keeps the token that step sampled from the corrupt KV."""
    src, hs = stored_prompt(daemon, "deferred-finalize", 17)
    corrupt_chunk(src, hs[1])
    dst = make_worker(daemon, "deferred-finalize", seed=18)
    more = toks_for(71, 1024)
    dst.begin_step(StepPlan(loads=(LoadSpec("b", NS, 0, hs, 0, 768, tuple(range(10, 16))),),
                            saves=(SaveSpec("b", NS, 0, hashes(dst, more)[3:], tuple(range(16, 24)), len(more)),)))
    dst.start_loads()
    for name, kv in dst.kv_caches.items():
        dst.load_layer(name)
        dst.save_layer(name, kv)
    assert dst.take_load_errors() == {12, 13, 14, 15}  # taken before wait_for_save
    dst.end_step()
    assert dst.counters["checksum_failures"] == 1 and dst.counters["stored_chunks"] == 0
    assert dst.take_load_errors() == set()  # not reported again in the next step


@pytest.mark.parametrize("verify_with_copy", [False, True], ids=["checked-before-copy", "checked-with-copy"])
def test_a_load_whose_release_fails_is_failed_when_its_bytes_were_checked_before_the_copy(tmp_path, verify_with_copy):
    """The daemon dies during a step's load. A new daemon started before the copy ends frees the dead
    one's arena pages (so its own fits /dev/shm), and the rest of the copy reads zeros. Checksums
    taken with the copy catch that; checked before the copy (verify_with_copy false) nothing did, and
    the failed release was ignored: the copied bytes were used. Now that load fails (vLLM recomputes)."""
    d = DaemonProc(tmp_path).start()
    try:
        src, hs = stored_prompt(d, "release-fails", 7)
        dst = make_worker(d, "release-fails", seed=8, verify_with_copy=verify_with_copy)
        dst.begin_step(StepPlan(loads=(LoadSpec("b", NS, 0, hs, 0, 768, tuple(range(10, 16))),)))
        dst.start_loads()
        for name in dst.kv_caches:
            dst.load_layer(name)
        d.kill()  # after the copy, before the release
        dst.end_step()
        errors = dst.take_load_errors()
        assert errors == (set() if verify_with_copy else set(range(10, 16)))
    finally:
        d.kill()
