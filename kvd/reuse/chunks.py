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
    """Chunk entries in the kvd daemon, through a registered ``kvd.client.handle.ModelHandle``.

    Each call is one ``kvd.client.transfer`` transaction, computed under ``exact`` whatever the handle's
    attention: a chunk entry is computed with every head global, so attachments of any head map share
    it. Storing reserves a ``kind="chunk"`` entry at ``[0, n)`` (so the daemon's head-aware placement sees
    a sequence that ends with the chunk), copies each extent straight into the arena, and commits. Loading leases the asked head classes; the
    entries that pass the transaction's checks (checksums, shapes, no lossy bytes) are copied out, the
    others are absent from the answer (recomputed); then the lease is released.
    """

    def __init__(self, handle, *, verify: bool = True) -> None:
        self.handle = handle
        self.verify = verify

    def _empty(self, n: int, device) -> torch.Tensor:
        s = self.handle.spec
        return torch.zeros(s.num_layers, 2, s.num_kv_heads, n, s.head_dim, dtype=getattr(torch, s.kv_dtype),
                           device=device or "cpu")

    def get(self, keys, *, classes=None, device=None):
        from kvd.client.transfer import open_lease
        from kvd.core.errors import KvdError, NotFound
        from kvd.core.keys import EXACT

        if not keys:
            return {}
        try:
            lease = open_lease(self.handle, list(keys), classes=classes, verify=self.verify, leading=False,
                               computed_under=EXACT)
        except KvdError as e:
            logger.warning("chunk lookup failed, recomputing %d chunks: %s", len(keys), e)
            return {}
        out: dict[str, torch.Tensor] = {}
        try:
            for view in lease.usable():
                kv = self._empty(view.num_tokens, device)
                view.read_into(kv)
                out[view.hash] = kv
        finally:
            try:
                lease.release()
            except NotFound as e:  # taken back while copying: the slots may hold another entry's bytes now
                logger.warning("a chunk lease lapsed while copying, recomputing %d chunks: %s", len(out), e)
                out = {}
            except KvdError as e:
                logger.warning("releasing a chunk lease failed (it expires on its own): %s", e)
        return out

    def put(self, key, kv):
        from kvd.client.transfer import reserve
        from kvd.core import protocol as P
        from kvd.core.errors import KvdError
        from kvd.core.keys import EXACT

        h = self.handle
        n = kv.shape[3]
        if kv.dtype != getattr(torch, h.spec.kv_dtype):  # a model cast after attach, autocast: not this KV
            logger.warning("chunk %s computed in %s is not stored as %s KV", key, kv.dtype, h.spec.kv_dtype)
            return False
        try:
            entry = P.ReserveEntry(hash=key, kind="chunk", num_tokens=n, start_token=0, end_token=n)
            with reserve(h, [entry], computed_under=EXACT) as res:  # commits on exit; aborts if the copy raises
                view = res.entry(0)
                if view is not None:
                    view.write_from(kv)
                    res.written(0)
            return res.num_reserved + res.num_exists == 1
        except KvdError as e:
            logger.warning("storing chunk %s failed (it will be recomputed next time): %s", key, e)
            return False


__all__ = ["ChunkStore", "DaemonChunkStore", "LocalChunkStore"]
