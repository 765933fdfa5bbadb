"""The GPU tier: GPU memory the daemon owns, cut into slots like the arena, mapped by engines by CUDA IPC.

What it buys: KV an engine stored stays in GPU memory that outlives the engine process, so a restarted
engine (or a second engine process on the same GPU) loads its prefixes device to device, at HBM speed,
instead of over PCIe from the host arena (docs/gpu.md has the figures).

Design decision (issue 18): **the GPU tier is the store's level 0 when enabled, and every memory tier is
one a client maps.** Before it, level 0 was always the host arena, because clients map it. Now the
store's levels are ``gpu → host → ssd → remote``, and the first levels (those that hold raw extents,
``holds_records = False``) are all mapped by clients: the arena by mmap, this pool by CUDA IPC. So:

- a writer that maps the pool (``gpu=True`` in its reserve) gets slots here first, and in the arena
  when there is no room here (the one eviction path, ``Pipeline.reserve``, demotes GPU victims to the
  arena first: a device-to-host copy, its bytes checked against the commit checksum);
- a reader that maps the pool is answered each extent from the fastest memory tier holding it; one
  that does not (older clients, CPU engines) reads the arena only, and the daemon copies GPU-only
  extents down for it (verified the same way);
- promotions from record tiers land in the arena (``Index.landing``), never here: the GPU holds what
  engines stored recently, the hot head classes longest (cold extents leave it once the arena holds
  them, as cold extents leave the arena once the SSD does);
- writes to record tiers always start from the arena, where the CPU codecs run: the GPU byte-plane and
  quantization kernels had no caller on this path and were removed (docs/gpu.md says why).

Why not keep the arena at level 0 with the pool as a side cache: stores into the pool would then need
a second reservation path, and eviction a second victim path; as level 0 it reuses both unchanged.

Partitions are tenants, as for the arena: each gets its own allocation (``gpu_bytes``), so the IPC
handle a tenant's client receives maps only that tenant's memory; a tenant without one stores in its
arena. ``Location.key`` names the partition, ``offset`` is a byte offset into its pool.

Bytes: the daemon never writes into a pool on the hot path (clients do, device to device); it reads
from it to checksum a commit and to demote, through pinned staging memory. ``read`` therefore returns
a host copy of the bytes on a GPU (a view on the stand-in's CPU pool). torch is imported only here and
in ``kvd.core.gpu_ipc``, and only when the tier is built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kvd.core.gpu_ipc import new_pool_id
from kvd.core.protocol_gpu import GpuPoolInfo
from kvd.tiers.arena import SlotAllocator
from kvd.tiers.base import Buffer, ExtentName, Location, Tier, TierStats

if TYPE_CHECKING:
    import torch

    from kvd.core.gpu_ipc import CudaIpc, InProcessIpc

logger = logging.getLogger(__name__)


class GpuPool:
    """One allocation of GPU memory (one partition's), cut into ``slot_bytes`` slots; the attributes
    ``kvd.store.space`` reads of an arena (``allocator``, ``num_slots``, ``slot_bytes``, ``slots_for``)."""

    def __init__(self, tensor: torch.Tensor, slot_bytes: int, info: GpuPoolInfo) -> None:
        self.tensor = tensor  # uint8 [capacity_bytes]
        self.slot_bytes = slot_bytes
        self.num_slots = tensor.numel() // slot_bytes
        self.capacity_bytes = self.num_slots * slot_bytes
        self.allocator = SlotAllocator(self.num_slots)
        self.info = info

    def slots_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.slot_bytes))


class GpuTier(Tier):
    name = "gpu"

    def __init__(self, ipc: CudaIpc | InProcessIpc, capacity_bytes: int, slot_bytes: int, *,
                 partitions: dict[str, int] | None = None,
                 partition_of: Callable[[str], str] = lambda namespace: "") -> None:
        """A pool of ``capacity_bytes`` through ``ipc`` or, with ``partitions`` (partition -> bytes),
        one pool per partition with bytes (a partition of 0 bytes has none: its extents go elsewhere)."""
        sizes = partitions if partitions is not None else {"": capacity_bytes}
        self.ipc = ipc
        self.partition_of = partition_of
        self.slot_bytes = slot_bytes
        self.pools: dict[str, GpuPool] = {}
        try:
            for p, nbytes in sizes.items():
                if nbytes >= slot_bytes:
                    tensor = ipc.allocate(nbytes // slot_bytes * slot_bytes)
                    self.pools[p] = GpuPool(tensor, slot_bytes, ipc.export(new_pool_id(), tensor))
        except BaseException:
            self.close()
            raise
        self.capacity_bytes = sum(pool.capacity_bytes for pool in self.pools.values())

    # ---- partitions ----------------------------------------------------------------------------

    def pool(self, partition: str = "") -> GpuPool | None:
        return self.pools.get(partition)

    def info(self, partition: str = "") -> GpuPoolInfo | None:
        """What a client of ``partition`` needs to map its pool (None: the partition has none)."""
        pool = self.pools.get(partition)
        return pool.info if pool is not None else None

    def slot_space(self, partition: str = "") -> GpuPool | None:
        return self.pools.get(partition)

    def _pool_of(self, loc: Location) -> GpuPool:
        pool = self.pools.get(loc.key.decode())
        assert pool is not None, f"no GPU pool for partition {loc.key!r}"
        return pool

    # ---- Tier ----------------------------------------------------------------------------------

    def fits(self, nbytes: int, name: ExtentName | None = None) -> bool:
        pool = self.pools.get(self.partition_of(name.namespace) if name is not None else "")
        return pool is not None and pool.slots_for(nbytes) <= pool.num_slots

    def footprint(self, nbytes: int, name: ExtentName | None = None) -> int:
        pool = self.pools.get(self.partition_of(name.namespace) if name is not None else "")
        return nbytes if pool is None else pool.slots_for(nbytes) * pool.slot_bytes

    def reserve(self, nbytes: int, name: ExtentName | None = None) -> Location | None:
        p = self.partition_of(name.namespace) if name is not None else ""
        pool = self.pools.get(p)
        if pool is None:
            return None
        count = pool.slots_for(nbytes)
        start = pool.allocator.allocate(count)
        if start is None:
            return None
        return Location(self.name, start * pool.slot_bytes, count * pool.slot_bytes, p.encode())

    def write(self, loc: Location, data: Buffer) -> None:
        """Host bytes into the pool (a host-to-device copy)."""
        import torch

        n = memoryview(data).nbytes
        assert n <= loc.nbytes, f"write of {n} bytes into a {loc.nbytes}-byte location"
        if n:  # a private copy: torch.frombuffer wants a writable buffer (not on a hot path)
            src = torch.frombuffer(bytearray(memoryview(data).cast("B")), dtype=torch.uint8)
            self._pool_of(loc).tensor[loc.offset : loc.offset + n].copy_(src)

    def read(self, loc: Location) -> memoryview:
        """The bytes at ``loc`` in host memory: a copy through pinned staging for a GPU pool (the
        daemon reads to checksum and to demote, never on an engine's path), a view for a CPU pool."""
        import torch

        part = self._pool_of(loc).tensor[loc.offset : loc.offset + loc.nbytes]
        if part.device.type == "cpu":
            return memoryview(part.numpy())
        staging = torch.empty(loc.nbytes, dtype=torch.uint8, pin_memory=True)  # torch caches pinned blocks
        staging.copy_(part)
        return memoryview(staging.numpy())

    def drop(self, loc: Location) -> None:
        pool = self._pool_of(loc)
        pool.allocator.free(loc.offset // pool.slot_bytes, loc.nbytes // pool.slot_bytes)

    def stats(self) -> TierStats:
        used = sum(p.allocator.used_slots * p.slot_bytes for p in self.pools.values())
        return TierStats(self.name, self.capacity_bytes, used, sum(p.allocator.used_slots for p in self.pools.values()))

    def partition_stats(self, partition: str) -> TierStats:
        pool = self.pools.get(partition)
        if pool is None:
            return TierStats(self.name, 0, 0, 0)
        return TierStats(self.name, pool.capacity_bytes, pool.allocator.used_slots * pool.slot_bytes,
                         pool.allocator.used_slots)

    def close(self) -> None:
        """Free the pools. Engines that mapped one keep it until they drop their mapping (CUDA frees an
        exported allocation once every process has let go of it)."""
        self.pools.clear()


# ---- building ---------------------------------------------------------------------------------


def gpu_present() -> bool:
    """Whether this host has an NVIDIA GPU, asked without torch (NVML, else the driver's /proc tree),
    so a daemon on a machine without one never imports torch for nothing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no library, no driver: look for the driver's devices
        gpus = Path("/proc/driver/nvidia/gpus")
        return gpus.is_dir() and any(gpus.iterdir())


def cuda_ipc(device: int) -> CudaIpc | None:
    """CUDA IPC on ``device``, or None (logged) when torch, CUDA or that device is missing."""
    try:
        import torch
    except ImportError:
        logger.warning("gpu tier: torch is not installed on the daemon's host; serving without the GPU tier")
        return None
    if not torch.cuda.is_available() or device >= torch.cuda.device_count():
        logger.warning("gpu tier: CUDA device %d is not available (%d visible, CUDA_VISIBLE_DEVICES=%s); "
                       "serving without the GPU tier", device, torch.cuda.device_count() if torch.cuda.is_available()
                       else 0, os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
        return None
    from kvd.core.gpu_ipc import CudaIpc

    return CudaIpc(device)
