"""The vLLM connector's scheduler side (``SchedulerPlanner``) against a real daemon, without vLLM.

vLLM's request and scheduler-output objects are stood in for by plain namespaces with the fields the
planner reads; chunks are stored through ``kvd.client.prefix`` under the same fingerprint and
namespace, as another engine would have stored them.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from kvd.client import prefix
from kvd.client.session import DaemonSession
from kvd.connectors.vllm.scheduler import SchedulerPlanner, salted_namespace
from kvd.connectors.vllm.settings import ConnectorSettings, open_session
from kvd.core import protocol as P
from kvd.core.errors import ConfigError
from kvd.core.keys import ModelSpec, prefix_aliases, prefix_hashes, prefix_tail_hash
from tests.client.recording import RecordingClient
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("toy-vllm", num_layers=2, num_kv_heads=2, head_dim=16, kv_dtype="bfloat16")
C, B = 256, 128  # daemon chunk, vLLM block


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProc(tmp_path_factory.mktemp("kvd")).start()
    yield d
    d.kill()


def settings_for(d: DaemonProc, **kw) -> ConnectorSettings:
    return ConnectorSettings(socket=d.socket, namespace=kw.pop("namespace", "plan"), timeout_s=1.0, **kw)


def session(d: DaemonProc, **kw) -> DaemonSession:
    return open_session(settings_for(d, **kw), SPEC, None, block_size=B, role="scheduler")


def planner(d: DaemonProc, *, can_load: bool = True, can_save: bool = True, clock=time.monotonic,
            client=None, block_size: int = B, **kw) -> SchedulerPlanner:
    settings = settings_for(d, **kw)
    s = open_session(settings, SPEC, None, block_size=block_size, role="scheduler", client=client)
    return SchedulerPlanner(s, settings, block_size=block_size, can_load=can_load, can_save=can_save, clock=clock)


def request(rid: str, tokens: list[int], **kw) -> SimpleNamespace:
    fields = dict(request_id=rid, prompt_token_ids=tokens, num_prompt_tokens=len(tokens), lora_request=None,
                  mm_features=[], prompt_embeds=None, cache_salt=None)
    fields.update(kw)
    return SimpleNamespace(**fields)


def step(new=(), cached=(), scheduled=None, finished=()) -> SimpleNamespace:
    """``new``: (req_id, block_ids, num_computed); ``cached``: (req_id, new_block_ids|None, num_computed,
    resumed); ``scheduled``: req_id -> tokens scheduled this step; ``finished``: request ids."""
    return SimpleNamespace(
        finished_req_ids=set(finished),
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
        h = prefix.register(c, SPEC, namespace=namespace)
        prefix.store_prefix(h, tokens, kv_for(SPEC, len(tokens), 3))


def tokens(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


def test_matched_tokens_are_the_stored_leading_chunks_beyond_the_local_hit(daemon):
    toks = tokens(1000, 1)
    store(daemon, toks[:768])  # 3 chunks
    p = planner(daemon)
    assert p.num_new_matched_tokens(request("a", toks), 0) == 768
    assert p.num_new_matched_tokens(request("a", toks), 384) == 384  # vLLM's own hit ends inside chunk 1
    assert p.num_new_matched_tokens(request("a", toks), 768) == 0
    assert p.num_new_matched_tokens(request("a", toks), 384) == 384
    assert p.hit_sources(request("a", toks), 384) == {"host": 384}  # for vLLM's per-tier hit counters
    # The last prompt token is never claimed: a 768-token prompt takes 2 chunks and the third up to its
    # last token (a chunk serves any prefix of its tokens; the last block is loaded in part); vLLM
    # computes that one token (its own prefix cache would recompute the whole last block).
    assert p.num_new_matched_tokens(request("b", toks[:768]), 0) == 767
    assert p.num_new_matched_tokens(request("b2", toks[:769]), 0) == 768  # one token past the chunks
    assert p.num_new_matched_tokens(request("b3", toks[:700]), 0) == 512  # chunk 2 is not full: not keyed
    # Divergence inside chunk 1: only chunk 0 is this prompt's prefix.
    other = toks[:300] + tokens(700, 2)
    assert p.num_new_matched_tokens(request("c", other), 0) == 256


def test_lookups_are_cached_per_request(daemon):
    toks = tokens(600, 3)
    clock = [0.0]
    p = planner(daemon, clock=lambda: clock[0])
    s = p.session
    assert p.num_new_matched_tokens(request("r", toks), 0) == 0
    store(daemon, toks)
    assert p.num_new_matched_tokens(request("r", toks), 0) == 0  # called again by vLLM: cached answer
    clock[0] += 2.0  # past lookup_ttl_s
    assert p.num_new_matched_tokens(request("r", toks), 0) == 512
    assert s.counters["lookups"] == 2


def test_requests_kvd_cannot_key_are_not_tracked(daemon):
    toks = tokens(800, 4)
    store(daemon, toks)
    p = planner(daemon)
    assert p.num_new_matched_tokens(request("lora", toks, lora_request=object()), 0) == 0
    assert p.num_new_matched_tokens(request("mm", toks, mm_features=[object()]), 0) == 0
    assert p.num_new_matched_tokens(request("salted", toks, cache_salt="tenant-b"), 0) == 0
    assert not p.requests.keys() & {"lora", "mm"}
    store(daemon, toks, namespace=salted_namespace("plan", "tenant-b"))
    p2 = planner(daemon)
    assert p2.num_new_matched_tokens(request("salted", toks, cache_salt="tenant-b"), 0) == 768


def test_plan_loads_then_saves_only_new_full_prompt_chunks(daemon):
    toks = tokens(1100, 5)  # 4 full chunks; the daemon holds the first 2
    store(daemon, toks[:512])
    p = planner(daemon)
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
    p = planner(daemon)
    r = request("r", toks)
    assert p.num_new_matched_tokens(r, 0) == 0
    plan = p.build(step(new=[("r", [1, 2, 3, 4, 5, 6], 0)], scheduled={"r": 700}))
    # Two chunks and the tail: tokens [512, 640), all of the prompt's last block but its last token's
    assert [(s.first_chunk, len(s.hashes), s.last_tokens) for s in plan.saves] == [(0, 3, 128)]
    # Preempted, then resumed into other blocks: the new list replaces the old one.
    p.build(step(cached=[("r", [20, 21, 22, 23, 24, 25], 0, True)], scheduled={"r": 0}))
    assert p.requests["r"].block_ids == [20, 21, 22, 23, 24, 25]
    assert plan.saves[0].epoch == 0
    # A load error in block 22 (chunk 1): chunk 1 will be stored again once recomputed, under a new
    # epoch, which tells the workers that this save comes after vLLM's recompute (test_worker.py).
    p.on_load_errors({22})
    plan = p.build(step(cached=[("r", None, 0, False)], scheduled={"r": 700}))
    assert [(s.first_chunk, len(s.hashes), s.last_tokens, s.epoch) for s in plan.saves] == [(1, 2, 128, 1)]
    assert p.build(step(finished=["r", "x"])).finished in (("r", "x"), ("x", "r"))  # workers forget them


def test_decode_steps_save_the_chunks_generated_tokens_complete(daemon):
    """save_decode: chunks of prompt + answer are keyed as the next turn's prompt keys them."""
    prompt = tokens(600, 21)  # 2 full chunks, no tail (587 tokens after them round down to no block)
    answer = tokens(500, 22)
    r = request("r", prompt, all_token_ids=list(prompt))
    p = planner(daemon)
    assert p.num_new_matched_tokens(r, 0) == 0
    blocks = list(range(40, 49))
    plan = p.build(step(new=[("r", blocks, 0)], scheduled={"r": 600}))
    assert [(s.first_chunk, len(s.hashes)) for s in plan.saves] == [(0, 2)]

    def decode(computed: int, known: int):  # one decode step; ``known`` ids are final (async: fewer)
        r.all_token_ids[:] = (prompt + answer)[:known]
        return p.build(step(cached=[("r", None, computed, False)], scheduled={"r": 1})).saves

    for computed in range(600, 766):
        assert decode(computed, computed + 1) == ()
    # The step that computes position 767 completes chunk 2, but under async scheduling the id of its
    # last token is a placeholder yet: the chunk waits for it.
    assert decode(767, 767) == ()
    (save,) = decode(768, 769)
    turn2 = (prompt + answer)[:768] + tokens(300, 23)  # the next turn: prompt, answer, new message
    keys = prefix_hashes(turn2, chunk_tokens=C, namespace="plan", fingerprint=p.session.handle().fingerprint)
    assert (save.first_chunk, save.hashes, save.last_tokens) == (2, (keys[2],), 0)
    assert save.block_ids == tuple(blocks) and save.prompt_tokens == 769
    assert save.aliases == tuple(tuple(a) for a in prefix_aliases(
        turn2, keys[2:3], chunk_tokens=C, block_tokens=B, namespace="plan",
        fingerprint=p.session.handle().fingerprint, first_chunk=2))
    assert p.session.counters["decode_chunks_planned"] == 1
    assert decode(769, 770) == ()  # saved once
    # Off: only the prompt's chunks.
    off = planner(daemon, save_decode=False)
    r2 = request("r2", prompt, all_token_ids=prompt + answer)
    off.num_new_matched_tokens(r2, 0)
    assert [(s.first_chunk, len(s.hashes)) for s in off.build(step(new=[("r2", blocks, 0)], scheduled={"r2": 600})).saves] == [(0, 2)]
    assert off.build(step(cached=[("r2", None, 1023, False)], scheduled={"r2": 1})).saves == ()


def test_roles_limit_loads_and_saves(daemon):
    toks = tokens(900, 7)
    store(daemon, toks)
    consumer = planner(daemon, can_save=False)
    assert consumer.num_new_matched_tokens(request("r", toks), 0) == 768
    assert consumer.build(step(new=[("r", list(range(1, 9)), 0)], scheduled={"r": 900})).saves == ()
    producer = planner(daemon, can_load=False)
    assert producer.num_new_matched_tokens(request("r", toks), 0) == 0


def test_daemon_down_means_no_hits_and_few_attempts(tmp_path):
    d = DaemonProc(tmp_path).start()
    p = planner(d, retry_interval_s=60)
    s = p.session
    toks = tokens(600, 8)
    assert p.num_new_matched_tokens(request("a", toks), 0) == 0
    d.kill()
    t0 = time.monotonic()
    for i in range(50):
        assert p.num_new_matched_tokens(request(f"r{i}", tokens(600, 100 + i)), 0) == 0
    assert time.monotonic() - t0 < 2.0
    assert s.counters["daemon_failures"] == 1  # the breaker stops further attempts
    assert s.counters["lookups"] == 1 and s.counters["lookup_skipped"] >= 49  # only answered lookups count


def test_chunk_not_a_multiple_of_the_block_is_refused(tmp_path):
    d = DaemonProc(tmp_path, env_extra={"KVD_KEYS__CHUNK_TOKENS": "192"}).start()
    try:
        with pytest.raises(ConfigError, match="multiple of the engine's block size"):
            session(d).require_compatible()
    finally:
        d.kill()


def commit_entry(d: DaemonProc, key: str, num_tokens: int, start: int, namespace: str = "plan") -> None:
    """An entry the daemon holds (its bytes do not matter to the scheduler side)."""
    with d.client() as c:
        h = prefix.register(c, SPEC, namespace=namespace)
        r = c.reserve(P.ReserveRequest(fingerprint=h.fingerprint, namespace=namespace, entries=[
            P.ReserveEntry(hash=key, num_tokens=num_tokens, start_token=start, end_token=start + num_tokens + 1)]))
        c.commit(P.CommitRequest(reservation_id=r.reservation_id))


def test_tail_entry_is_keyed_saved_and_offered_after_the_full_chunks(daemon):
    toks = tokens(1000, 11)  # 3 full chunks (768) + 232 tokens: the tail is [768, 896)
    p = planner(daemon)
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
    p2 = planner(daemon)
    assert p2.num_new_matched_tokens(request("a", toks), 0) == 768
    commit_entry(daemon, t.tail, 128, 768)
    p3 = planner(daemon)
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
    p4 = planner(daemon)
    assert p4.num_new_matched_tokens(request("c", toks[:950]), 0) == 896
    assert p4.num_new_matched_tokens(request("d", toks[:800] + tokens(200, 12)), 0) == 768


# ---- issue 11: defects found with held-out prompts ------------------------------------------------


@pytest.mark.parametrize("n", [129, 200, 255])
def test_prompt_shorter_than_a_chunk_loads_its_tail_entry(daemon, n):
    """A prompt of 129-255 tokens stored its tail entry but never loaded it: with no full chunk, the
    lookup returned before asking the daemon."""
    toks = tokens(n, 20 + n)
    first = planner(daemon)
    r = request("a", toks)
    assert first.num_new_matched_tokens(r, 0) == 0
    (save,) = first.build(step(new=[("a", [1, 2], 0)], scheduled={"a": n})).saves
    assert (save.first_chunk, save.last_tokens, len(save.hashes)) == (0, 128, 1)
    commit_entry(daemon, save.hashes[0], 128, 0)  # as the worker stores it
    p = planner(daemon)
    r = request("b", toks)
    assert p.num_new_matched_tokens(r, 0) == 128
    p.after_alloc(r, 128)
    (load,) = p.build(step(new=[("b", [5, 6], 128)], scheduled={"b": n - 128})).loads
    assert (load.start, load.end, load.hashes, load.last_tokens) == (0, 128, save.hashes, 128)


@pytest.mark.parametrize("block", [128, 64])
def test_saved_entries_carry_the_aliases_a_strict_prefix_prompt_looks_up(daemon, block):
    """A prompt that is a strict prefix of a stored longer one loaded nothing past its last full chunk
    (1,024 of 1,152 reusable tokens): nothing was stored under the key of its tail. Saved entries now
    carry their block-aligned prefix keys as aliases, and the short prompt's tail key is one of them."""
    toks = tokens(1300, 30)  # 5 chunks (1280) + 20 tokens: no tail entry
    p = planner(daemon, block_size=block)
    assert p.num_new_matched_tokens(request("long", toks), 0) == 0
    (save,) = p.build(step(new=[("long", list(range(1, 12)), 0)], scheduled={"long": 1300})).saves
    fp = p.session.handle().fingerprint
    assert save.aliases == tuple(tuple(a) for a in prefix_aliases(
        toks, save.hashes, chunk_tokens=C, block_tokens=block, namespace="plan", fingerprint=fp))
    assert [len(a) for a in save.aliases] == [C // block - 1] * 5  # block 128: 1 per chunk; 64: 3
    # The strict prefix of 1,200 tokens: 4 chunks and a tail of [1024, 1152) = chunk 4's first 128 tokens.
    short = planner(daemon, block_size=block)
    short.num_new_matched_tokens(request("short", toks[:1200]), 0)
    t = short.requests["short"]
    assert t.hashes == list(save.hashes[:4]) and t.tail_tokens == (1199 - 1024) // block * block
    assert (t.tail, t.tail_tokens) in save.aliases[4]


def test_tail_entries_carry_aliases_too(daemon):
    """With blocks smaller than the tail, a strict prefix ending inside the tail finds it as well."""
    toks = tokens(1000, 31)  # 3 chunks + a tail of [768, 960) at block 64
    p = planner(daemon, block_size=64)
    p.num_new_matched_tokens(request("long", toks), 0)
    (save,) = p.build(step(new=[("long", list(range(1, 17)), 0)], scheduled={"long": 1000})).saves
    assert save.last_tokens == 192 and [k for _, k in save.aliases[-1]] == [64, 128]
    short = planner(daemon, block_size=64)
    short.num_new_matched_tokens(request("short", toks[:900]), 0)
    t = short.requests["short"]
    assert (t.tail, t.tail_tokens) == save.aliases[-1][1]


def test_prompt_covered_by_vllms_own_cache_is_not_sent_to_the_daemon_again(daemon):
    """When vLLM's own prefix cache covered a prompt, every entry was sent to the daemon again (and
    answered ``exists``): no lookup was made, so nothing was known to be stored."""
    toks = tokens(1000, 40)
    first = planner(daemon)
    first.num_new_matched_tokens(request("a", toks), 0)
    (save,) = first.build(step(new=[("a", list(range(1, 9)), 0)], scheduled={"a": 1000})).saves
    for i, key in enumerate(save.hashes):  # stored, as the worker would
        commit_entry(daemon, key, 128 if i == 3 else C, i * C)
    p = planner(daemon)
    assert p.num_new_matched_tokens(request("b", toks), 896) == 0  # vLLM's own hit covers everything
    assert p.build(step(new=[("b", list(range(1, 9)), 896)], scheduled={"b": 104})).saves == ()
    # Not stored in the daemon (another namespace): still saved from vLLM's blocks.
    q = planner(daemon, namespace="plan-empty")
    assert q.num_new_matched_tokens(request("c", toks), 896) == 0
    (save,) = q.build(step(new=[("c", list(range(1, 9)), 896)], scheduled={"c": 104})).saves
    assert (save.first_chunk, len(save.hashes), save.last_tokens) == (0, 4, 128)


def test_lookup_tells_the_daemon_how_many_tokens_can_be_loaded(daemon):
    """``kvd_hit_tokens_total`` counted 256 where 128 were loaded: the daemon was not told that a
    256-token prompt can load at most that many tokens (255 now: the last token is always computed)."""
    toks = tokens(256, 50)
    store(daemon, toks)
    with RecordingClient(daemon.socket, timeout_s=1.0) as client:
        p = planner(daemon, client=client)
        assert p.num_new_matched_tokens(request("a", toks), 0) == 255
        assert client.last(P.LookupRequest).max_tokens == 255


# ---- chunks on SSD: the request waits unscheduled while the daemon promotes them ---------------------


def to_ssd(d: DaemonProc, namespace: str) -> None:
    """Write the namespace's entries to SSD and drop them from the arena (``kvctl flush``, ``evict``)."""
    with d.client() as c:
        c.flush(P.FlushRequest(namespace=namespace))
        c.evict(P.EvictRequest(tier="host", namespace=namespace))


class NoPrefetchClient(RecordingClient):
    """A real client whose lookups never ask the daemon to promote: a promotion that never comes."""

    def lookup_compact(self, req: P.LookupRequest):
        self.asked = [*getattr(self, "asked", []), req]  # as the planner asked (answered locally or not)
        return super().lookup_compact(req.model_copy(update={"prefetch": False}))


def test_chunks_on_ssd_wait_unscheduled_until_the_daemon_has_promoted_them(daemon):
    toks = tokens(1000, 60)
    store(daemon, toks[:768], namespace="ssd-wait")
    to_ssd(daemon, "ssd-wait")
    p = planner(daemon, namespace="ssd-wait")
    # vLLM skips the request this step (None: ask again later) and runs the rest of the batch
    assert p.num_new_matched_tokens(request("a", toks), 0) is None
    assert p.session.counters["promote_waits"] == 1
    deadline = time.monotonic() + 10
    while (n := p.num_new_matched_tokens(request("a", toks), 0)) is None:
        assert time.monotonic() < deadline, "the promotion never arrived"
        time.sleep(0.005)
    assert n == 768
    assert p.hit_sources(request("a", toks), 768) == {"host": 768}  # loaded from the arena: no wait in the step
    assert p.session.counters["promote_wait_s"] > 0 and not p.session.counters["promote_wait_timeouts"]
    assert p.num_new_matched_tokens(request("a", toks), 0) == 768  # offered again: no new wait


def test_without_waiting_unscheduled_ssd_chunks_are_offered_at_once(daemon):
    toks = tokens(1000, 61)
    store(daemon, toks[:768], namespace="ssd-now")
    to_ssd(daemon, "ssd-now")
    p = planner(daemon, namespace="ssd-now", wait_unscheduled=False)
    assert p.num_new_matched_tokens(request("a", toks), 0) == 768  # the lease waits for them in the step
    assert p.hit_sources(request("a", toks), 768) == {"disk": 768}
    assert not p.session.counters["promote_waits"]


def test_a_promotion_that_does_not_arrive_in_load_wait_s_offers_the_chunks_in_the_arena(daemon):
    toks = tokens(1000, 62)
    ns = "ssd-late"
    store(daemon, toks[:768], namespace=ns)
    to_ssd(daemon, ns)
    with daemon.client() as c:  # bring chunk 0 back alone: chunks 1 and 2 stay on SSD
        h = prefix.register(c, SPEC, namespace=ns)
        with prefix.load_prefix(h, toks[:256]) as loaded:
            assert loaded.num_tokens == 256
    clock = [0.0]
    with NoPrefetchClient(daemon.socket, timeout_s=1.0) as client:
        p = planner(daemon, namespace=ns, client=client, clock=lambda: clock[0], load_wait_s=0.5)
        assert p.num_new_matched_tokens(request("a", toks), 0) is None
        clock[0] += 0.3
        assert p.num_new_matched_tokens(request("a", toks), 0) is None  # looked again: still on SSD
        assert (client.asked[-1].max_tokens, client.asked[-1].prefetch) == (0, True)  # no hits counted twice
        clock[0] += 0.3  # past load_wait_s: vLLM computes what did not arrive
        assert p.num_new_matched_tokens(request("a", toks), 0) == 256
        assert p.hit_sources(request("a", toks), 256) == {"host": 256}
        assert p.session.counters["promote_wait_timeouts"] == 1
        assert p.session.counters["promote_wait_s"] == pytest.approx(0.6)


def test_a_wait_ends_when_any_lookup_finds_the_chunks_in_the_arena(daemon):
    """With ``lookup_ttl_s`` 0 every call looks up afresh: a lookup that finds everything in the arena
    ends the wait (and counts it), so a later wait of the same request starts its own clock."""
    toks = tokens(1000, 63)
    ns = "ssd-again"
    store(daemon, toks[:768], namespace=ns)
    to_ssd(daemon, ns)
    clock = [0.0]
    p = planner(daemon, namespace=ns, clock=lambda: clock[0], lookup_ttl_s=0.0, load_wait_s=0.5)
    assert p.num_new_matched_tokens(request("a", toks), 0) is None
    with daemon.client() as c:  # the promotion the lookup asked for, waited for by a lease
        with prefix.load_prefix(prefix.register(c, SPEC, namespace=ns), toks[:768]) as loaded:
            assert loaded.num_tokens == 768
    clock[0] += 0.4
    assert p.num_new_matched_tokens(request("a", toks), 0) == 768
    assert p.session.counters["promote_wait_s"] == pytest.approx(0.4)
    to_ssd(daemon, ns)
    clock[0] += 0.4  # 0.8 s after the first wait began: a new wait, not a time-out
    assert p.num_new_matched_tokens(request("a", toks), 0) is None
    assert p.session.counters["promote_waits"] == 2 and not p.session.counters["promote_wait_timeouts"]


def test_a_wait_on_a_cached_answer_without_prefetch_asks_for_the_promotion(daemon):
    """The cached answer may come from a lookup that did not ask to promote (vLLM's own cache covered
    the prompt at the time): the wait's polls ask, so the chunks do come up."""
    toks = tokens(1000, 64)
    ns = "ssd-cached"
    store(daemon, toks[:768], namespace=ns)
    to_ssd(daemon, ns)
    clock = [0.0]
    p = planner(daemon, namespace=ns, clock=lambda: clock[0])
    assert p.num_new_matched_tokens(request("a", toks), 999) == 0  # covered: looked up without prefetch
    for _ in range(40):  # within lookup_ttl_s (1 s) of that answer, and of load_wait_s
        if (n := p.num_new_matched_tokens(request("a", toks), 0)) is not None:
            break
        clock[0] += 0.02
        time.sleep(0.05)
    assert n == 768 and not p.session.counters["promote_wait_timeouts"]


def test_under_tensor_parallelism_a_chunk_is_a_hit_when_every_rank_holds_it(daemon):
    """Each rank stores its heads as a model of its own ("[tp<r>/<n>]"), under keys seeded by rank 0's
    model; the scheduler holds rank 0's session and asks the other ranks' (``shards``) too."""
    from dataclasses import replace

    ns = "tp"
    spec0 = replace(SPEC, model_id="toy-vllm [tp0/2]", num_kv_heads=1)
    spec1 = replace(spec0, model_id="toy-vllm [tp1/2]")
    settings = settings_for(daemon, namespace=ns)
    s0 = open_session(settings, spec0, None, block_size=B, role="scheduler")
    s1 = open_session(settings, spec1, None, block_size=B, role="scheduler (tp rank 1)", client=s0.client)
    p = SchedulerPlanner(s0, settings, block_size=B, can_load=True, can_save=True, shards=[s1])
    toks = tokens(1000, 70)
    with daemon.client() as c:
        h0 = prefix.register(c, spec0, namespace=ns)
        prefix.store_prefix(h0, toks[:768], kv_for(spec0, 768, 1))
        assert p.num_new_matched_tokens(request("a", toks), 0) == 0  # rank 1 holds nothing
        h1 = prefix.register(c, spec1, namespace=ns)
        assert h1.fingerprint != h0.fingerprint
        h1.hashes = h0.hashes  # its worker stores under the keys the scheduler plans: seeded by rank 0
        prefix.store_prefix(h1, toks[:512], kv_for(spec1, 512, 2))
    assert p.num_new_matched_tokens(request("b", toks), 0) == 512  # chunk 2 is rank 0's only
    assert p.hit_sources(request("b", toks), 512) == {"host": 512}
    plan = p.build(step(new=[("b", list(range(1, 10)), 512)], scheduled={"b": 487}))
    assert [(s.first_chunk, s.hashes) for s in plan.saves] == [(2, (h0.hashes(toks)[2], p.requests["b"].tail))]


def test_hit_tokens_count_what_vllm_took_once(daemon):
    """vLLM asks again each step a request it could not allocate blocks for (and ignores a hit no
    longer than its own partial block): ``lookup_hit_tokens`` counts what it took, once, as
    ``loaded_tokens`` and ``load_failed_tokens`` account for it."""
    toks = tokens(1000, 31)
    store(daemon, toks[:768])
    p = planner(daemon)
    r = request("r", toks)
    for _ in range(3):  # allocate_slots found no room: asked again the next steps
        assert p.num_new_matched_tokens(r, 0) == 768
    p.after_alloc(r, 768)
    assert p.session.counters["lookup_hit_tokens"] == 768
    q = request("q", toks)
    assert p.num_new_matched_tokens(q, 0) == 768
    p.after_alloc(q, 0)  # not taken
    assert p.session.counters["lookup_hit_tokens"] == 768


def test_a_request_aborted_while_waiting_unscheduled_counts_its_wait(daemon):
    toks = tokens(1000, 64)
    store(daemon, toks[:768], namespace="ssd-abort")
    to_ssd(daemon, "ssd-abort")
    clock = [100.0]
    with NoPrefetchClient(daemon.socket, timeout_s=1.0) as client:  # a promotion that never comes
        p = planner(daemon, namespace="ssd-abort", client=client, clock=lambda: clock[0])
        assert p.num_new_matched_tokens(request("a", toks), 0) is None
        clock[0] += 0.5
        assert p.num_new_matched_tokens(request("a", toks), 0) is None
        clock[0] += 0.25
        p.finished("a")  # the client gave up: vLLM aborts it from the waiting queue
        assert p.session.counters["promote_waits"] == 1
        assert p.session.counters["promote_wait_s"] == pytest.approx(0.75)
