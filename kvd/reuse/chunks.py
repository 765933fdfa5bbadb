"""Where chunk entries live: in this process (``LocalChunkStore``) or in the kvd daemon (``DaemonChunkStore``).

A chunk entry is the KV of a segment computed on its own at positions ``[0, n)``, keyed by the
content hash of its tokens (``kvd.core.keys.content_hash``: namespace and model fingerprint included). Its
KV crosses this module as ``kv [num_layers, 2, num_kv_heads, n, head_dim]`` (index 0 of dim 1 = K,
post-RoPE at ``[0, n)``; 1 = V), the form ``kvd.client.prefix`` uses for prefix entries.

Both stores are best-effort caches: ``get`` returns what it has (a missing or unreadable entry is
simply absent, so the caller computes it), ``put`` returns ``False`` when it could not keep the entry.
A reader that recomputes the global heads asks only for ``classes=["local"]``: the daemon then leases
(and, from SSD, prefetches) only the local-head extents; the global-head rows of the returned tensor
are zeros.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)


class ChunkStore(ABC):
    """Chunk entries by key. Tensors returned by ``get`` must not be modified by the caller."""

    @abstractmethod
    def get(self, keys: Sequence[str], *, classes: Sequence[str] | None = None,
            device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The entries found, ``key -> kv [L, 2, H, n, D]`` on ``device`` (default: where they are)."""

    @abstractmethod
    def put(self, key: str, kv: torch.Tensor) -> bool:
        """Keep ``kv`` under ``key``; ``True`` if it is stored (or already was)."""


class LocalChunkStore(ChunkStore):
    """In-process chunk entries (kvd's GPU tier when the tensors are on a GPU), LRU within ``max_bytes``."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()  # key -> kv, least recent first
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, keys, *, classes=None, device=None):
        out = {}
        for k in keys:
            kv = self._entries.get(k)
            if kv is not None:
                self._entries.move_to_end(k)
                out[k] = kv if device is None else kv.to(device)
        return out

    def put(self, key, kv):
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        size = kv.numel() * kv.element_size()
        if self.max_bytes is not None and size > self.max_bytes:
            return False
        while self.max_bytes is not None and self._entries and self.nbytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()
        self._entries[key] = kv
        self.nbytes += size
        return True


class DaemonChunkStore(ChunkStore):
    """Chunk entries in the kvd daemon, through a registered ``kvd.client.prefix.ModelHandle``.

    Storing reserves ``kind="chunk"`` entries at ``[0, n)`` (so the daemon's head-aware placement sees
    a sequence that ends with the chunk), copies each extent straight into the arena, and commits.
    Loading leases the asked head classes, copies them out (verifying checksums) and releases.
    """

    def __init__(self, handle, *, verify: bool = True) -> None:
        self.handle = handle
        self.verify = verify

    def _empty(self, n: int, device) -> torch.Tensor:
        s = self.handle.spec
        return torch.zeros(s.num_layers, 2, s.num_kv_heads, n, s.head_dim, dtype=getattr(torch, s.kv_dtype),
                           device=device or "cpu")

    def get(self, keys, *, classes=None, device=None):
        from kvd.core import protocol as P
        from kvd.core.errors import KvdError

        h = self.handle
        if not keys:
            return {}
        try:
            lease = h.client.lease(P.LeaseRequest(fingerprint=h.fingerprint, namespace=h.namespace,
                                                  hashes=list(keys), classes=list(classes) if classes else None))
        except KvdError as e:
            logger.warning("chunk lookup failed, recomputing %d chunks: %s", len(keys), e)
            return {}
        out: dict[str, torch.Tensor] = {}
        try:
            for entry in lease.entries:
                if entry.status != "ok":
                    continue
                kv = self._copy_out(lease.arena_id, entry, device)
                if kv is not None:
                    out[entry.hash] = kv
        finally:
            if lease.lease_id is not None:
                try:
                    h.client.release(P.ReleaseRequest(lease_id=lease.lease_id))
                except KvdError as e:
                    logger.warning("releasing chunk lease %s failed (it expires on its own): %s", lease.lease_id, e)
        return out

    def _copy_out(self, arena_id: str, entry, device) -> torch.Tensor | None:
        import xxhash

        from kvd.client.prefix import extent_to_kv_views

        h = self.handle
        arena = h.client.arena(arena_id)
        plans = h.plans(entry.num_tokens)
        kv = self._empty(entry.num_tokens, device)
        for ext in entry.extents:
            if self.verify and ext.checksum is not None:
                got = xxhash.xxh3_64_hexdigest(arena.bytes_at(ext.offset, ext.nbytes))
                if got != ext.checksum:
                    logger.warning("chunk %s extent %s fails its checksum; recomputing it", entry.hash, ext.head_class)
                    return None
            view = arena.torch_extent(ext, plans[ext.head_class], h.spec.kv_dtype)
            for part, dst in extent_to_kv_views(plans[ext.head_class], view, kv, 0):
                dst.copy_(part)
        return kv

    def put(self, key, kv):
        import time

        from kvd.client.prefix import extent_to_kv_views
        from kvd.core import protocol as P
        from kvd.core.errors import KvdError

        h = self.handle
        n = kv.shape[3]
        try:
            resp = h.client.reserve(P.ReserveRequest(
                fingerprint=h.fingerprint, namespace=h.namespace,
                entries=[P.ReserveEntry(hash=key, kind="chunk", num_tokens=n, start_token=0, end_token=n)]))
            status = resp.entries[0].status
            if status != "reserved" or resp.reservation_id is None:
                return status == "exists"
            t0 = time.perf_counter()
            try:
                arena = h.client.arena(resp.arena_id)
                plans = h.plans(n)
                src = kv.to(getattr(torch, h.spec.kv_dtype))
                for ext in resp.entries[0].extents:
                    dst = arena.torch_extent(ext, plans[ext.head_class], h.spec.kv_dtype)
                    for part, s in extent_to_kv_views(plans[ext.head_class], dst, src, 0):
                        part.copy_(s)
            except BaseException:
                h.client.abort(P.AbortRequest(reservation_id=resp.reservation_id))
                raise
            h.client.commit(P.CommitRequest(reservation_id=resp.reservation_id,
                                            transfer_s=time.perf_counter() - t0))
            return True
        except KvdError as e:
            logger.warning("storing chunk %s failed (it will be recomputed next time): %s", key, e)
            return False


__all__ = ["ChunkStore", "DaemonChunkStore", "LocalChunkStore"]
