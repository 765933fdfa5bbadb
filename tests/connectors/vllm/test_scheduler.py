"""The vLLM connector's scheduler side (``SchedulerPlanner``) against a real daemon, without vLLM.

vLLM's request and scheduler-output objects are stood in for by plain namespaces with the fields the
planner reads; chunks are stored through ``kvio`` under the same fingerprint and namespace, as another
engine would have stored them.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from kvd.client import prefix as kvio
from kvd.connectors.vllm.scheduler import SchedulerPlanner, salted_namespace
from kvd.connectors.vllm.session import ConnectorSettings, DaemonSession
from kvd.core import protocol as P
from kvd.core.errors import ConfigError
from kvd.core.keys import ModelSpec, prefix_tail_hash
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("toy-vllm", num_layers=2, num_kv_heads=2, head_dim=16, kv_dtype="bfloat16")
C, B = 256, 128  # daemon chunk, vLLM block


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProc(tmp_path_factory.mktemp("kvd")).start()
    yield d
    d.kill()


def session(d: DaemonProc, **kw) -> DaemonSession:
    settings = ConnectorSettings(socket=d.socket, namespace=kw.pop("namespace", "plan"), timeout_s=1.0, **kw)
    return DaemonSession(settings, SPEC, None, block_size=B, role="scheduler")


def request(rid: str, tokens: list[int], **kw) -> SimpleNamespace:
    fields = dict(request_id=rid, prompt_token_ids=tokens, num_prompt_tokens=len(tokens), lora_request=None,
                  mm_features=[], prompt_embeds=None, cache_salt=None)
    fields.update(kw)
    return SimpleNamespace(**fields)


def step(new=(), cached=(), scheduled=None) -> SimpleNamespace:
    """``new``: (req_id, block_ids, num_computed); ``cached``: (req_id, new_block_ids|None, num_computed,
    resumed); ``scheduled``: req_id -> tokens scheduled this step."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(list(b),), num_computed_tokens=n) for r, b, n in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[c[0] for c in cached], new_block_ids=[(list(c[1]),) if c[1] is not None else None for c in cached],
            num_computed_tokens=[c[2] for c in cached], resumed_req_ids={c[0] for c in cached if c[3]}),
        num_scheduled_tokens=dict(scheduled or {}))


def kv_for(spec: ModelSpec, num_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.num_layers, 2, spec.num_kv_heads, num_tokens, spec.head_dim, generator=g).bfloat16()


def store(d: DaemonProc, tokens: list[int], namespace: str = "plan") -> None:
    with d.client() as c:
        h = kvio.register(c, SPEC, namespace=namespace)
        kvio.store_prefix(h, tokens, kv_for(SPEC, len(tokens), 3))


def tokens(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


def test_matched_tokens_are_the_stored_leading_chunks_beyond_the_local_hit(daemon):
    toks = tokens(1000, 1)
    store(daemon, toks[:768])  # 3 chunks
    p = SchedulerPlanner(session(daemon), block_size=B, can_load=True, can_save=True)
    assert p.num_new_matched_tokens(request("a", toks), 0) == 768
    assert p.num_new_matched_tokens(request("a", toks), 384) == 384  # vLLM's own hit ends inside chunk 1
    assert p.num_new_matched_tokens(request("a", toks), 768) == 0
    assert p.num_new_matched_tokens(request("a", toks), 384) == 384
    assert p.hit_sources(request("a", toks), 384) == {"host": 384}  # for vLLM's per-tier hit counters
    # The last prompt token is never claimed: a 768-token prompt takes 2 chunks and the first block of
    # the third (a chunk serves any prefix of its tokens); vLLM recomputes the last block.
    assert p.num_new_matched_tokens(request("b", toks[:768]), 0) == 640
    assert p.num_new_matched_tokens(request("b2", toks[:769]), 0) == 768  # one token past the chunks
    assert p.num_new_matched_tokens(request("b3", toks[:700]), 0) == 512  # chunk 2 is not full: not keyed
    # Divergence inside chunk 1: only chunk 0 is this prompt's prefix.
    other = toks[:300] + tokens(700, 2)
    assert p.num_new_matched_tokens(request("c", other), 0) == 256


def test_lookups_are_cached_per_request(daemon):
    toks = tokens(600, 3)
    clock = [0.0]
    s = session(daemon)
    p = SchedulerPlanner(s, block_size=B, can_load=True, can_save=True, clock=lambda: clock[0])
    assert p.num_new_matched_tokens(request("r", toks), 0) == 0
    store(daemon, toks)
    assert p.num_new_matched_tokens(request("r", toks), 0) == 0  # called again by vLLM: cached answer
    clock[0] += 2.0  # past lookup_ttl_s
    assert p.num_new_matched_tokens(request("r", toks), 0) == 512
    assert s.counters["lookups"] == 2


def test_requests_kvd_cannot_key_are_not_tracked(daemon):
    toks = tokens(800, 4)
    store(daemon, toks)
    p = SchedulerPlanner(session(daemon), block_size=B, can_load=True, can_save=True)
    assert p.num_new_matched_tokens(request("lora", toks, lora_request=object()), 0) == 0
    assert p.num_new_matched_tokens(request("mm", toks, mm_features=[object()]), 0) == 0
    assert p.num_new_matched_tokens(request("salted", toks, cache_salt="tenant-b"), 0) == 0
    assert not p.requests.keys() & {"lora", "mm"}
    store(daemon, toks, namespace=salted_namespace("plan", "tenant-b"))
    p2 = SchedulerPlanner(session(daemon), block_size=B, can_load=True, can_save=True)
    assert p2.num_new_matched_tokens(request("salted", toks, cache_salt="tenant-b"), 0) == 768


def test_plan_loads_then_saves_only_new_full_prompt_chunks(daemon):
    toks = tokens(1100, 5)  # 4 full chunks; the daemon holds the first 2
    store(daemon, toks[:512])
    p = SchedulerPlanner(session(daemon), block_size=B, can_load=True, can_save=True)
    r = request("r", toks)
    ext = p.num_new_matched_tokens(r, 128)  # vLLM's own hit: one block
    assert ext == 384
    p.after_alloc(r, ext)
    blocks = [9, 3, 7, 1, 12, 4, 8, 2, 5]  # neither sorted nor contiguous
    # Step 1: loads [128, 512), computes 300 more tokens -> 812: chunk 2 completes.
    plan = p.build(step(new=[("r", blocks, 512)], scheduled={"r": 300}))
    (load,) = plan.loads
    assert (load.start, load.end, load.first_chunk, len(load.hashes)) == (128, 512, 0, 2)
    assert load.block_ids == tuple(blocks)
    (save,) = plan.saves
    assert (save.first_chunk, len(save.hashes), save.prompt_tokens) == (2, 1, 1100)
    # Step 2: the rest of the prompt -> chunk 3; step 3: a decode step saves nothing.
    plan = p.build(step(cached=[("r", [11], 812, False)], scheduled={"r": 288}))
    assert plan.loads == () and [(s.first_chunk, len(s.hashes)) for s in plan.saves] == [(3, 1)]
    assert plan.saves[0].block_ids == tuple(blocks + [11])
    assert p.build(step(cached=[("r", None, 1100, False)], scheduled={"r": 1})).saves == ()
    p.finished("r")
    assert "r" not in p.requests


def test_resumed_request_replaces_its_blocks_and_load_errors_resave(daemon):
    toks = tokens(700, 6)
    p = SchedulerPlanner(session(daemon), block_size=B, can_load=True, can_save=True)
    r = request("r", toks)
    assert p.num_new_matched_tokens(r, 0) == 0
    plan = p.build(step(new=[("r", [1, 2, 3, 4, 5, 6], 0)], scheduled={"r": 700}))
    # Two chunks and the tail: tokens [512, 640), all of the prompt's last block but its last token's
    assert [(s.first_chunk, len(s.hashes), s.last_tokens) for s in plan.saves] == [(0, 3, 128)]
    # Preempted, then resumed into other blocks: the new list replaces the old one.
    p.build(step(cached=[("r", [20, 21, 22, 23, 24, 25], 0, True)], scheduled={"r": 0}))
    assert p.requests["r"].block_ids == [20, 21, 22, 23, 24, 25]
    # A load error in block 22 (chunk 1): chunk 1 will be stored again once recomputed.
    p.on_load_errors({22})
    plan = p.build(step(cached=[("r", None, 0, False)], scheduled={"r": 700}))
    assert [(s.first_chunk, len(s.hashes), s.last_tokens) for s in plan.saves] == [(1, 2, 128)]


def test_roles_limit_loads_and_saves(daemon):
    toks = tokens(900, 7)
    store(daemon, toks)
    consumer = SchedulerPlanner(session(daemon), block_size=B, can_load=True, can_save=False)
    assert consumer.num_new_matched_tokens(request("r", toks), 0) == 768
    assert consumer.build(step(new=[("r", list(range(1, 9)), 0)], scheduled={"r": 900})).saves == ()
    producer = SchedulerPlanner(session(daemon), block_size=B, can_load=False, can_save=True)
    assert producer.num_new_matched_tokens(request("r", toks), 0) == 0


def test_daemon_down_means_no_hits_and_few_attempts(tmp_path):
    d = DaemonProc(tmp_path).start()
    s = session(d, retry_interval_s=60)
    p = SchedulerPlanner(s, block_size=B, can_load=True, can_save=True)
    toks = tokens(600, 8)
    assert p.num_new_matched_tokens(request("a", toks), 0) == 0
    d.kill()
    t0 = time.monotonic()
    for i in range(50):
        assert p.num_new_matched_tokens(request(f"r{i}", tokens(600, 100 + i)), 0) == 0
    assert time.monotonic() - t0 < 2.0
    assert s.counters["daemon_failures"] == 1  # the breaker stops further attempts


def test_chunk_not_a_multiple_of_the_block_is_refused(tmp_path):
    d = DaemonProc(tmp_path, env_extra={"KVD_KEYS__CHUNK_TOKENS": "192"}).start()
    try:
        with pytest.raises(ConfigError, match="multiple of vLLM's block_size"):
            session(d).require_compatible()
    finally:
        d.kill()


def commit_entry(d: DaemonProc, key: str, num_tokens: int, start: int, namespace: str = "plan") -> None:
    """An entry the daemon holds (its bytes do not matter to the scheduler side)."""
    with d.client() as c:
        h = kvio.register(c, SPEC, namespace=namespace)
        r = c.reserve(P.ReserveRequest(fingerprint=h.fingerprint, namespace=namespace, entries=[
            P.ReserveEntry(hash=key, num_tokens=num_tokens, start_token=start, end_token=start + num_tokens + 1)]))
        c.commit(P.CommitRequest(reservation_id=r.reservation_id))


def test_tail_entry_is_keyed_saved_and_offered_after_the_full_chunks(daemon):
    toks = tokens(1000, 11)  # 3 full chunks (768) + 232 tokens: the tail is [768, 896)
    p = SchedulerPlanner(session(daemon), block_size=B, can_load=True, can_save=True)
    r = request("r", toks)
    t = p.requests.get("r") or p._track(r, p.session.handle())
    assert t.tail_tokens == 128 and len(t.hashes) == 3
    assert t.tail == prefix_tail_hash(toks, chunk_tokens=C, tail_tokens=128, namespace="plan",
                                      fingerprint=p.session.handle().fingerprint, parent=t.hashes[-1])
    assert t.tail not in t.hashes
    # The first serving computes everything and stores the chunks with the tail in one save.
    assert p.num_new_matched_tokens(r, 0) == 0
    (save,) = p.build(step(new=[("r", list(range(1, 9)), 0)], scheduled={"r": 1000})).saves
    assert (save.first_chunk, save.hashes, save.last_tokens) == (0, (*t.hashes, t.tail), 128)
    assert p.build(step(cached=[("r", None, 1000, False)], scheduled={"r": 1})).saves == ()
    p.finished("r")
    # Another engine: chunks stored, tail not yet -> 768; with the tail -> 896 (vLLM computes 104).
    store(daemon, toks[:768])
    p2 = SchedulerPlanner(session(daemon), block_size=B, can_load=True, can_save=True)
    assert p2.num_new_matched_tokens(request("a", toks), 0) == 768
    commit_entry(daemon, t.tail, 128, 768)
    p3 = SchedulerPlanner(session(daemon), block_size=B, can_load=True, can_save=True)
    r3 = request("b", toks)
    assert p3.num_new_matched_tokens(r3, 0) == 896
    assert p3.num_new_matched_tokens(r3, 768) == 128  # vLLM's own hit covers the chunks
    p3.after_alloc(r3, 896)
    plan = p3.build(step(new=[("b", list(range(20, 28)), 896)], scheduled={"b": 104}))
    (load,) = plan.loads
    assert (load.start, load.end, load.hashes, load.last_tokens) == (0, 896, (*t.hashes, t.tail), 128)
    assert plan.saves == ()  # everything it loaded is stored already
    # A shorter prompt with the same tokens there has the same block-aligned tail and shares it; one
    # whose tokens differ inside the tail does not.
    p4 = SchedulerPlanner(session(daemon), block_size=B, can_load=True, can_save=True)
    assert p4.num_new_matched_tokens(request("c", toks[:950]), 0) == 896
    assert p4.num_new_matched_tokens(request("d", toks[:800] + tokens(200, 12)), 0) == 768
