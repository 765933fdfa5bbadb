"""Checksums of a load taken while the worker copies it, layer by layer (``WorkerIO``'s default).

A lease's extents are otherwise hashed when the lease opens, before any copy: one more pass over the
load's bytes from memory. Here the worker opens the lease without hashing and gives each piece one
running xxh3 per extent (``Piece.sums``); ``StridedCopier``, copying a layer, hashes each extent's rows
of that layer right after copying them, while they are in the core's cache. The rows of a layer are
consecutive in the extent (layer-major), so fed in layer order they hash exactly the extent's bytes,
and at the step's end each digest is compared with the daemon's checksum. Measured on the product
path (``benchmarks/notes/fresh_load.py``; docs/vllm.md has the figures).

What this changes: bytes that fail their checksum have already been copied into vLLM's blocks and
read by that step's attention. The worker then reports the failed chunk's blocks (and those after it)
as load errors; under ``kv_load_failure_policy: "recompute"`` vLLM drops that step's output for the
request and recomputes those blocks, and the worker stores nothing for the request in that step, so
no token and no stored KV ever comes from the corrupt bytes. Under the "fail" policy the request would
fail instead of being recomputed, so there (and with copiers that do not feed sums) the connector
hashes before copying (``WorkerIO``). Layers that arrive out of order, or not all of them, fall back to
hashing whole extents at the end.
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

from kvd.client.views import numpy_view
from kvd.connectors.vllm.pieces import Piece


class LoadSums:
    """Running checksums of a load's pieces. ``pieces``: (first token of the piece's entry in the
    request, the piece); each piece's ``sums`` is set here, for the copier to feed."""

    def __init__(self, pieces: Iterable[tuple[int, Piece]], num_layers: int) -> None:
        self._sums = []
        for t0, p in pieces:
            p.sums = [xxhash.xxh3_64() if x.checksum is not None else None for x in p.extents]
            self._sums += [(t0, x.view, x.checksum, h) for x, h in zip(p.extents, p.sums) if h is not None]
        self._layers = num_layers
        self._next = 0  # the layer expected next; -1 once one came out of order

    def layer_copied(self, layer: int) -> None:
        """The copier has copied (and hashed) ``layer``: they must come in order for the sums to hold."""
        self._next = self._next + 1 if layer == self._next else -1

    def failures(self) -> list[int]:
        """First tokens (in the request) of the entries an extent of which fails its checksum, sorted."""
        whole = self._next != self._layers  # out of order or incomplete: hash the extents whole, now
        return sorted({t0 for t0, view, want, h in self._sums
                       if (xxhash.xxh3_64_hexdigest(numpy_view(view)) if whole else h.hexdigest()) != want})

    def __len__(self) -> int:
        return len(self._sums)
