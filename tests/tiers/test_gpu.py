"""The GPU tier's logic (``kvd.tiers.gpu``) on CPU tensors, through the same interface as on a GPU.

The one stand-in: ``InProcessIpc`` passes the pool tensor inside this process where CUDA IPC would map
it in another one (issue 18). Everything else is the real tier: slots, partitions, reads and writes.
"""

from __future__ import annotations

import logging

import pytest
import torch

from kvd.core.gpu_ipc import InProcessIpc
from kvd.tiers.base import ExtentName, Location
from kvd.tiers.gpu import GpuTier, cuda_ipc

SLOT = 8192


def name(namespace: str = "default") -> ExtentName:
    return ExtentName(namespace, "fp", "h" * 32, "global", "prefix", 0, 256, 256, "exact")


def test_reserve_write_read_drop_round_trip():
    ipc = InProcessIpc()
    tier = GpuTier(ipc, 8 * SLOT, SLOT)
    loc = tier.reserve(3 * SLOT - 100, name())
    # a run of 3 whole slots at the start of the pool, in the default partition
    assert loc == Location("gpu", 0, 3 * SLOT, b"")
    data = bytes(range(256)) * 10
    tier.write(loc, data)
    assert bytes(tier.read(loc)[: len(data)]) == data
    assert tier.stats().used_bytes == 3 * SLOT and tier.stats().num_records == 3
    tier.drop(loc)
    assert tier.stats().used_bytes == 0
    with pytest.raises(AssertionError):
        tier.drop(loc)  # dropping twice is a bug


def test_what_a_client_maps_is_what_the_tier_holds():
    """The pool a client opens (here: the stand-in, passing the tensor) is the tier's own memory."""
    ipc = InProcessIpc()
    tier = GpuTier(ipc, 4 * SLOT, SLOT)
    info = tier.info("")
    assert info is not None and info.transport == "in_process" and info.capacity_bytes == 4 * SLOT
    loc = tier.reserve(SLOT, name())
    mapped = ipc.open(info)
    mapped[loc.offset : loc.offset + 4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)  # the engine writes
    assert bytes(tier.read(loc)[:4]) == b"\x01\x02\x03\x04"  # the daemon reads it


def test_reserve_returns_none_and_changes_nothing_when_full():
    tier = GpuTier(InProcessIpc(), 4 * SLOT, SLOT)
    a = tier.reserve(3 * SLOT, name())
    assert tier.reserve(2 * SLOT, name()) is None  # one slot left
    assert tier.stats().used_bytes == 3 * SLOT
    assert tier.fits(4 * SLOT, name()) and not tier.fits(5 * SLOT, name())  # never fits: larger than the pool
    tier.drop(a)
    assert tier.reserve(4 * SLOT, name()) is not None


def test_partitions_are_separate_pools_and_a_zero_size_partition_has_none():
    ipc = InProcessIpc()
    tier = GpuTier(ipc, 0, SLOT, partitions={"": 2 * SLOT, "a": 4 * SLOT, "b": 0},
                   partition_of=lambda ns: ns.split(":")[0] if ns.split(":")[0] in ("a", "b") else "")
    assert tier.capacity_bytes == 6 * SLOT
    la = tier.reserve(4 * SLOT, name("a:x"))
    assert la is not None and la.key == b"a"
    # tenant a's pool is full; the default one is untouched and a's extents never spill into it
    assert tier.reserve(SLOT, name("a:y")) is None
    assert tier.partition_stats("").used_bytes == 0 and tier.partition_stats("a").used_bytes == 4 * SLOT
    # tenant b has no pool: nothing fits, nothing to map
    assert not tier.fits(SLOT, name("b:z")) and tier.reserve(SLOT, name("b:z")) is None and tier.info("b") is None
    # each pool has its own id and its own memory
    assert tier.info("a").pool_id != tier.info("").pool_id
    assert ipc.open(tier.info("a")).data_ptr() != ipc.open(tier.info("")).data_ptr()


def test_write_larger_than_the_location_is_a_bug():
    tier = GpuTier(InProcessIpc(), 2 * SLOT, SLOT)
    loc = tier.reserve(SLOT, name())
    with pytest.raises(AssertionError):
        tier.write(loc, b"x" * (SLOT + 1))


def test_slot_space_is_what_eviction_by_place_reads():
    tier = GpuTier(InProcessIpc(), 4 * SLOT, SLOT)
    tier.reserve(SLOT, name())
    pool = tier.slot_space("")
    assert pool.num_slots == 4 and pool.slot_bytes == SLOT and pool.slots_for(SLOT + 1) == 2
    assert pool.allocator.free_runs() == [(1, 3)]
    assert tier.slot_space("nobody") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_no_cuda_ipc_without_cuda(caplog):
    with caplog.at_level(logging.WARNING, logger="kvd.tiers.gpu"):
        assert cuda_ipc(0) is None
    assert "not available" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA device")
def test_each_cuda_pool_is_an_ipc_allocation_of_its_own():
    """A client maps the whole allocation its pool's IPC handle names, so two partitions' pools must never
    share one. torch's caching allocator puts allocations under 10 MiB side by side in one segment: two
    4 MiB tenant pools made one after the other had the same handle, the second at offset 4 MiB."""
    from kvd.core.gpu_ipc import CudaIpc

    tier = GpuTier(CudaIpc(0), 4 << 20, 128 << 10, partitions={"": 4 << 20, "a": 4 << 20, "b": 512 << 10})
    try:
        handles = [tier.info(p).handle for p in ("", "a", "b")]
        assert len(set(handles)) == 3, "two partitions' pools are mapped by one IPC handle"
    finally:
        tier.close()
