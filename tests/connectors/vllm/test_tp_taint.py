"""Tensor parallelism: a load that fails on one rank corrupts the KV every rank computes after it.

Each rank holds its own KV heads, but the layers mix heads across ranks (the attention output's
row-parallel projection and the MLP all-reduce), so a token computed over blocks that rank 1 failed to
fill has wrong hidden states on every rank from layer 1 on: rank 0's KV of that token is wrong too,
although rank 0's own load succeeded. vLLM recomputes the failed blocks (and everything after them) on
every rank; kvd must not keep what any rank stored from the step that read them: the ranks exchange
their failed loads before committing (``kvd.connectors.vllm.failures``).
"""

from __future__ import annotations

import threading

import pytest
import torch

from kvd.connectors.vllm.plan import LoadSpec, SaveSpec, StepPlan
from kvd.core import protocol as P
from tests.connectors.vllm.test_worker import NS, blocks_equal, hashes, make_worker, run_step, toks_for
from tests.daemon_proc import DaemonProc


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProc(tmp_path_factory.mktemp("kvd")).start()
    yield d
    d.kill()


class TensorParallelGroup:
    """Element-wise minimum over ranks run as threads of this process: the all-reduce the connector
    makes over vLLM's tensor-parallel CPU group (``connector._tp_min``), for a test without vLLM."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=30)
        self.values: list = [None] * size

    def merge(self, rank: int):
        def all_reduce_min(values: list[int]) -> list[int]:
            self.values[rank] = values
            self.barrier.wait()
            out = [min(col) for col in zip(*self.values)]
            self.barrier.wait()
            return out

        return all_reduce_min


def run_ranks(workers, plan: StepPlan) -> list[set[int]]:
    """One step on every rank at once (each rank's exchange waits for the others')."""
    out: list = [None] * len(workers)

    def one(i):
        out[i] = run_step(workers[i], plan)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_a_chunk_computed_after_another_ranks_failed_load_is_not_served(daemon):
    m = "tp-taint"
    rank0, rank1 = make_worker(daemon, f"{m} [tp0/2]", seed=31), make_worker(daemon, f"{m} [tp1/2]", seed=32)
    group = TensorParallelGroup(2)
    rank0.failures.merge, rank1.failures.merge = group.merge(0), group.merge(1)
    toks = toks_for(31, 1100)
    hs = hashes(rank0, toks)  # the scheduler's keys, seeded by rank 0's model, for every rank
    # An earlier engine stored chunks 0-1 on rank 0 only (rank 1's were evicted since the lookup).
    assert run_step(make_worker(daemon, f"{m} [tp0/2]", seed=33),
                    StepPlan(saves=(SaveSpec("a", NS, 0, hs[:2], (1, 2, 3, 4), len(toks)),))) == set()
    # Step N, the same plan on both ranks: r loads chunks 0-1 into blocks 1-4 and computes chunk 2 (5-6).
    blocks = (1, 2, 3, 4, 5, 6)
    step = StepPlan(loads=(LoadSpec("r", NS, 0, hs[:2], 0, 512, blocks[:4]),),
                    saves=(SaveSpec("r", NS, 0, hs[:3], blocks, len(toks)),))
    # Rank 0's lease found its chunks, but rank 1's did not: both report the blocks, neither stores.
    assert run_ranks([rank0, rank1], step) == [{1, 2, 3, 4}, {1, 2, 3, 4}]
    assert rank0.counters["stored_chunks"] == rank1.counters["stored_chunks"] == 0
    # Step N+1 (synchronous scheduling: the scheduler heard, bumped r's epoch): the recompute gives
    # rank 0's chunk 2 other values than step N computed over rank 1's garbage; both ranks save again.
    for w, seed in ((rank0, 34), (rank1, 35)):
        g = torch.Generator().manual_seed(seed)
        for t in w.kv_caches.values():
            t[list(blocks)] = torch.randn(t[list(blocks)].shape, generator=g).bfloat16()
    again = StepPlan(saves=(SaveSpec("r", NS, 0, hs[:3], blocks, len(toks), epoch=1),), heard=(1, 2, 3, 4))
    run_ranks([rank0, rank1], again)
    with daemon.client() as c:
        for w in (rank0, rank1):
            assert len(c.lookup(P.LookupRequest(fingerprint=w.session.spec.fingerprint(), namespace=NS,
                                                prefix_hashes=list(hs[:3]))).prefix) == 3
    # Every rank holds chunks 0-2: the scheduler offers them; rank 0 must load what the recompute computed.
    reader = make_worker(daemon, f"{m} [tp0/2]", seed=36)
    dst = (10, 11, 12, 13, 14, 15)
    assert run_step(reader, StepPlan(loads=(LoadSpec("s", NS, 0, hs[:3], 0, 768, dst),))) == set()
    assert blocks_equal(rank0, blocks[4:], reader, dst[4:])


def test_without_failures_the_ranks_exchange_and_load_as_one(daemon):
    """The exchange runs in every step with loads; when no rank failed, nothing changes."""
    m = "tp-clean"
    ranks = [make_worker(daemon, f"{m} [tp{r}/2]", seed=40 + r) for r in range(2)]
    group = TensorParallelGroup(2)
    for r, w in enumerate(ranks):
        w.failures.merge = group.merge(r)
    toks = toks_for(40, 800)
    hs = hashes(ranks[0], toks)
    blocks = (1, 2, 3, 4, 5, 6)
    assert run_ranks(ranks, StepPlan(saves=(SaveSpec("a", NS, 0, hs[:3], blocks, len(toks)),))) == [set(), set()]
    readers = [make_worker(daemon, f"{m} [tp{r}/2]", seed=50 + r) for r in range(2)]
    for r, w in enumerate(readers):
        w.failures.merge = group.merge(r)
    assert run_ranks(readers, StepPlan(loads=(LoadSpec("b", NS, 0, hs[:3], 0, 768, blocks),))) == [set(), set()]
    assert all(blocks_equal(a, blocks, b, blocks) for a, b in zip(ranks, readers))
