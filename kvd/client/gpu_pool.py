"""The daemon's GPU pools as an engine process maps them (``kvd.tiers.gpu``): opened once, viewed per extent.

A lease or reservation whose extents lie in the GPU tier carries the pool's ``GpuPoolInfo``; the first
one maps the pool through CUDA IPC (``kvd.core.gpu_ipc``, about a millisecond), later ones reuse the
mapping. Extents are then torch views of the pool on the GPU, and copies between them and the engine's
KV are device to device (``EntryView.read_into``, or the gather/scatter kernels of
``kvd.client.paged`` for paged layouts).

A process keeps one pool per GPU: a pool with a new id on the same GPU (the daemon restarted) replaces
the old mapping, so the dead daemon's GPU memory is freed once the views taken from it are gone.

Use: ``register(client, spec, head_map, gpu=GpuPools())`` (``kvd.client.prefix``); a handle without
one never asks for GPU extents and reads the arena only, as before the GPU tier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvd.core.extents import ExtentPlan
from kvd.core.gpu_ipc import CudaIpc, InProcessIpc
from kvd.core.protocol import ExtentInfo
from kvd.core.protocol_gpu import GpuPoolInfo

if TYPE_CHECKING:
    import torch


class GpuPools:
    """The GPU pools this process mapped, by pool id. ``ipc``: CUDA IPC (default), or the in-process
    stand-in of tests (``InProcessIpc``), the same instance the test's daemon was given."""

    def __init__(self, ipc: CudaIpc | InProcessIpc | None = None) -> None:
        self.ipc = ipc if ipc is not None else CudaIpc()
        self._pools: dict[str, tuple[GpuPoolInfo, torch.Tensor]] = {}  # pool id -> (info, mapped pool)

    def pool(self, info: GpuPoolInfo) -> torch.Tensor:
        """The pool ``info`` names, mapped on first use (``DaemonUnavailable`` if it cannot be)."""
        got = self._pools.get(info.pool_id)
        if got is not None:
            return got[1]
        for pid, (old, _) in list(self._pools.items()):
            if old.device_uuid == info.device_uuid:  # a restarted daemon's new pool replaces its old one
                del self._pools[pid]
        tensor = self.ipc.open(info)
        self._pools[info.pool_id] = (info, tensor)
        return tensor

    def extent(self, info: GpuPoolInfo, ext: ExtentInfo, plan: ExtentPlan, dtype: str) -> torch.Tensor:
        """``[num_segments, 2, T, D]`` view in the KV dtype of one extent in the pool (no copy).
        ``ValueError`` if the plan's bytes do not lie inside the pool."""
        import torch

        pool = self.pool(info)
        if ext.offset < 0 or ext.offset + plan.nbytes > pool.numel():
            raise ValueError(f"extent [{ext.offset}, {ext.offset + plan.nbytes}) is outside the GPU pool")
        flat = pool[ext.offset : ext.offset + plan.nbytes]
        return flat.view(getattr(torch, dtype)).view(plan.num_segments, 2, plan.num_tokens, plan.head_dim)

    def bytes_at(self, info: GpuPoolInfo, ext: ExtentInfo) -> memoryview:
        """A host copy of an extent's bytes (to verify its checksum: on demand only, it crosses PCIe)."""
        part = self.pool(info)[ext.offset : ext.offset + ext.nbytes]
        return memoryview(part.cpu().numpy())

    def synchronize(self, info: GpuPoolInfo) -> None:
        """Wait for this process's copies into or out of the pool (before a commit or a release)."""
        self.ipc.synchronize(self.pool(info))

    def close(self) -> None:
        self._pools.clear()
