"""Copies between leased/reserved entries and a paged KV layout (``kvd.client.paged``), on CPU tensors.

The engine's KV is vLLM's GPU layout ``LBNHC`` (per layer physically ``[blocks, N, H, 2D]``, seen as
``[blocks, H, N, 2D]``) held on the CPU; the entries lie in the daemon's GPU pool (the in-process
stand-in for CUDA IPC, ``InProcessIpc``) or its arena, so both buffers are exercised in one call. The
kernels run as their torch references and, once, through the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch

from kvd.client.client import KvdClient
from kvd.client.gpu_pool import GpuPools
from kvd.client.paged import load_paged, store_paged
from kvd.client.prefix import register
from kvd.client.transfer import open_lease, reserve
from kvd.core import protocol as P
from kvd.core.gpu_ipc import InProcessIpc
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec
from tests.daemon_thread import gpu_daemon

SPEC = ModelSpec("toy-paged", num_layers=2, num_kv_heads=4, head_dim=16, kv_dtype="bfloat16")
HM = HeadMap.from_classes("toy-paged", [[True, False, True, False]] * 2, sink=4, window=64)
C, N = 256, 16  # tokens per entry, tokens per engine block
ENTRY = 2 * 4 * 2 * C * 16 * 2  # 128 KiB


@pytest.fixture(scope="module")
def ipc():
    return InProcessIpc()  # the stand-in for CUDA IPC


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, ipc):
    root = tmp_path_factory.mktemp("kvd")
    # a pool of 3 entries: a 4-entry store puts 3 in the pool and 1 in the arena
    d = gpu_daemon(root, ipc, gpu_bytes=3 * ENTRY, host_bytes=32 * ENTRY)
    yield d
    d.stop()


def paged(num_blocks: int, grow: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, physical ``[blocks, N, H, 2D]`` (each its own allocation, as vLLM's) and the view
    ``[blocks, H, N, 2D]`` (LBNHC). ``grow``: layer l has ``l * grow`` more blocks (layers unlike)."""
    phys = [torch.zeros(num_blocks + layer * grow, N, SPEC.num_kv_heads, 2 * SPEC.head_dim, dtype=torch.bfloat16)
            for layer in range(SPEC.num_layers)]
    return phys, [t.permute(0, 2, 1, 3) for t in phys]


def token_view(phys: list[torch.Tensor], block_ids: torch.Tensor) -> torch.Tensor:
    """``[L, 2, H, T, D]`` of the tokens in ``block_ids`` (row per entry, in order), by plain indexing."""
    cells = torch.stack([t[block_ids.reshape(-1)].reshape(-1, *t.shape[2:]) for t in phys])  # [L, T, H, 2D]
    D2 = cells.shape[-1]
    return torch.stack([cells[..., : D2 // 2], cells[..., D2 // 2 :]], dim=1).permute(0, 1, 3, 2, 4)


@pytest.mark.parametrize("grow", [0, 1], ids=["one-launch", "layers-unlike"])
@pytest.mark.parametrize("use_triton", [False, True], ids=["torch-ref", "triton"])
def test_store_then_load_paged_across_the_pool_and_the_arena(daemon, ipc, use_triton, grow, request):
    """Layers alike go in one launch; layers one launch cannot reach together (here: of different
    sizes) in a launch each. Both move the same bytes."""
    client = KvdClient(daemon.socket, register_cuda=False)
    try:
        h = register(client, SPEC, HM, namespace=request.node.name.replace("[", "-").replace("]", ""),
                     gpu=GpuPools(ipc))
        num_entries, per = 4, C // N
        g = torch.Generator().manual_seed(7)
        # engine A: its KV in 80 blocks, the prompt's tokens in a scattered order of them
        src_phys, src_layers = paged(80, grow)
        for t in src_phys:
            t.copy_(torch.randn(t.shape, generator=g).bfloat16())
        src_ids = torch.randperm(80, generator=g)[: num_entries * per].reshape(num_entries, per)
        toks = list(range(num_entries * C))
        entries = [P.ReserveEntry(hash=x, num_tokens=C, start_token=i * C, end_token=len(toks))
                   for i, x in enumerate(h.hashes(toks))]
        with reserve(h, entries) as res:
            store_paged([res.entry(i) for i in range(num_entries)], src_layers, src_ids, layout="LBNHC",
                        use_triton=use_triton)
        # three entries went to the pool, the fourth to the arena (relief may have moved one more down)
        where = [t for x in h.hashes(toks) for t in daemon.store.index.get((h.namespace, h.fingerprint, x)).tiers()]
        assert set(where) == {"gpu", "host"} and len(where) == num_entries
        # engine B: another KV, other blocks; loads every entry, wherever it lies
        dst_phys, dst_layers = paged(96, grow)
        dst_ids = torch.randperm(96, generator=g)[: num_entries * per].reshape(num_entries, per)
        with open_lease(h, h.hashes(toks)) as lease:
            assert lease.states == ["ok"] * num_entries
            load_paged([lease.entry(i) for i in range(num_entries)], dst_layers, dst_ids, layout="LBNHC",
                       use_triton=use_triton)
        assert torch.equal(token_view(dst_phys, dst_ids), token_view(src_phys, src_ids))
    finally:
        client.close()


def test_entries_of_different_lengths_are_refused():
    class View:
        def __init__(self, n):
            self.num_tokens, self.extents = n, ()

    with pytest.raises(ValueError, match="one length"):
        load_paged([View(256), View(128)], [torch.zeros(1, 1, 16, 2)], torch.zeros(2, 16, dtype=torch.int64),
                   layout="LBNHC")
