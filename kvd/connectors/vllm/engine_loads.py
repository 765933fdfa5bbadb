"""Loads packed by the engine's own cache write (``EngineLoads``, a part of ``StridedCopier``): which
slots a load writes, the write from the staging, the write straight from the extents, and the start-up
checks that decide whether the engine's write is used at all (``adopt_engine_write``)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from kvd.connectors.vllm.layout import BlockLayout, WriteFn
from kvd.connectors.vllm.pieces import LayerRows, Piece


class EngineLoads:
    """Pass B of loads through the engine's cache write, for ``StridedCopier`` (which supplies
    ``layout``, ``rows`` and the strided ``_pass_b`` that the start-up checks compare against).

    Straight from the extents (``_write_direct``, no staging pass) when a piece's rows of a layer
    already hold each head once: one extent with all heads (an entry without a head map), or, when
    ``engine_split``, extents each holding a consecutive run of heads (a head map's classes) that
    together hold every head once. Each extent then goes to the write with a view of the layer that
    keeps only its heads, ``kv_layer[:, h0:h1]``. Why that is exact: vLLM's CPU write
    (``cpu_attn_reshape_and_cache``, 0.32) takes the head count from the keys and addresses the cache
    by its data pointer and its block, head and token strides, so a head view is written at heads
    ``h0..h1-1`` and nowhere else; by experiment on an AMX machine, for ``vec``, ``vec16`` and ``amx`` in
    bf16, fp16 and fp32, with the other heads pre-filled and left untouched. That is the kernel's
    behaviour, not its contract, so ``adopt_engine_write`` checks head ranges on scratch blocks at
    start (``_split_write_ok``) and sets ``engine_split`` only if all give the strided copy's bytes.
    Heads that are not consecutive within an extent (``LayerRows`` gives a list), or pieces whose
    extents do not hold each head exactly once, go through the staging for that layer.

    The trade: pass A's copies saved, for one write per extent and piece instead of one per run of
    staged tokens (~10 us of fixed cost each, Python included), and the kernel reading the arena
    instead of a staging that stays in cache. Measured on the 2-core AMX VM, 4K-token loads, ms:
    SmolLM2's shape (3 KV heads of 64 dims) split [0:1] | [1:3] in every layer, staged 40.4, direct
    38.4 (``benchmarks/notes/vllm_amx_pass_b.py``, ``amx_two_extent_loads``; predicted 1-3 ms less);
    with the shipped SmolLM2 head map (23 of 30 layers direct, the others not consecutive) 42.9 vs
    44.6, slower; 8 KV heads of 128 dims, 8 layers (16.7 MB a layer: the staging no longer stays in
    cache), split [0:2] | [2:8] 108.5 vs 71.0, [0:1] | [1:8] 102.6 vs 91.3 (one-off runs). Kept on
    wherever the check passes: exact, and the gain is largest where loads cost most."""

    layout: BlockLayout
    rows: LayerRows

    def __init__(self) -> None:
        # Pass B of loads through the engine's own cache write (``adopt_engine_write``), or None: numpy.
        self.engine_write: WriteFn | None = None
        self.engine_split = False  # the write honours head views: head-split extents skip the staging
        self._slots_key: tuple | None = None
        self._slots: list[torch.Tensor] = []
        self._direct: dict[tuple, list[tuple[int, int, int, int]] | None] = {}

    def _pass_b(self, stage: torch.Tensor, kv_layer: torch.Tensor, pieces: Sequence[Piece]) -> None:
        raise NotImplementedError

    def _piece_slots(self, pieces: Sequence[Piece]) -> list[torch.Tensor]:
        """Each piece's slots (block * N + token of its loaded tokens). The same for every layer of a
        load: kept for the last pieces seen."""
        key = tuple((tuple(p.block_ids), p.t0, p.t1) for p in pieces)
        if self._slots_key != key:
            N = self.layout.block_tokens
            self._slots_key, self._slots = key, [
                torch.cat([torch.arange(b * N, b * N + min(N, p.t1 - p.t0 - i * N)) for i, b in enumerate(p.block_ids)])
                for p in pieces]
        return self._slots

    def _engine_runs(self, pieces: Sequence[Piece]) -> list[tuple[int, int, torch.Tensor]]:
        """``(first, end, slots)`` per run of consecutive staged tokens that hold loaded tokens (a piece
        that ends inside its last block ends a run): the pieces' slots, joined where they run on."""
        runs: list[tuple[int, int, list[torch.Tensor]]] = []
        j = 0
        for p, slots in zip(pieces, self._piece_slots(pieces)):
            n = p.t1 - p.t0
            if runs and runs[-1][1] == j:
                runs[-1] = (runs[-1][0], j + n, runs[-1][2] + [slots])
            else:
                runs.append((j, j + n, [slots]))
            j += len(p.block_ids) * self.layout.block_tokens
        return [(a, b, parts[0] if len(parts) == 1 else torch.cat(parts)) for a, b, parts in runs]

    def _direct_rows(self, p: Piece, layer: int) -> list[tuple[int, int, int, int]] | None:
        """``(extent, first segment, end segment, first head)`` per extent with rows in ``layer``, if
        they can go straight to the write: each a consecutive run of heads, together every head once
        (one extent unless ``engine_split``); else None. Kept per (plans, layer)."""
        key = (tuple((e[0].head_class, e[0].num_tokens) for e in p.extents), layer, self.engine_split)
        if key not in self._direct:
            got, heads = [], []
            for j, (plan, *_) in enumerate(p.extents):
                s0, s1, hs = self.rows(plan, layer)
                if s1 > s0 and isinstance(hs, slice):
                    got.append((j, s0, s1, hs.start))
                    heads += range(hs.start, hs.stop)
                elif s1 > s0:  # heads not consecutive in the extent
                    heads.append(-1)
            ok = sorted(heads) == list(range(self.layout.num_heads)) and (len(got) == 1 or self.engine_split)
            self._direct[key] = got if ok else None
        return self._direct[key]

    def _write_direct(self, write: WriteFn, kv_layer: torch.Tensor, layer: int, pieces: Sequence[Piece]) -> bool:
        """Pass A skipped: each extent's rows of this layer (``[heads, 2, T, D]``) go to the engine's
        ``write`` as strided keys and values, into a view of ``kv_layer`` with the extent's heads, then
        are hashed into the piece's ``sums`` as the staged path does. False, and nothing written, where
        a piece cannot (``_direct_rows``)."""
        plans = [self._direct_rows(p, layer) for p in pieces]
        if any(x is None for x in plans):
            return False
        H, views = self.layout.num_heads, {}  # head views of the layer, by (first head, heads)
        for p, rows, slots in zip(pieces, plans, self._piece_slots(pieces)):
            kv = p.tokens_major()
            for j, s0, s1, h0 in rows:
                dst = views.get((h0, s1 - s0))
                if dst is None:
                    dst = views[h0, s1 - s0] = kv_layer if s1 - s0 == H else kv_layer[:, h0 : h0 + s1 - s0]
                write(kv[j][0][:, s0:s1], kv[j][1][:, s0:s1], dst, slots)
                if p.sums is not None and p.sums[j] is not None:
                    p.sums[j].update(p.arrays()[j][1][s0:s1])
        return True

    def _write_by_engine(self, write: WriteFn, stage: torch.Tensor, kv_layer: torch.Tensor,
                         pieces: Sequence[Piece], heads: slice = slice(None)) -> None:
        """Pass B by the engine's cache ``write``: each run of staged tokens, as keys and values
        ``[tokens, H, D]`` (views of the staging), to their slots; only ``heads`` if given."""
        dst = kv_layer if heads == slice(None) else kv_layer[:, heads]
        for a, b, slots in self._engine_runs(pieces):
            src = stage[heads, :, a:b]
            write(src[:, 0].permute(1, 0, 2), src[:, 1].permute(1, 0, 2), dst, slots)

    def adopt_engine_write(self, write: WriteFn, kv_layer: torch.Tensor, *, blocks: int = 32,
                           repeats: int = 3) -> bool:
        """Use the engine's own cache write (``write``, as ``probe_block_layout`` takes it) for pass B of
        loads where, on scratch blocks shaped like ``kv_layer``'s, it writes the same bytes as the
        strided copy and is faster; returns whether it does. Why: for a packing whose contiguous runs are
        2 bytes (vLLM's ``amx`` V: VNNI pairs of tokens) numpy's strided copy moves one element at a
        time, and the engine's vectorized kernel is faster: pass B of a 4K SmolLM2 load took 51 ms with
        numpy and 19 ms with the kernel on a Sapphire Rapids VM (2026-12-07); for ``vec`` numpy was the
        faster (19 vs 30 ms; ``benchmarks/results/vllm_amx_pass_b.json``), hence a measurement, not a
        rule. Loads only: the engine has no read kernel, so stores keep the strided copy. Where the
        bytes are the same, ``engine_split`` says whether head views are too (``_split_write_ok``)."""
        self.engine_write, self.engine_split = None, False
        if kv_layer.device.type != "cpu":
            return False
        N = self.layout.block_tokens
        scratch = torch.zeros((blocks, *kv_layer.shape[1:]), dtype=kv_layer.dtype)
        stage = torch.randn(self.layout.num_heads, 2, blocks * N, self.layout.head_dim).to(kv_layer.dtype)
        pieces = [Piece(list(range(blocks)), 0, blocks * N - N // 2, [])]  # ends inside its last block

        def strided() -> None:
            self._pass_b(stage, scratch, pieces)

        def engine() -> None:
            self._write_by_engine(write, stage, scratch, pieces)

        try:
            strided()
            want = scratch.clone()
            scratch.zero_()
            engine()
            if not torch.equal(scratch.view(torch.uint8), want.view(torch.uint8)):  # bytes: -0.0 is not 0.0
                return False
        except Exception:  # an engine write that cannot take these views: keep the strided copy
            return False
        self.engine_split = self._split_write_ok(write, kv_layer)

        def best(fn) -> float:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        if best(engine) < 0.9 * best(strided):
            self.engine_write = write
        return self.engine_write is not None

    def _split_write_ok(self, write: WriteFn, kv_layer: torch.Tensor) -> bool:
        """Whether ``write`` into ``kv_layer[:, h0:h1]`` leaves, for each head range, exactly the strided
        copy's bytes on those heads and the others untouched: on two scratch blocks pre-filled with
        noise, the second filled in part. Every proper range up to 8 heads; above, each head alone and
        every prefix and suffix, which cover the view's start and its count of heads, the two things a
        write could get wrong for it (on the 2-core VM under load: 3 heads 0.005 s, 8 heads 0.08 s, 32
        heads 0.84 s, where all 527 ranges took 5.8 s)."""
        L = self.layout
        N, H = L.block_tokens, L.num_heads
        noise = torch.randn((2, *kv_layer.shape[1:])).to(kv_layer.dtype)
        stage = torch.randn(H, 2, 2 * N, L.head_dim).to(kv_layer.dtype)
        pieces = [Piece([1, 0], 0, 2 * N - N // 2 - 1, [])]
        full, got, want = noise.clone(), torch.empty_like(noise), torch.empty_like(noise)
        self._pass_b(stage, full, pieces)
        for h0, h1 in [(a, b) for a in range(H) for b in range(a + 1, H + 1)
                       if b - a < H and (H <= 8 or b == a + 1 or a == 0 or b == H)]:
            got.copy_(noise)
            want.copy_(noise)
            want[:, h0:h1] = full[:, h0:h1]
            try:
                self._write_by_engine(write, stage, got, pieces, slice(h0, h1))
            except Exception:  # a write that cannot take a head view
                return False
            if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                return False
        return True
