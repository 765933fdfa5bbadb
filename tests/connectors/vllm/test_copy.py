"""The vLLM connector's KV copies: layout probing and the copiers, without a running engine.

The probe is checked against writers of known layouts and against vLLM's own CPU write kernel (every
ISA this CPU has); the copiers are checked against each other and against ``kvd.gpu_kernels``'
gather/scatter references, bit for bit, with non-contiguous block ids, a head map that splits heads
into two classes, and loads that start inside a chunk.
"""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize("two_classes", [False, True], ids=["one_extent", "two_extents"])
def test_loads_packed_by_vllm_cpu_write_kernel_equal_the_strided_copy(two_classes):
    """``adopt_engine_write``: loads packed by vLLM's own CPU cache write give the same bytes as the
    strided copy on every ISA, with a piece that ends inside its block in the middle of a load (two
    runs of staged tokens) and one at its end: straight from the extents when each holds all of a
    layer's heads (no head map), through the staging when a head map splits them (two extents); a
    write that loses bytes is never adopted."""
    ops, isas = vllm_cpu_isas()
    Hn, Nn, Dn = 2, 32, 64
    spec = ModelSpec("m", num_layers=1, num_kv_heads=Hn, head_dim=Dn, kv_dtype="bfloat16")
    hm = HeadMap.from_classes("m", [[True, False]], sink=4, window=16) if two_classes else None
    plans = list(plan_extents(spec, hm, 2 * Nn).values())
    assert len(plans) == (2 if two_classes else 1)
    g = torch.Generator().manual_seed(3)
    segs = [[(p, torch.randn(p.num_segments, 2, 2 * Nn, Dn, generator=g).bfloat16()) for p in plans]
            for _ in range(3)]
    for isa, dtype in isas:
        if dtype != torch.bfloat16:
            continue

        def write(key, value, kv, slots, isa=isa):
            kc, vc = kv.view(kv.shape[0], Hn, 2 * Nn, Dn).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)

        kv = torch.zeros(12, Hn, Nn, 2 * Dn, dtype=dtype)
        copier = make_copier(probe_block_layout(write, kv), kv)
        copier.adopt_engine_write(write, kv, blocks=4, repeats=1)  # adopted or not: measured, either is right
        pieces = [Piece([9, 3], 0, 2 * Nn - 5, segs[0]),  # ends inside block 3: a second run follows
                  Piece([5, 6], 0, 2 * Nn, segs[1]), Piece([0, 11], 0, Nn + 7, segs[2])]
        want, got = torch.zeros_like(kv), torch.zeros_like(kv)
        copier.engine_write = None
        copier.load_layer(want, 0, pieces)
        copier.engine_write = write
        direct = copier._write_direct(write, got, 0, pieces)
        assert direct is not two_classes, isa
        got.zero_()
        copier.load_layer(got, 0, pieces)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), isa
        assert [(a, b) for a, b, _ in copier._engine_runs(pieces)] == [(0, 2 * Nn - 5), (2 * Nn, 5 * Nn + 7)]

        def lossy(key, value, kv, slots, write=write):  # forgets the last token
            write(key[:-1], value[:-1], kv, slots[:-1])

        assert not copier.adopt_engine_write(lossy, kv, blocks=4, repeats=1) and copier.engine_write is None


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
