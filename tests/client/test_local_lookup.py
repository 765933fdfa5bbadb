"""Lookups answered from the shared index (``kvd.client.local_lookup``) against the real daemon (served
from a thread): each local answer must equal the daemon's own answer to the same lookup, in every
state an entry can be in; anything the index cannot answer goes to the daemon; what local answers
found reaches the daemon's counters and admission; a stopped daemon's index is never used."""

from __future__ import annotations

import json
import time

import pytest
import torch

from kvd.client import prefix as kvio
from kvd.client.client import KvdClient
from kvd.core import protocol as P
from kvd.core.errors import DaemonUnavailable, InvalidRequest, KvdError, NotFound
from kvd.core.keys import ModelSpec
from kvd.core.protocol_lookup import LookupReport, ReportItem
from tests.daemon_thread import ThreadDaemon, settings_for

SPEC = ModelSpec("local-lookup", num_layers=1, num_kv_heads=2, head_dim=16, kv_dtype="bfloat16")
TOKENS = list(range(6 * 256))
UNKNOWN = list(range(9000, 9512))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A daemon with an SSD tier (every entry admitted at once) holding one 6-chunk prefix; a client
    answering from the index and one that always asks the daemon (the reference)."""
    root = tmp_path_factory.mktemp("local")
    d = ThreadDaemon(settings_for(root, ssd={"admit_after": 0})).start()
    c, ref = KvdClient(d.socket, register_cuda=False), KvdClient(d.socket, register_cuda=False, local_lookups=False)
    h = kvio.register(c, SPEC)
    kvio.register(ref, SPEC)
    kv = torch.randn(1, 2, 2, len(TOKENS), 16).to(torch.bfloat16)
    assert kvio.store_prefix(h, TOKENS, kv).stored == 6
    yield d, c, ref, h
    c.close()
    ref.close()
    d.stop()


def lookup(h, tokens, **kw) -> P.LookupRequest:
    return P.LookupRequest(fingerprint=h.fingerprint, namespace=h.namespace, prefix_hashes=h.hashes(tokens),
                           **({"prefetch": False} | kw))


def vouch(c: KvdClient, h) -> None:
    """One lookup of the model in its namespace, through the daemon unless one was made already."""
    c.lookup_compact(lookup(h, TOKENS[:256]))


def both(c: KvdClient, ref: KvdClient, req: P.LookupRequest, *, local: bool = True):
    """The client's answer and the daemon's; asserts whether the client answered it itself."""
    before = c.local.answered
    mine = c.lookup_compact(req)
    assert c.local.answered == before + local, "answered locally" if local else "asked the daemon"
    theirs = ref.lookup_compact(req)
    assert (mine.chunk_tokens, mine.num_prefix_hits, list(mine.prefix), list(mine.chunks)) == (
        theirs.chunk_tokens, theirs.num_prefix_hits, list(theirs.prefix), list(theirs.chunks))
    assert mine.leading_tiers() == theirs.leading_tiers()
    return mine


def test_the_first_lookup_asks_the_daemon_the_next_are_local_and_equal(served):
    d, c, ref, h = served
    both(c, ref, lookup(h, TOKENS), local=False)  # vouches for this namespace and model
    a = both(c, ref, lookup(h, TOKENS))
    assert a.num_prefix_hits == 6 and a.leading_tiers() == ["host"] * 6
    both(c, ref, lookup(h, TOKENS + UNKNOWN))
    assert both(c, ref, lookup(h, UNKNOWN)).num_prefix_hits == 0
    assert both(c, ref, lookup(h, TOKENS[:512], max_tokens=300)).num_prefix_hits == 2


def test_a_change_in_the_daemon_shows_in_the_next_local_answer(served):
    d, c, ref, h = served
    vouch(c, h)
    gone = h.hashes(TOKENS)[3]
    assert c.delete(P.EntriesRequest(namespace=h.namespace, fingerprint=h.fingerprint, hashes=[gone])).count == 1
    a = both(c, ref, lookup(h, TOKENS))
    assert a.num_prefix_hits == 3 and [r.index for r in a.prefix] == [0, 1, 2, 4, 5]
    kv = torch.randn(1, 2, 2, len(TOKENS), 16).to(torch.bfloat16)
    kvio.store_prefix(h, TOKENS, kv)  # stored again
    assert both(c, ref, lookup(h, TOKENS)).num_prefix_hits == 6


def test_entries_on_ssd_are_answered_locally_unless_the_lookup_would_prefetch(served):
    d, c, ref, h = served
    toks = list(range(20000, 20000 + 3 * 256))
    kvio.store_prefix(h, toks, torch.randn(1, 2, 2, len(toks), 16).to(torch.bfloat16))
    assert c.evict(P.EvictRequest(tier="host", namespace=h.namespace)).count > 0
    vouch(c, h)
    a = both(c, ref, lookup(h, toks))
    assert a.leading_tiers() == ["ssd"] * 3
    # A lookup that asks for a prefetch needs the daemon to start it: never answered locally
    before = c.local.answered
    c.lookup_compact(lookup(h, toks, prefetch=True))
    assert c.local.answered == before


@pytest.mark.parametrize("kw", [{"accept_lossy": True}, {"computed_under": "hm-0123456789abcdef"},
                                {"reader": "head_aware", "head_map": "hm-0123456789abcdef"}],
                         ids=["lossy", "other_attention", "head_aware"])
def test_lookups_the_index_does_not_describe_ask_the_daemon(served, kw):
    d, c, ref, h = served
    vouch(c, h)
    before = c.local.answered
    for _ in range(2):
        try:
            c.lookup_compact(lookup(h, TOKENS, **kw))
        except (KvdError, ValueError):  # the daemon refused it, or the compact form cannot carry it
            pass
    assert c.local.answered == before


def test_chunk_lookups_ask_the_daemon(served):
    d, c, ref, h = served
    vouch(c, h)
    req = P.LookupRequest(fingerprint=h.fingerprint, namespace=h.namespace, chunk_hashes=["ab" * 16], prefetch=False)
    before = c.local.answered
    c.lookup_compact(req)
    c.lookup_compact(req)
    assert c.local.answered == before


def counters(c: KvdClient) -> dict:
    return {k: v for k, v in c.stats().counters.items()
            if k.startswith(("kvd_lookup_tokens_total", "kvd_hit_tokens_total", "kvd_local_lookups_total"))}


def test_the_report_counts_local_lookups_as_the_daemon_counts_its_own(served):
    d, c, ref, h = served
    req = lookup(h, TOKENS + UNKNOWN, max_tokens=5 * 256 + 10)
    c.lookup_compact(req)
    c.local.flush()
    seen = {e.hash: e.seen for e in d.store.index if e.namespace == h.namespace}
    c0 = counters(c)
    for _ in range(3):
        ref.lookup_compact(req)
    c1 = counters(c)
    for _ in range(3):
        assert c.lookup_compact(req).num_prefix_hits == 6
    c.local.flush()
    c2 = counters(c)
    by_daemon = {k: c1[k] - c0.get(k, 0) for k in c1}
    by_local = {k: c2[k] - c1.get(k, 0) for k in c2}
    assert by_local.pop("kvd_local_lookups_total") == 3
    by_daemon.pop("kvd_local_lookups_total")
    assert by_local == by_daemon
    assert sum(v for k, v in by_local.items() if k.startswith("kvd_hit_tokens_total")) == 3 * (5 * 256 + 10)
    after = {e.hash: e.seen for e in d.store.index if e.namespace == h.namespace}
    for x in h.hashes(TOKENS):
        assert after[x] == seen[x] + 6, "three sightings from the daemon's lookups, three reported"


def test_a_bad_report_is_refused_naming_what_is_wrong(served):
    d, c, ref, h = served

    def report(**kw):
        item = {"namespace": h.namespace, "fingerprint": h.fingerprint, "lookups": 1, "asked_tokens": 256,
                "hit_tokens": {}, "seen": []} | kw
        return ref._send_report(LookupReport(items=[ReportItem.model_validate(item)]))

    with pytest.raises(InvalidRequest, match="gpu"):
        report(hit_tokens={"gpu": 256})  # this daemon has no GPU tier
    with pytest.raises(NotFound):
        report(fingerprint="nope")
    with pytest.raises(InvalidRequest, match="fingerprint"):  # fields missing
        ref._exchange("POST", "/v1/lookup/report", None, b'{"items": [{"namespace": "default"}]}', 5.0)
    item = {"namespace": "default", "fingerprint": h.fingerprint, "lookups": 1, "asked_tokens": 0,
            "hit_tokens": {}, "seen": [["not-a-hash", 1]]}
    body = json.dumps({"items": [item]}).encode()
    with pytest.raises(InvalidRequest, match="seen"):
        ref._exchange("POST", "/v1/lookup/report", None, body, 5.0)


def test_a_stopped_daemons_index_is_never_used_and_a_new_daemons_is(tmp_path):
    """Stopped: its index says CLOSED, so the client asks (and learns the daemon is gone) instead of
    answering from the last table; a new daemon at the same paths is vouched for anew, then local."""
    settings = settings_for(tmp_path, ssd={"enabled": False})
    d = ThreadDaemon(settings).start()
    c = KvdClient(d.socket, register_cuda=False)
    h = kvio.register(c, SPEC)
    kvio.store_prefix(h, TOKENS[:512], torch.randn(1, 2, 2, 512, 16).to(torch.bfloat16))
    req = lookup(h, TOKENS[:512])
    assert [c.lookup_compact(req).num_prefix_hits for _ in range(2)] == [2, 2] and c.local.answered == 1
    d.stop()
    with pytest.raises(DaemonUnavailable):
        c.lookup_compact(req)
    assert c.local.answered == 1
    d = ThreadDaemon(settings).start()
    try:
        assert c.lookup_compact(req).num_prefix_hits == 0  # an empty new daemon, asked
        kvio.store_prefix(h, TOKENS[:512], torch.randn(1, 2, 2, 512, 16).to(torch.bfloat16))
        assert [c.lookup_compact(req).num_prefix_hits for _ in range(2)] == [2, 2]
        assert c.local.answered > 1, "the new daemon's index answers once it is mapped"
    finally:
        c.close()
        d.stop()


def test_the_eligibility_check_knows_every_field_of_a_lookup():
    """The fast check names LookupRequest's fields; a field added later makes the module use the
    general one (every field but the free ones at its default) until the fast one learns it."""
    from kvd.client import local_lookup as LL

    assert LL._eligible is LL._eligible_known
    base = P.LookupRequest(fingerprint="f", prefix_hashes=["ab" * 16], prefetch=False, max_tokens=3)
    cases = [base, base.model_copy(update={"accept_lossy": True}), base.model_copy(update={"prefix_hashes": []}),
             base.model_copy(update={"computed_under": "hm-0123456789abcdef"}),
             base.model_copy(update={"chunk_hashes": ["cd" * 16]}), base.model_copy(update={"token_ids": [1]}),
             base.model_copy(update={"reader": "head_aware", "head_map": "hm-0123456789abcdef"})]
    assert [LL._eligible_known(r) for r in cases] == [LL._eligible_any(r) for r in cases] == [True] + [False] * 6


def test_a_killed_daemons_table_is_never_answered_from(tmp_path):
    """SIGKILL leaves the index file as it was, saying OPEN; the daemon's flock on it went with the
    process, so the next lookup after the client's liveness check has lapsed (``ALIVE_S``, 1 ms) asks
    the daemon (and fails as a dead daemon's lookup does)."""
    from kvd.client import local_lookup as LL
    from tests.daemon_proc import DaemonProc

    d = DaemonProc(tmp_path).start()
    try:
        c = KvdClient(d.socket, register_cuda=False)
        h = kvio.register(c, SPEC)
        kvio.store_prefix(h, TOKENS[:512], torch.randn(1, 2, 2, 512, 16).to(torch.bfloat16))
        req = lookup(h, TOKENS[:512])
        assert [c.lookup_compact(req).num_prefix_hits for _ in range(2)] == [2, 2] and c.local.answered == 1
    finally:
        d.kill()
    time.sleep(LL.ALIVE_S)
    with pytest.raises(DaemonUnavailable):
        c.lookup_compact(req)
    assert c.local.answered == 1
    c.close()


def test_a_lost_mapping_comes_back_through_the_next_daemon_answer(served, monkeypatch):
    """A failed report (the daemon unreachable for a moment) unmaps the index; the next lookup the
    daemon answers maps it again (at most once per REOPEN_S), and later ones are local again."""
    from kvd.client import local_lookup as LL

    d, c, ref, h = served
    vouch(c, h)
    req = lookup(h, TOKENS)
    c.local.detach()  # what a failed report does
    before = c.local.answered
    monkeypatch.setattr(LL, "REOPEN_S", 0.0)
    c.local._retry_at = 0.0
    c.lookup_compact(req)  # asked of the daemon, which re-maps the index
    assert c.local.answered == before
    both(c, ref, req)


def test_without_the_index_every_lookup_asks_the_daemon(tmp_path):
    """host.lookup_index = false: no file beside the arena, no index_path, nothing answered locally."""
    d = ThreadDaemon(settings_for(tmp_path, ssd={"enabled": False}, host={"lookup_index": False})).start()
    try:
        with KvdClient(d.socket, register_cuda=False) as c:
            h = kvio.register(c, SPEC)
            assert c.arena_info.index_path is None
            assert not list(tmp_path.glob("*.index"))
            kvio.store_prefix(h, TOKENS[:512], torch.randn(1, 2, 2, 512, 16).to(torch.bfloat16))
            assert [c.lookup_compact(lookup(h, TOKENS[:512])).num_prefix_hits for _ in range(3)] == [2, 2, 2]
            assert c.local.answered == 0
    finally:
        d.stop()


def fresh(tmp_path):
    d = ThreadDaemon(settings_for(tmp_path, ssd={"enabled": False})).start()
    c = KvdClient(d.socket, register_cuda=False)
    return d, c, kvio.register(c, SPEC)


def test_a_failing_index_is_closed_and_never_fails_a_store(tmp_path, monkeypatch):
    """A write to the index that fails (no room for a bigger file, say) closes that index: the commit
    that caused it succeeds, clients ask the daemon from then on, and their answers stay right."""
    from kvd.store.published import IndexWriter

    d, c, h = fresh(tmp_path)
    try:
        req = lookup(h, TOKENS[:512])
        c.lookup_compact(req)  # vouched, before anything is stored

        def no_room(*a, **kw):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(IndexWriter, "set", no_room)
        assert kvio.store_prefix(h, TOKENS[:512], torch.randn(1, 2, 2, 512, 16).to(torch.bfloat16)).stored == 2
        before = c.local.answered
        assert [c.lookup_compact(req).num_prefix_hits for _ in range(3)] == [2, 2, 2]
        assert c.local.answered == before, "the closed index answered nothing"
        assert not list(tmp_path.glob("*.index"))
    finally:
        c.close()
        d.stop()


def test_class_sets_past_the_meta_room_are_asked_of_the_daemon(tmp_path, monkeypatch):
    from kvd.core import index_file as F

    monkeypatch.setattr(F, "META_MAX", 70)  # the tier names fit (62 bytes), no class set beside them
    d, c, h = fresh(tmp_path)
    try:
        assert c.arena_info.index_path is not None and list(tmp_path.glob("*.index")), "the index is open"
        req = lookup(h, TOKENS[:512])
        kvio.store_prefix(h, TOKENS[:512], torch.randn(1, 2, 2, 512, 16).to(torch.bfloat16))
        assert [c.lookup_compact(req).num_prefix_hits for _ in range(3)] == [2, 2, 2]
        assert c.local.answered == 0, "rows that could not name their classes say: ask the daemon"
        assert list(tmp_path.glob("*.index")), "and the index stayed open"
    finally:
        c.close()
        d.stop()
