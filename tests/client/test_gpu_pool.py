"""The transfer transaction with GPU extents (``kvd.client.gpu_pool``, ``kvd.client.transfer``) end to end.

A real daemon with a GPU tier, served from a thread of this process (``tests.daemon_thread``), and the
real client over its socket. The one stand-in is ``InProcessIpc``: the GPU pool is a CPU tensor that
the daemon and the client share inside this process, where CUDA IPC maps it into another one.
"""

from __future__ import annotations

import pytest
import torch

from kvd.client.client import KvdClient
from kvd.client.gpu_pool import GpuPools
from kvd.client.prefix import register
from kvd.client.transfer import open_lease, reserve
from kvd.core import protocol as P
from kvd.core.gpu_ipc import InProcessIpc
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec
from kvd.core.protocol_gpu import GpuPoolInfo
from tests.daemon_thread import gpu_daemon

SPEC = ModelSpec("toy-gpu", num_layers=2, num_kv_heads=2, head_dim=16, kv_dtype="bfloat16")
HM = HeadMap.from_classes("toy-gpu", [[True, False]] * 2, sink=4, window=64)
C = 256
ENTRY = 2 * 2 * 2 * C * 16 * 2  # layers × heads × (K, V) × tokens × dim × bf16 = 64 KiB


@pytest.fixture(scope="module")
def ipc():
    return InProcessIpc()  # the stand-in for CUDA IPC, shared by the daemon and the clients below


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, ipc):
    root = tmp_path_factory.mktemp("kvd")
    d = gpu_daemon(root, ipc, gpu_bytes=8 * ENTRY, host_bytes=64 * ENTRY)
    yield d
    d.stop()


@pytest.fixture
def client(daemon):
    c = KvdClient(daemon.socket, register_cuda=False)
    yield c
    c.close()


def kv_for(num_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, num_tokens, SPEC.head_dim, generator=g).bfloat16()


def store(h, toks, kv) -> list[P.ExtentInfo]:
    entries = [P.ReserveEntry(hash=x, num_tokens=C, start_token=i * C, end_token=len(toks))
               for i, x in enumerate(h.hashes(toks))]
    with reserve(h, entries) as res:
        for i in range(len(res.hashes)):
            res.entry(i).write_from(kv, i * C)
        return res


def load(h, toks, **kw) -> tuple[list[str], torch.Tensor, set[str]]:
    hashes = h.hashes(toks)
    out = torch.zeros(SPEC.num_layers, 2, SPEC.num_kv_heads, len(hashes) * C, SPEC.head_dim, dtype=torch.bfloat16)
    with open_lease(h, hashes, **kw) as lease:
        for i in range(len(hashes)):
            if lease.entry(i) is not None:
                lease.entry(i).read_into(out, i * C)
        tiers = {x.tier for e in lease._answers for x in e.extents}
        return lease.states, out, tiers


def test_a_gpu_handle_stores_into_the_pool_and_loads_from_it(daemon, client, ipc, request):
    h = register(client, SPEC, HM, namespace=request.node.name, gpu=GpuPools(ipc))
    toks, kv = list(range(2 * C)), kv_for(2 * C, 1)
    res = store(h, toks, kv)
    # the reservation named the pool, and the daemon indexed every extent there
    assert res.gpu_pool is not None and res.gpu_pool.transport == "in_process"
    entries = [daemon.store.index.get((h.namespace, h.fingerprint, x)) for x in h.hashes(toks)]
    assert all(e.tiers() == ["gpu"] for e in entries)
    states, out, tiers = load(h, toks)
    assert states == ["ok", "ok"] and tiers == {"gpu"} and torch.equal(out, kv)


def test_a_handle_without_the_pool_reads_the_same_bytes_from_the_arena(daemon, client, ipc, request):
    ns = request.node.name
    writer = register(client, SPEC, HM, namespace=ns, gpu=GpuPools(ipc))
    reader = register(client, SPEC, HM, namespace=ns)  # maps the arena only, as every client before the GPU tier
    toks, kv = list(range(1000, 1000 + 2 * C)), kv_for(2 * C, 2)
    store(writer, toks, kv)
    states, out, tiers = load(reader, toks)
    assert states == ["ok", "ok"] and tiers == {"host"} and torch.equal(out, kv)


def test_gpu_extents_are_verified_on_demand(daemon, client, ipc, request):
    h = register(client, SPEC, HM, namespace=request.node.name, gpu=GpuPools(ipc))
    toks, kv = list(range(2000, 2000 + C)), kv_for(C, 3)
    res = store(h, toks, kv)
    pool = ipc.open(res.gpu_pool)
    x = daemon.store.index.get((h.namespace, h.fingerprint, h.hashes(toks)[0])).extents["global"]
    pool[x.copies["gpu"].loc.offset] ^= 0xFF  # another writer of the pool scribbles over the extent
    # by default GPU extents are not hashed on the client (the daemon checks them when they leave the pool)
    assert load(h, toks)[0] == ["ok"]
    # asked for, the check copies them to the host and refuses the bad one
    assert load(h, toks, verify_gpu=True)[0] == ["bad_checksum"]


def test_a_full_pool_makes_room_by_demoting_and_loads_span_both_tiers(daemon, client, ipc, request):
    h = register(client, SPEC, HM, namespace=request.node.name, gpu=GpuPools(ipc))
    seqs = [(list(range(10_000 * (i + 1), 10_000 * (i + 1) + 4 * C)), kv_for(4 * C, 10 + i)) for i in range(3)]
    for toks, kv in seqs:  # 12 entries through a pool of 8: the oldest are demoted to the arena
        store(h, toks, kv)
    seen = set()
    for toks, kv in seqs:
        states, out, tiers = load(h, toks)
        assert states == ["ok"] * 4 and torch.equal(out, kv)
        seen |= tiers
    assert seen == {"gpu", "host"}


def test_a_new_pool_on_the_same_gpu_replaces_the_old_mapping():
    ipc = InProcessIpc()
    pools = GpuPools(ipc)
    old = ipc.export("old", torch.zeros(16, dtype=torch.uint8))
    new = ipc.export("new", torch.ones(16, dtype=torch.uint8))
    assert pools.pool(old).sum() == 0 and pools.pool(new).sum() == 16
    assert list(pools._pools) == ["new"]  # the restarted daemon's pool: the old one is let go
    assert isinstance(new, GpuPoolInfo)


class StreamedPools(GpuPools):
    """``GpuPools`` of a process whose device work lags behind its calls, as on a CUDA stream: ``queued``
    holds copies into the pool (a gather kernel launched, not yet run); they run when the process
    synchronizes, as ``torch.cuda.synchronize`` would wait for it."""

    def __init__(self, ipc) -> None:
        super().__init__(ipc)
        self.queued: list = []

    def synchronize(self, info) -> None:
        while self.queued:
            self.queued.pop(0)()
        super().synchronize(info)


def test_an_abort_waits_for_the_copies_still_running_into_the_pool(tmp_path, request):
    """A writer that aborts after launching copies into its GPU slots (vLLM's worker aborts a step's
    saves when a later layer fails) must not hand the slots back while those copies run: another
    writer gets them next, and the late copy would land in its committed entry, which GPU readers do
    not hash by default."""
    ipc = InProcessIpc()
    d = gpu_daemon(tmp_path, ipc, gpu_bytes=2 * ENTRY, host_bytes=8 * ENTRY)
    c = KvdClient(d.socket, register_cuda=False)
    try:
        a_pools = StreamedPools(ipc)
        a = register(c, SPEC, HM, namespace=request.node.name + "-a", gpu=a_pools)
        b = register(c, SPEC, HM, namespace=request.node.name + "-b", gpu=GpuPools(ipc))
        toks, kv_a, kv_b = list(range(C)), kv_for(C, 20), kv_for(C, 21)
        res = reserve(a, [P.ReserveEntry(hash=a.hashes(toks)[0], num_tokens=C, end_token=C)])
        view = res.entry(0)
        a_pools.queued.append(lambda: view.write_from(kv_a, 0))  # its copy is launched, not yet run
        assert res.gpu_pool is not None
        res.abort()  # the step failed: its saves are aborted
        # another writer gets the same slots at once, writes, and commits
        got = store(b, toks, kv_b)
        assert [x.offset for x in got._answers[0].extents] == [x.offset for x in res._answers[0].extents]
        a_pools.synchronize(res.gpu_pool)  # writer a's device work is done, whenever that is
        states, out, tiers = load(b, toks)
        assert states == ["ok"] and tiers == {"gpu"}
        assert torch.equal(out, kv_b), "the aborted writer's late copy landed in another entry"
    finally:
        c.close()
        d.stop()
