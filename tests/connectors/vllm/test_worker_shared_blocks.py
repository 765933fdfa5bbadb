"""A load that fails in blocks another request shares (vLLM's prefix cache) taints that request's saves too.

vLLM caches a request's blocks when it allocates them, external (connector-loaded) ones included, so a
second request scheduled in the same step can take them as its own prefix hit; vLLM's scheduler handles
an invalid block "shared by multiple requests in the batch" (``_update_requests_with_invalid_blocks``).
The second request's KV past those blocks is computed over what the failed load left there: kvd must not
store it.
"""

from __future__ import annotations

import pytest

from kvd.connectors.vllm.plan import LoadSpec, SaveSpec, StepPlan
from kvd.core import protocol as P
from tests.connectors.vllm.test_worker import NS, hashes, make_worker, run_step, toks_for
from tests.daemon_proc import DaemonProc


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProc(tmp_path_factory.mktemp("kvd")).start()
    yield d
    d.kill()


def test_a_save_reading_blocks_whose_load_failed_in_the_step_is_not_stored(daemon):
    w = make_worker(daemon, "shared-taint", seed=21)
    toks = toks_for(21, 1100)
    hs = hashes(w, toks)
    # r loads chunks 0-1 into blocks 1-4 (the lease finds nothing: they keep garbage); q, scheduled in the
    # same step, shares blocks 1-4 through vLLM's prefix cache and computes and saves its chunk 2.
    step = StepPlan(loads=(LoadSpec("r", NS, 0, hs[:2], 0, 512, (1, 2, 3, 4)),),
                    saves=(SaveSpec("q", NS, 2, hs[2:3], (1, 2, 3, 4, 5, 6), len(toks)),))
    assert run_step(w, step) == {1, 2, 3, 4}
    with daemon.client() as c:
        found = c.lookup(P.LookupRequest(fingerprint=w.session.spec.fingerprint(), namespace=NS,
                                         prefix_hashes=[hs[2]])).prefix
    assert found == [] and w.counters["stored_chunks"] == 0


def test_a_save_planned_before_the_failure_was_heard_reading_its_blocks_is_not_stored(daemon):
    w = make_worker(daemon, "shared-taint-async", seed=22)
    toks = toks_for(22, 1100)
    hs = hashes(w, toks)
    assert run_step(w, StepPlan(loads=(LoadSpec("r", NS, 0, hs[:2], 0, 512, (1, 2, 3, 4)),))) == {1, 2, 3, 4}
    # Step R+1 was planned before step R's errors reached the scheduler: z, new, takes blocks 1-4 from
    # vLLM's prefix cache (vLLM evicts them only when it processes step R's output) and saves chunk 2.
    run_step(w, StepPlan(saves=(SaveSpec("z", NS, 2, hs[2:3], (1, 2, 3, 4, 5, 6), len(toks)),)))
    with daemon.client() as c:
        found = c.lookup(P.LookupRequest(fingerprint=w.session.spec.fingerprint(), namespace=NS,
                                         prefix_hashes=[hs[2]])).prefix
    assert found == []


def test_once_the_scheduler_has_heard_saves_over_the_recomputed_blocks_are_stored(daemon):
    """Synchronous scheduling: the next plan comes after the scheduler learnt of the failure (it echoes the
    blocks, ``StepPlan.heard``, and bumped the requests' epochs); vLLM recomputed the blocks in that step."""
    w = make_worker(daemon, "shared-taint-sync", seed=23)
    toks = toks_for(23, 1100)
    hs = hashes(w, toks)
    blocks = (1, 2, 3, 4, 5, 6)
    assert run_step(w, StepPlan(loads=(LoadSpec("r", NS, 0, hs[:2], 0, 512, blocks[:4]),))) == {1, 2, 3, 4}
    run_step(w, StepPlan(saves=(SaveSpec("r", NS, 0, hs[:3], blocks, len(toks), epoch=1),), heard=(1, 2, 3, 4)))
    with daemon.client() as c:
        found = c.lookup(P.LookupRequest(fingerprint=w.session.spec.fingerprint(), namespace=NS,
                                         prefix_hashes=list(hs[:3]))).prefix
    assert len(found) == 3 and "r" not in w.failures.tainted


def test_the_scheduler_echoes_the_failed_blocks_it_heard_of_in_its_next_plan(daemon):
    from tests.connectors.vllm.test_scheduler import planner, request, step, tokens

    p = planner(daemon)
    assert p.num_new_matched_tokens(request("r", tokens(700, 9)), 0) == 0
    p.build(step(new=[("r", [1, 2, 3, 4, 5, 6], 0)], scheduled={"r": 700}))
    p.on_load_errors({2, 3})
    assert sorted(p.build(step()).heard) == [2, 3]
    assert p.build(step()).heard == ()  # once


def test_failed_blocks_stay_guarded_until_the_loader_recomputes_them_or_vllm_reallocates_them(daemon):
    """Under the recompute policy vLLM keeps failed blocks in its prefix cache and recomputes them in
    place; until then a later request can take them as a prefix hit. The scheduler guards them in every
    plan (``StepPlan.guarded``) and the worker drops saves that read them."""
    from tests.connectors.vllm.test_scheduler import planner, request, step, tokens

    p = planner(daemon)
    assert p.num_new_matched_tokens(request("r", tokens(1200, 10)), 0) == 0
    p.build(step(new=[("r", [1, 2, 3, 4, 5, 6, 7, 8], 0)], scheduled={"r": 1000}))
    p.on_load_errors({3, 4})  # r's tokens [256, 512): recomputed from token 256
    assert sorted(p.build(step(cached=[("r", None, 256, False)], scheduled={"r": 128})).guarded) == [4]  # 3 done
    assert p.build(step(cached=[("r", None, 384, False)], scheduled={"r": 128})).guarded == ()
    p.on_load_errors({5, 9})  # 9: a block no tracked request holds, guarded until vLLM reallocates it
    assert sorted(p.build(step()).guarded) == [5, 9]
    # a new request whose own prefix-cache hit ends at its first block: its blocks 9 and 5 are fresh
    assert p.build(step(new=[("n", [2, 9, 5], 128)], scheduled={"n": 10})).guarded == ()

    w = make_worker(daemon, "guarded", seed=24)
    toks = toks_for(24, 1100)
    hs = hashes(w, toks)
    save = SaveSpec("q", NS, 0, hs[:1], (1, 2), len(toks))
    run_step(w, StepPlan(saves=(save,), guarded=(2,)))
    assert w.counters["stored_chunks"] == 0 and w.counters["store_aborted_chunks"] == 1
    run_step(w, StepPlan(saves=(save,)))
    assert w.counters["stored_chunks"] == 1


def test_a_loader_that_gets_its_failed_blocks_back_as_a_prefix_hit_does_not_lift_their_guard(daemon):
    """The loader preempted before its recompute: vLLM keeps the failed blocks in its prefix cache, so
    the resumed loader can take them back as its own hit and compute past them without ever rewriting
    them. Its progress past a block is then no recompute of it: the block stays guarded (else its own
    save of that chunk, under the new epoch, stores what the failed load left)."""
    from tests.connectors.vllm.test_scheduler import planner, request, step, tokens

    p = planner(daemon)
    assert p.num_new_matched_tokens(request("r", tokens(1200, 11)), 0) == 0
    blocks = [1, 2, 3, 4, 5, 6, 7, 8]
    p.build(step(new=[("r", blocks, 0)], scheduled={"r": 1000}))
    p.on_load_errors({3, 4})  # r's tokens [256, 512)
    # Preempted, then resumed with vLLM's own hit of its 1000 computed tokens, failed blocks included.
    plan = p.build(step(cached=[("r", blocks, 896, True)], scheduled={"r": 200}))
    assert sorted(plan.guarded) == [3, 4]
    assert any(3 in s.block_ids for s in plan.saves)  # its save of chunk 1: the worker must drop it
