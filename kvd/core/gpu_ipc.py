"""How a GPU pool crosses processes: the daemon allocates and exports it, an engine opens it.

Two implementations of one small interface (``allocate``, ``export``, ``open``, ``synchronize``):

- ``CudaIpc``: the real one. The daemon allocates the pool with torch on one GPU and exports it with
  torch's own CUDA IPC path (``UntypedStorage._share_cuda_``: a ``cudaIpcMemHandle`` of the allocation,
  the offset of the pool in it, an IPC event and the reference counter torch keeps beside it); an
  engine opens it with ``torch.multiprocessing.reductions.rebuild_cuda_tensor``, as a tensor passed
  through a ``torch.multiprocessing`` queue would be. Mapping is by the GPU's UUID.
- ``InProcessIpc``: **the stand-in**, for tests on machines without a GPU (CI): the pool is a CPU
  tensor and "opening" it returns that same tensor, passed inside one process. It is the only part
  of the GPU tier that is replaced in tests (issue 18), and is named so wherever it is used.

torch is imported inside the methods: importing this module costs nothing, and the daemon imports
torch only when it builds a GPU tier on a machine that has a GPU (``kvd.daemon.build``).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from kvd.core.errors import DaemonUnavailable
from kvd.core.protocol_gpu import GpuPoolInfo

if TYPE_CHECKING:
    import torch


def new_pool_id() -> str:
    return uuid.uuid4().hex


class CudaIpc:
    """Pools on CUDA device ``device_index`` (the daemon's numbering), shared by CUDA IPC."""

    transport = "cuda_ipc"

    def __init__(self, device_index: int = 0) -> None:
        self.device_index = device_index
        self._mem_pools: list = []  # one private torch MemPool per pool, kept while the daemon lives

    def allocate(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of GPU memory as a uint8 tensor, in allocations of its own: an IPC handle maps the
        whole ``cudaMalloc`` segment around a tensor, and torch's caching allocator puts allocations
        under 10 MiB (or any, in a cached free block) beside others in one segment, so two tenants'
        pools allocated one after the other shared a handle (seen on an H100, torch 2.11). A private
        ``MemPool`` per pool keeps every other allocation out of its segments."""
        import torch

        device = torch.device("cuda", self.device_index)
        mem_pool = torch.cuda.MemPool()
        self._mem_pools.append(mem_pool)
        with torch.cuda.use_mem_pool(mem_pool, device=device):
            return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def export(self, pool_id: str, pool: torch.Tensor) -> GpuPoolInfo:
        import torch

        _, handle, size, offset, ref, ref_offset, event, event_sync = pool.untyped_storage()._share_cuda_()
        return GpuPoolInfo(pool_id=pool_id, device_uuid=str(torch.cuda.get_device_properties(pool.device).uuid),
                           capacity_bytes=pool.numel(), transport="cuda_ipc", handle=handle.hex(),
                           storage_bytes=size, storage_offset=offset, ref_counter=ref.hex(),
                           ref_counter_offset=ref_offset, event=event.hex() if event else "",
                           event_sync=bool(event_sync))

    def open(self, info: GpuPoolInfo) -> torch.Tensor:
        """The pool as a uint8 tensor of this process (``DaemonUnavailable`` if it cannot be mapped)."""
        import torch
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        if info.transport != self.transport:
            raise DaemonUnavailable(f"the daemon's GPU pool is shared by {info.transport!r}; this process "
                                    f"maps {self.transport!r} pools")
        index = device_index(info.device_uuid)
        try:
            return rebuild_cuda_tensor(
                torch.Tensor, (info.capacity_bytes,), (1,), 0, torch.UntypedStorage, torch.uint8, index,
                bytes.fromhex(info.handle), info.storage_bytes, info.storage_offset, False,
                bytes.fromhex(info.ref_counter), info.ref_counter_offset,
                bytes.fromhex(info.event) if info.event else None, info.event_sync)
        except RuntimeError as e:  # e.g. IPC refused between these processes (containers, MPS)
            raise DaemonUnavailable(f"cannot map the kvd GPU pool {info.pool_id} on GPU {info.device_uuid} "
                                    f"by CUDA IPC: {e}") from None

    def synchronize(self, pool: torch.Tensor) -> None:
        """Wait for this process's work on ``pool``'s device (before the daemon reads what it wrote,
        or before a lease ends while copies out of it may still run)."""
        import torch

        torch.cuda.synchronize(pool.device)


class InProcessIpc:
    """The stand-in for CUDA IPC (tests on CPU): pools are CPU tensors, passed inside one process.

    The daemon's tier and the client must be given the same instance; ``open`` returns the very tensor
    ``export`` registered, so every byte a client writes is what the tier reads, as with a real mapping.
    """

    transport = "in_process"

    def __init__(self) -> None:
        self._pools: dict[str, torch.Tensor] = {}  # pool id -> the pool tensor

    def allocate(self, nbytes: int) -> torch.Tensor:
        import torch

        return torch.zeros(nbytes, dtype=torch.uint8)

    def export(self, pool_id: str, pool: torch.Tensor) -> GpuPoolInfo:
        self._pools[pool_id] = pool
        return GpuPoolInfo(pool_id=pool_id, device_uuid="in-process", capacity_bytes=pool.numel(),
                           transport="in_process")

    def open(self, info: GpuPoolInfo) -> torch.Tensor:
        pool = self._pools.get(info.pool_id)
        if info.transport != self.transport or pool is None:
            raise DaemonUnavailable(f"GPU pool {info.pool_id} ({info.transport}) was not exported in this process")
        return pool

    def synchronize(self, pool: torch.Tensor) -> None:
        """CPU copies are synchronous: nothing to wait for."""


def device_index(device_uuid: str) -> int:
    """This process's index of the GPU named ``device_uuid``; ``DaemonUnavailable`` if it cannot see it."""
    import torch

    if not torch.cuda.is_available():
        raise DaemonUnavailable("the daemon answered GPU extents, but this process has no CUDA device")
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == device_uuid:
            return i
    raise DaemonUnavailable(f"the kvd GPU pool lives on GPU {device_uuid}, which this process cannot see "
                            "(CUDA_VISIBLE_DEVICES?)")
