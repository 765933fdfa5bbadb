"""The vLLM connector's KV copies: layout probing and the copiers, without a running engine.

The probe is checked against writers of known layouts and against vLLM's own CPU write kernel (every
ISA this CPU has); the copiers are checked against each other and against ``kvd.gpu_kernels``'
gather/scatter references, bit for bit, with non-contiguous block ids, a head map that splits heads
into two classes, and loads that start inside a chunk.
"""

from __future__ import annotations

import pytest
import torch
import xxhash

from kvd.client.views import numpy_view
from kvd.connectors.vllm.copy import KernelCopier, PermCopier, Piece, StridedCopier, make_copier
from kvd.connectors.vllm.layout import known_layout, probe_block_layout
from kvd.core.extents import plan_extents
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec
from kvd.gpu_kernels import gather_segments_ref

H, N, D, L = 3, 16, 8, 4  # heads, block tokens, head dim, layers
CHUNK = 2 * N


def writer_for(name: str):
    """A pure-torch cache write for a named layout (what a backend's ``do_kv_cache_update`` does)."""
    pos = known_layout(name, H, N, D).view(H, 2, N, D)

    def write(key, value, kv, slots):
        blocks = torch.as_strided(kv, (kv.shape[0], H * N * 2 * D), (kv.stride(0), 1))
        for i, s in enumerate(slots.tolist()):
            b, n = divmod(s, N)
            blocks[b, pos[:, 0, n, :].reshape(-1)] = key[i].reshape(-1)
            blocks[b, pos[:, 1, n, :].reshape(-1)] = value[i].reshape(-1)

    return write


def layer_tensor(name: str, num_blocks: int, dtype=torch.bfloat16) -> torch.Tensor:
    """A ``[B, H, N, 2D]`` view with the strides vLLM gives ``name`` (LBNHC is physically [B, N, H, 2D])."""
    if name == "LBNHC":
        return torch.zeros(num_blocks, N, H, 2 * D, dtype=dtype).permute(0, 2, 1, 3)
    return torch.zeros(num_blocks, H, N, 2 * D, dtype=dtype)


@pytest.mark.parametrize("name", ["LBHNC_KT", "LBHNC", "LBNHC"])
def test_probe_names_known_layouts(name):
    lay = probe_block_layout(writer_for(name), layer_tensor(name, 4))
    assert lay.name == name
    assert torch.equal(lay.to_canon, known_layout(name, H, N, D))
    assert torch.equal(lay.from_canon[lay.to_canon], torch.arange(H * 2 * N * D))


def test_probe_maps_an_unnamed_packing():
    """A packing with no name (here a random bijection of the block) is still mapped exactly."""
    pos = torch.randperm(H * 2 * N * D, generator=torch.Generator().manual_seed(1)).view(H, 2, N, D)

    def write(key, value, kv, slots):
        blocks = kv.reshape(kv.shape[0], -1)
        for i, s in enumerate(slots.tolist()):
            b, n = divmod(s, N)
            blocks[b, pos[:, 0, n].reshape(-1)] = key[i].reshape(-1)
            blocks[b, pos[:, 1, n].reshape(-1)] = value[i].reshape(-1)

    lay = probe_block_layout(write, layer_tensor("LBHNC", 4))
    assert lay.name == "probed"
    assert torch.equal(lay.to_canon, pos.reshape(-1))
    assert isinstance(make_copier(lay, layer_tensor("LBHNC", 4)), PermCopier)  # not a strided view


def test_probe_refuses_a_lossy_write():
    def write(key, value, kv, slots):  # forgets V
        writer_for("LBHNC")(key, torch.zeros_like(value), kv, slots)

    with pytest.raises(Exception, match="untouched"):
        probe_block_layout(write, layer_tensor("LBHNC", 4))


def vllm_cpu_isas():
    ops = pytest.importorskip("vllm._custom_ops")
    isas = [("vec", torch.float32), ("vec", torch.bfloat16)]
    if torch.cpu._is_amx_tile_supported():
        isas.append(("amx", torch.bfloat16))
    return ops, isas


def test_probe_matches_vllm_cpu_write_kernel_on_every_isa():
    """vLLM's CPU kernel: ``vec`` is K transposed (gather_scatter's LBHNC_KT); ``amx`` packs tiles."""
    ops, isas = vllm_cpu_isas()
    for isa, dtype in isas:
        Hn, Nn, Dn = 2, 32, 64  # the CPU kernels need block size % 32 == 0 and head_dim % 16 == 0

        def write(key, value, kv, slots, isa=isa, Hn=Hn, Nn=Nn, Dn=Dn):
            kc, vc = kv.view(kv.shape[0], Hn, 2 * Nn, Dn).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)

        lay = probe_block_layout(write, torch.zeros(3, Hn, Nn, 2 * Dn, dtype=dtype))
        if isa == "vec":
            assert lay.name == "LBHNC_KT", (isa, dtype)
        # Whatever the packing, a block written by the kernel reads back canonically through the map.
        kv = torch.zeros(3, Hn, Nn, 2 * Dn, dtype=dtype)
        k = torch.randn(Nn, Hn, Dn).to(dtype)
        v = torch.randn(Nn, Hn, Dn).to(dtype)
        write(k, v, kv, torch.arange(2 * Nn, 3 * Nn))
        canon = kv[2].reshape(-1)[lay.to_canon].view(Hn, 2, Nn, Dn)
        assert torch.equal(canon[:, 0], k.permute(1, 0, 2)) and torch.equal(canon[:, 1], v.permute(1, 0, 2))
        # Every ISA's packing is a strided view of the block, so the fast copier serves it.
        copier = make_copier(lay, kv)
        assert isinstance(copier, StridedCopier), (isa, dtype)
        spec = ModelSpec("m", num_layers=1, num_kv_heads=Hn, head_dim=Dn, kv_dtype=str(dtype)[6:])
        plan = plan_extents(spec, None, Nn)["global"]
        seg = torch.zeros(plan.num_segments, 2, Nn, Dn, dtype=dtype)
        copier.save_layer(kv, 0, [Piece([2], 0, Nn, [(plan, seg)])])
        assert torch.equal(seg[:, 0], k.permute(1, 0, 2)) and torch.equal(seg[:, 1], v.permute(1, 0, 2))
        back = torch.zeros_like(kv)
        copier.load_layer(back, 0, [Piece([1], 0, Nn, [(plan, seg)])])
        assert torch.equal(back[1], kv[2])


def vllm_write(ops, isa: str):
    """vLLM's CPU ``do_kv_cache_update``: the cache shaped from ``kv`` itself, so a head view works too."""

    def write(key, value, kv, slots):
        kc, vc = kv.view(kv.shape[0], kv.shape[1], 2 * kv.shape[2], -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)

    return write


def shifted_write(write):
    """``write`` as a kernel that ignores where a head view starts: its heads land on the first heads."""

    def shifted(key, value, kv, slots):
        write(key, value, torch.as_strided(kv, kv.shape, kv.stride(), kv.storage_offset() // kv.stride(0) * kv.stride(0)),
              slots)

    return shifted


HEAD_SPLITS = {  # per layer, which of 3 heads are global (None: no head map, one extent)
    "one_extent": None,
    "two_extents": [[True, False, False], [False, False, True]],  # layer 0: [0:1] | [1:3]; 1: [2:3] | [0:2]
    "not_consecutive": [[True, False, True], [True, True, False]],  # layer 0: heads [0, 2] in one extent
}


def head_split_load(split: str, dtype):
    """Pieces of a 3-head, 2-layer model loaded into blocks of 32 tokens: one ending inside its block
    in the middle of the load, one whole, one ending inside its last block."""
    Hn, Nn, Dn = 3, 32, 64
    spec = ModelSpec("m", num_layers=2, num_kv_heads=Hn, head_dim=Dn, kv_dtype=str(dtype)[6:])
    grid = HEAD_SPLITS[split]
    hm = HeadMap.from_classes("m", grid, sink=4, window=16) if grid else None
    plans = list(plan_extents(spec, hm, 2 * Nn).values())
    assert len(plans) == (1 if grid is None else 2)
    g = torch.Generator().manual_seed(3)
    segs = [[(p, torch.randn(p.num_segments, 2, 2 * Nn, Dn, generator=g).to(dtype)) for p in plans] for _ in range(3)]
    return [Piece([9, 3], 0, 2 * Nn - 5, segs[0]), Piece([5, 6], 0, 2 * Nn, segs[1]), Piece([0, 11], 0, Nn + 7, segs[2])]


def load_all(copier, kv, pieces, *, staged: bool = False):
    """A fresh load of every layer, its blocks and each extent's checksum (``Piece.sums``)."""
    if staged:
        copier._write_direct = lambda *a: False
    out = [torch.zeros_like(kv) for _ in range(2)]
    for p in pieces:
        p.sums = [xxhash.xxh3_64() for _ in p.extents]
    for layer in range(2):
        copier.load_layer(out[layer], layer, pieces)
    copier.__dict__.pop("_write_direct", None)
    return out, [[h.hexdigest() for h in p.sums] for p in pieces]


def same_bytes(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


def assert_heads_hold_their_rows(copier, layers, pieces) -> None:
    """Each loaded token of each head holds that head's rows of its extent (read back through the
    probed layout), and the tokens after a piece's end in its last block stay zero."""
    N, H = copier.layout.block_tokens, copier.layout.num_heads
    for layer, kv in enumerate(layers):
        for p in pieces:
            for i, b in enumerate(p.block_ids):
                r = min(N, p.t1 - p.t0 - i * N)
                canon = kv[b].reshape(-1)[copier.layout.to_canon].view(H, 2, N, -1)
                for plan, seg in p.extents:
                    s0, s1 = plan.layer_span(layer)
                    for k, (_, h) in enumerate(plan.heads[s0:s1]):
                        want = seg[s0 + k, :, p.t0 + i * N : p.t0 + i * N + r]
                        assert torch.equal(canon[h, :, :r], want), (layer, b, plan.head_class, h)
                assert not canon[:, :, r:].any(), (layer, b)


@pytest.mark.parametrize("split", HEAD_SPLITS)
def test_loads_packed_by_vllm_cpu_write_kernel_equal_the_strided_copy(split):
    """``adopt_engine_write``: loads packed by vLLM's own CPU cache write give the same bytes as the
    strided copy on every ISA, with a piece that ends inside its block in the middle of a load (two
    runs of staged tokens) and one at its end. Straight from the extents (no staging) when a piece's
    extents hold each of a layer's heads once, in consecutive runs: one extent (no head map), or two
    of a head map, each written into a head view of the layer, which vLLM's write honours (checked at
    adoption: ``engine_split``); through the staging where an extent's heads are not consecutive. Every
    path leaves each head's own rows (not another's) and the same checksums per extent as the staged
    path, which are the extents' own; a write that loses bytes is never adopted."""
    ops, isas = vllm_cpu_isas()
    for isa, dtype in isas:
        write = vllm_write(ops, isa)
        pieces = head_split_load(split, dtype)
        kv = torch.zeros(12, 3, 32, 128, dtype=dtype)
        copier = make_copier(probe_block_layout(write, kv), kv)
        copier.adopt_engine_write(write, kv, blocks=4, repeats=1)  # adopted or not: measured, either is right
        assert copier.engine_split, f"vLLM's {isa} write no longer honours head views: update EngineLoads' docstring"
        copier.engine_write = None
        want, _ = load_all(copier, kv, pieces)
        copier.engine_write = write
        staged, staged_sums = load_all(copier, kv, pieces, staged=True)
        got, sums = load_all(copier, kv, pieces)
        assert copier._write_direct(write, torch.zeros_like(kv), 0, pieces) is (split != "not_consecutive")
        assert copier._write_direct(write, torch.zeros_like(kv), 1, pieces)
        assert same_bytes(got, want) and same_bytes(staged, want), (isa, dtype)
        assert_heads_hold_their_rows(copier, got, pieces)
        assert sums == staged_sums == [[xxhash.xxh3_64_hexdigest(numpy_view(v)) for _, v in p.extents] for p in pieces]
        assert [(a, b) for a, b, _ in copier._engine_runs(pieces)] == [(0, 59), (64, 167)]

        def lossy(key, value, kv, slots, write=write):  # forgets the last token
            write(key[:-1], value[:-1], kv, slots[:-1])

        assert not copier.adopt_engine_write(lossy, kv, blocks=4, repeats=1) and copier.engine_write is None


def test_head_split_loads_need_a_write_that_honours_head_views():
    """A write that puts a head view's keys at the layer's first heads (as a kernel that ignores the
    view's offset would), or that cannot take a head view, still serves loads of whole layers but is
    not used for head-split ones: ``engine_split`` stays off and they go through the staging. Forced
    on anyway, the direct path would write the wrong heads, which the byte comparison catches."""
    ops, isas = vllm_cpu_isas()
    isa, dtype = isas[-1]  # amx where the CPU has it
    good = vllm_write(ops, isa)
    shifted = shifted_write(good)

    def whole_layer_only(key, value, kv, slots):
        kc, vc = kv.view(kv.shape[0], 3, 2 * kv.shape[2], -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)

    pieces = head_split_load("two_extents", dtype)
    kv = torch.zeros(12, 3, 32, 128, dtype=dtype)
    copier = make_copier(probe_block_layout(good, kv), kv)
    want, _ = load_all(copier, kv, pieces)
    for write in (shifted, whole_layer_only):
        copier.adopt_engine_write(write, kv, blocks=4, repeats=1)
        assert not copier.engine_split, write.__name__
        copier.engine_write = write
        assert not copier._write_direct(write, torch.zeros_like(kv), 0, pieces)
        got, _ = load_all(copier, kv, pieces)
        assert same_bytes(got, want), write.__name__
    copier.engine_split = True  # the check bypassed: the view's heads land on heads 0.. instead
    copier.engine_write = shifted
    got, _ = load_all(copier, kv, pieces)
    assert not same_bytes(got, want)
    with pytest.raises(AssertionError):
        assert_heads_hold_their_rows(copier, got, pieces)


def test_head_view_check_of_many_heads_covers_each_start_and_count():
    """Above 8 heads the start-up check writes each head alone and every prefix and suffix (not all
    ranges): 12 heads, 32 writes; a write that shifts views to the first heads still fails it."""
    ops, isas = vllm_cpu_isas()
    isa, dtype = isas[-1]
    good, calls = vllm_write(ops, isa), []

    def counted(key, value, kv, slots):
        calls.append(kv.shape[1])
        good(key, value, kv, slots)

    kv = torch.zeros(4, 12, 32, 128, dtype=dtype)
    copier = make_copier(probe_block_layout(good, kv), kv)
    assert copier._split_write_ok(counted, kv) and len(calls) == 32 and sorted(set(calls)) == list(range(1, 12))
    assert not copier._split_write_ok(shifted_write(good), kv)


# ---- copiers ------------------------------------------------------------------------------------


def head_map_two_classes():
    grid = [[h == (layer % H) for h in range(H)] for layer in range(L)]  # one global head per layer
    return HeadMap.from_classes("m", grid, sink=4, window=16)


def make_entries(num_chunks: int, head_map, dtype=torch.bfloat16):
    """Arena-like flat buffer with each chunk's extents, as ``Piece`` templates (block ids set later)."""
    spec = ModelSpec("m", num_layers=L, num_kv_heads=H, head_dim=D, kv_dtype=str(dtype).removeprefix("torch."))
    plans = plan_extents(spec, head_map, CHUNK)
    per_chunk = sum(p.nbytes for p in plans.values()) // spec.dtype_bytes
    arena = torch.zeros(num_chunks * per_chunk + 64, dtype=dtype)  # +64: extents at odd offsets
    entries, o = [], 64
    for _ in range(num_chunks):
        ext = []
        for plan in plans.values():
            n = plan.nbytes // spec.dtype_bytes
            ext.append((plan, arena[o : o + n].view(plan.num_segments, 2, CHUNK, D)))
            o += n
        entries.append(ext)
    return arena, entries


def fill_layers(name: str, num_blocks: int):
    g = torch.Generator().manual_seed(0)
    layers = [layer_tensor(name, num_blocks) for _ in range(L)]
    for t in layers:
        t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    return layers


BLOCKS = [[7, 2], [9, 4], [1, 11]]  # three chunks, two blocks each, neither contiguous nor sorted


COPIERS = {"strided": lambda lay, t: make_copier(lay, t), "perm": lambda lay, t: PermCopier(lay)}


@pytest.mark.parametrize("kind", COPIERS)
@pytest.mark.parametrize("head_map", [None, head_map_two_classes()], ids=["all-global", "two-classes"])
def test_copier_store_matches_gather_reference(kind, head_map):
    """Stored segments are canonical: equal to kvd.gpu_kernels' LBHNC_KT gather, bit for bit."""
    layers = fill_layers("LBHNC_KT", 12)
    arena, entries = make_entries(3, head_map)
    cp = COPIERS[kind](probe_block_layout(writer_for("LBHNC_KT"), layers[0]), layers[0])
    assert isinstance(cp, StridedCopier if kind == "strided" else PermCopier)
    pieces = [Piece(b, 0, CHUNK, e) for b, e in zip(BLOCKS, entries)]
    for layer in range(L):
        cp.save_layer(layers[layer], layer, pieces)
    for (blocks, ext) in zip(BLOCKS, entries):
        for plan, view in ext:
            for i, (layer, head) in enumerate(plan.heads):
                want = torch.empty(2 * CHUNK * D, dtype=torch.bfloat16)
                gather_segments_ref(layers[layer], torch.tensor(blocks), torch.tensor([head]), want,
                                    torch.tensor([0]), layout="LBHNC_KT")
                assert torch.equal(view[i].reshape(-1), want), (plan.head_class, layer, head)


@pytest.mark.parametrize("kind", COPIERS)
@pytest.mark.parametrize("name", ["LBHNC_KT", "LBHNC", "LBNHC"])
@pytest.mark.parametrize("head_map", [None, head_map_two_classes()], ids=["all-global", "two-classes"])
def test_copier_round_trip_with_partial_first_chunk(kind, name, head_map):
    src = fill_layers(name, 12)
    arena, entries = make_entries(3, head_map)
    cp = COPIERS[kind](probe_block_layout(writer_for(name), src[0]), src[0])
    for layer in range(L):
        cp.save_layer(src[layer], layer, [Piece(b, 0, CHUNK, e) for b, e in zip(BLOCKS, entries)])
    # Load into other blocks; the first chunk's first block is a local prefix hit (not loaded).
    dst_blocks = [[3, 5], [10, 0], [8, 6]]
    dst = [torch.zeros_like(t) for t in src]
    pieces = [Piece(dst_blocks[0][1:], N, CHUNK, entries[0])] + [
        Piece(b, 0, CHUNK, e) for b, e in zip(dst_blocks[1:], entries[1:])]
    for layer in range(L):
        cp.load_layer(dst[layer], layer, pieces)
    for layer in range(L):
        for sb, db in zip(sum(BLOCKS, [])[1:], sum(dst_blocks, [])[1:]):
            assert torch.equal(dst[layer][db], src[layer][sb]), (layer, sb, db)
        assert not dst[layer][3].any(), "the block before the load must stay untouched"


@pytest.mark.parametrize("use_triton", [False, True], ids=["ref", "triton-interpreter"])
@pytest.mark.parametrize("name", ["LBHNC", "LBNHC"])
def test_kernel_copier_equals_perm_copier(name, use_triton):
    src = fill_layers(name, 12)
    hm = head_map_two_classes()
    arena_p, entries_p = make_entries(3, hm)
    arena_k, entries_k = make_entries(3, hm)
    perm = PermCopier(probe_block_layout(writer_for(name), src[0]))
    kern = KernelCopier(name, block_tokens=N, head_dim=D, use_triton=use_triton)
    for layer in range(L):
        perm.save_layer(src[layer], layer, [Piece(b, 0, CHUNK, e) for b, e in zip(BLOCKS, entries_p)])
        kern.save_layer(src[layer], layer, [Piece(b, 0, CHUNK, e) for b, e in zip(BLOCKS, entries_k)])
    assert torch.equal(arena_p, arena_k)
    dst_p = [torch.zeros_like(t) for t in src]
    dst_k = [torch.zeros_like(t) for t in src]
    for copier, dst, entries in ((perm, dst_p, entries_p), (kern, dst_k, entries_k)):
        pieces = [Piece([4], N, CHUNK, entries[0]), Piece([0, 9], 0, CHUNK, entries[1])]
        for layer in range(L):
            copier.load_layer(dst[layer], layer, pieces)
    for a, b in zip(dst_p, dst_k):
        assert torch.equal(a, b)


RUNS = {  # block ids per chunk: one run, three runs (the direct path), and one with an odd layer offset
    "one-run": [[2, 3], [4, 5], [6, 7]],
    "three-runs": [[2, 3], [4, 9], [10, 11]],
}


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-storage-offset"])
@pytest.mark.parametrize("runs", RUNS)
@pytest.mark.parametrize("name", ["LBHNC_KT", "LBHNC", "LBNHC"])
def test_strided_copier_on_runs_of_blocks_equals_perm_copier(name, runs, offset):
    """Runs of consecutive blocks are copied straight between the staging and vLLM's blocks (one
    strided copy per run); bit for bit what the permutation copier does, stores and loads, including a
    layer tensor whose storage starts at an odd element (bf16 pairs then cannot move as one int32)."""
    blocks = RUNS[runs]
    src = fill_layers(name, 12)
    if offset:  # the same values in a tensor that starts one element into its storage
        src = [torch.cat([torch.zeros(1, dtype=t.dtype), t.contiguous().reshape(-1)])[1:].view(t.shape)
               if name != "LBNHC" else t for t in src]
    hm = head_map_two_classes()
    lay = probe_block_layout(writer_for(name), src[0])
    strided, perm = make_copier(lay, src[0]), PermCopier(lay)
    assert isinstance(strided, StridedCopier)
    _, ent_s = make_entries(3, hm)
    _, ent_p = make_entries(3, hm)
    for layer in range(L):
        strided.save_layer(src[layer], layer, [Piece(b, 0, CHUNK, e) for b, e in zip(blocks, ent_s)])
        perm.save_layer(src[layer], layer, [Piece(b, 0, CHUNK, e) for b, e in zip(blocks, ent_p)])
    for es, ep in zip(ent_s, ent_p):
        for (_, vs), (_, vp) in zip(es, ep):
            assert torch.equal(vs, vp)
    out_s, out_p = [torch.zeros_like(t) for t in src], [torch.zeros_like(t) for t in src]
    for layer in range(L):  # loads starting inside the first chunk, into other runs
        strided.load_layer(out_s[layer], layer, [Piece([8], N, CHUNK, ent_s[0]), Piece([0, 1], 0, CHUNK, ent_s[1])])
        perm.load_layer(out_p[layer], layer, [Piece([8], N, CHUNK, ent_p[0]), Piece([0, 1], 0, CHUNK, ent_p[1])])
    for a, b in zip(out_s, out_p):
        assert torch.equal(a, b)
    assert torch.equal(out_s[0][8], src[0][blocks[0][1]]) and torch.equal(out_s[0][1], src[0][blocks[1][1]])


@pytest.mark.parametrize("name", ["LBHNC", "LBNHC"])
def test_kernel_copier_calls_group_entries_by_size_and_buffer(name):
    """One kernel call's offsets index one buffer with one segment size. A step's pieces of one class
    may be a tail entry (fewer tokens) and a chunk loaded up to as many tokens, or lie in two buffers:
    each piece's segments are read at their own offsets, and a store writes only its own extents."""
    spec = ModelSpec("m", num_layers=L, num_kv_heads=H, head_dim=D, kv_dtype="bfloat16")
    tail, chunk = plan_extents(spec, None, N)["global"], plan_extents(spec, None, CHUNK)["global"]
    g = torch.Generator().manual_seed(5)
    arena = torch.randn(tail.num_segments * 2 * N * D + chunk.num_segments * 2 * CHUNK * D, generator=g).bfloat16()
    a = arena[: tail.num_segments * 2 * N * D].view(tail.num_segments, 2, N, D)
    b = arena[tail.num_segments * 2 * N * D :].view(chunk.num_segments, 2, CHUNK, D)
    kern = KernelCopier(name, block_tokens=N, head_dim=D, use_triton=False)
    dst = [layer_tensor(name, 6) for _ in range(L)]
    pieces = [Piece([1], 0, N, [(tail, a)]), Piece([4], 0, N, [(chunk, b)])]  # the tail entry first
    for layer in range(L):
        kern.load_layer(dst[layer], layer, pieces)
    for i, (layer, head) in enumerate(chunk.heads):
        got = dst[layer][4, head]
        assert torch.equal(got[:, :D], b[i, 0, :N]) and torch.equal(got[:, D:], b[i, 1, :N]), (layer, head)
    src = fill_layers(name, 12)
    stores = [make_entries(1, None)[1][0] for _ in range(2)]  # two arenas: two buffers
    for layer in range(L):
        kern.save_layer(src[layer], layer, [Piece(blocks, 0, CHUNK, e) for blocks, e in zip(BLOCKS, stores)])
    for blocks, ((plan, view),) in zip(BLOCKS, stores):
        for i, (layer, head) in enumerate(plan.heads):
            want = torch.empty(2 * CHUNK * D, dtype=torch.bfloat16)
            gather_segments_ref(src[layer], torch.tensor(blocks), torch.tensor([head]), want, torch.tensor([0]),
                                layout=name)
            assert torch.equal(view[i].reshape(-1), want), (blocks, layer, head)
