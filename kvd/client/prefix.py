"""Prefix entries for engines and tests: register a model, store, look up and load whole chunks.

KV crosses this module as one tensor per request, ``kv[num_layers, 2, num_kv_heads, T, head_dim]``
(index 0 of dim 1 = K, 1 = V), on the CPU or a GPU. Storing copies each full chunk's segments into the
arena extents the daemon reserved (one gathered copy per block of the extent plan); loading copies them
back out. Both are one ``kvd.client.transfer`` transaction over zero-copy views of the mapped arena,
so each byte is copied once each way, and leased bytes are verified before they are used.

Typical use (an engine adapter)::

    handle = register(client, spec, head_map, namespace="tenant-a")
    n = lookup_prefix(handle, token_ids).num_prefix_hits          # chunks stored
    with load_prefix(handle, token_ids, max_chunks=n) as loaded:  # leased until the block ends
        kv_cached = loaded.to_tensor(device="cuda")               # [L, 2, H, loaded.num_tokens, D]
    ... compute the rest ...
    store_prefix(handle, token_ids, kv_full)                        # whole chunks only
"""

from __future__ import annotations

from dataclasses import dataclass

from kvd.client.client import KvdClient
from kvd.client.gpu_pool import GpuPools
from kvd.client.handle import ModelHandle
from kvd.client.transfer import Lease, open_lease, reserve
from kvd.client.views import copy_block, extent_to_kv_views
from kvd.core import protocol as P
from kvd.core.errors import InvalidRequest
from kvd.core.headmap import HeadMap
from kvd.core.keys import EXACT, ModelSpec

__all__ = ["LoadedPrefix", "ModelHandle", "StoreResult", "copy_block", "extent_to_kv_views", "load_prefix",
           "lookup_prefix", "register", "store_prefix"]


def register(client: KvdClient, spec: ModelSpec, head_map: HeadMap | None = None, *,
             namespace: str = "default", computed_under: str = EXACT, reader: str = "exact",
             gpu: GpuPools | None = None) -> ModelHandle:
    """Register ``spec`` (and its head map; None: every head global) with the daemon. ``reader``:
    ``exact`` (every head, every token) or ``head_aware`` (the handle reads only what its head map
    attends to; ``kvd.store.readers``). ``gpu``: map the daemon's GPU tier (``GpuPools()``: by CUDA
    IPC) so stores go there first and loads may come from there, device to device (docs/gpu.md)."""
    if reader == "head_aware" and (head_map is None or head_map.is_all_global):
        reader = "exact"  # an all-global map reads everything: the same thing, said plainly
    hm = head_map or HeadMap.all_global(spec.model_id, spec.num_layers, spec.num_kv_heads)
    resp = client.register_model(P.RegisterModelRequest(
        model_id=spec.model_id, revision=spec.revision, num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, kv_dtype=spec.kv_dtype, rope=spec.rope,
        layout=spec.layout, head_map=head_map, fingerprint=spec.fingerprint()))
    return ModelHandle(client, spec, hm, resp.fingerprint, resp.chunk_tokens, namespace, computed_under, reader, gpu)


def _check_kv(handle: ModelHandle, kv, num_tokens: int) -> None:
    s = handle.spec
    want = (s.num_layers, 2, s.num_kv_heads)
    if tuple(kv.shape[:3]) != want or kv.shape[4] != s.head_dim or kv.shape[3] < num_tokens:
        raise InvalidRequest(f"kv has shape {tuple(kv.shape)}; expected [{s.num_layers}, 2, {s.num_kv_heads}, "
                             f"≥{num_tokens}, {s.head_dim}] for {s.model_id}")
    if str(kv.dtype).removeprefix("torch.") != s.kv_dtype:
        raise InvalidRequest(f"kv dtype {kv.dtype} does not match the registered KV dtype {s.kv_dtype}")


@dataclass(frozen=True)
class StoreResult:
    stored: int
    existing: int
    no_space: int


def store_prefix(handle: ModelHandle, token_ids, kv, *, start_chunk: int = 0) -> StoreResult:
    """Store every full chunk of ``token_ids`` from ``kv[L, 2, H, T, D]`` (chunks before ``start_chunk``
    are assumed stored already and skipped). Chunks the daemon already holds are not copied."""
    import torch

    hashes = handle.hashes(token_ids)[start_chunk:]
    if not hashes:
        return StoreResult(0, 0, 0)
    c = handle.chunk_tokens
    if not isinstance(kv, torch.Tensor):
        kv = torch.from_numpy(kv)
    _check_kv(handle, kv, (start_chunk + len(hashes)) * c)
    entries = [P.ReserveEntry(hash=h, kind="prefix", num_tokens=c, start_token=(start_chunk + i) * c,
                              end_token=len(token_ids)) for i, h in enumerate(hashes)]
    with reserve(handle, entries) as res:  # commits on exit; aborts if a copy raises
        for i in range(len(entries)):
            view = res.entry(i)
            if view is not None:
                view.write_from(kv, (start_chunk + i) * c)
                res.written(i)  # hashed while cached: the daemon need not read it again
    return StoreResult(res.num_reserved, res.num_exists, res.num_no_space)


def lookup_prefix(handle: ModelHandle, token_ids, *, prefetch: bool = True, max_tokens: int | None = None,
                  accept_lossy: bool = False) -> P.LookupResponse:
    """How many leading chunks of ``token_ids`` are stored (``max_tokens``: the most the caller can load,
    which bounds the daemon's hit counters)."""
    return handle.client.lookup(P.LookupRequest(
        fingerprint=handle.fingerprint, namespace=handle.namespace, prefix_hashes=handle.hashes(token_ids),
        prefetch=prefetch, computed_under=handle.computed_under, accept_lossy=accept_lossy, max_tokens=max_tokens,
        **handle.reader_fields()))


class LoadedPrefix:
    """The leading run of usable chunks of a prefix lease (the last one possibly in part, up to
    ``max_tokens``). A context manager: released on exit."""

    def __init__(self, handle: ModelHandle, lease: Lease, max_tokens: int | None = None) -> None:
        self.handle = handle
        self.lease = lease
        self.num_chunks = lease.num_leading
        c = handle.chunk_tokens
        self.num_tokens = self.num_chunks * c if max_tokens is None else min(self.num_chunks * c, max_tokens)

    def copy_into(self, kv, *, start_chunk: int = 0) -> None:
        """Scatter the loaded tokens into ``kv[L, 2, H, T, D]`` at chunk positions from ``start_chunk``."""
        c = self.handle.chunk_tokens
        for i in range(self.num_chunks):
            self.lease.entry(i).read_into(kv, (start_chunk + i) * c, min(c, self.num_tokens - i * c))

    def to_tensor(self, device="cpu"):
        """The loaded chunks as a new ``kv[L, 2, H, num_tokens, D]`` on ``device``."""
        import torch

        s = self.handle.spec
        # zeros: a head-aware load leaves the segments its head map does not read untouched
        kv = torch.zeros(s.num_layers, 2, s.num_kv_heads, self.num_tokens, s.head_dim,
                         dtype=getattr(torch, s.kv_dtype), device=device)
        self.copy_into(kv)
        return kv

    def release(self) -> None:
        self.lease.release()

    def __enter__(self) -> LoadedPrefix:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def load_prefix(handle: ModelHandle, token_ids, *, max_chunks: int | None = None, max_tokens: int | None = None,
                wait_s: float | None = None, verify: bool = True, accept_lossy: bool = False) -> LoadedPrefix:
    """Lease the leading chunks of ``token_ids`` (at most ``max_chunks``, or the chunks holding the
    first ``max_tokens`` tokens, the last in part: e.g. all but the last prompt token, which the
    engine computes). A chunk that is missing, fails its checksum, or holds lossy bytes the caller did
    not accept ends the loaded run. A head-aware handle leases at the load's end: only what its map
    reads from there."""
    c = handle.chunk_tokens
    if max_tokens is not None:
        max_chunks = min(-(-max_tokens // c), max_chunks if max_chunks is not None else max_tokens)
    hashes = handle.hashes(token_ids, max_chunks=max_chunks)
    end = len(hashes) * c if max_tokens is None else min(len(hashes) * c, max_tokens)
    need = [min(c, end - i * c) for i in range(len(hashes))]
    lease = open_lease(handle, hashes, min_tokens=need, wait_s=wait_s, verify=verify, accept_lossy=accept_lossy,
                       position=end if handle.reader == "head_aware" else None)
    return LoadedPrefix(handle, lease, max_tokens)
