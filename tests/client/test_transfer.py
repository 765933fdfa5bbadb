"""Scenario tests of the one lease / reserve transaction (``kvd.client.transfer``) against a real daemon.

Each test is a script of calls, each with its expected state: reserve → copy → commit (or abort),
lease → verify → copy → release. KV goes through the daemon's real shared-memory arena; a
``RecordingClient`` (the real client) keeps every request sent, and can mark leased extents lossy as a
daemon holding only a lossy copy would.
"""

from __future__ import annotations

import time

import pytest
import torch

from kvd.client.handle import ModelHandle
from kvd.client.prefix import register
from kvd.client.transfer import open_lease, reserve
from kvd.core import protocol as P
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec, attention_tag
from tests.client.recording import RecordingClient
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("toy-transfer", num_layers=3, num_kv_heads=2, head_dim=16, kv_dtype="bfloat16")
HM = HeadMap.from_classes("toy-transfer", [[True, False]] * 3, sink=4, window=64)  # head 0 global, 1 local
C = 256


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProc(tmp_path_factory.mktemp("kvd")).start()
    yield d
    d.kill()


@pytest.fixture
def handle(daemon, request):
    c = RecordingClient(daemon.socket, register_cuda=False)
    h = register(c, SPEC, HM, namespace=request.node.name[:100].replace("[", "-").replace("]", ""))
    yield h
    c.close()


def kv_for(num_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, num_tokens, SPEC.head_dim, generator=g).bfloat16()


def entries(h: ModelHandle, toks: list[int], **kw) -> list[P.ReserveEntry]:
    return [P.ReserveEntry(hash=x, num_tokens=C, start_token=i * C, end_token=len(toks), **kw)
            for i, x in enumerate(h.hashes(toks))]


def store(h: ModelHandle, toks: list[int], kv: torch.Tensor) -> list[str]:
    with reserve(h, entries(h, toks)) as res:
        for i in range(len(res.hashes)):
            res.entry(i).write_from(kv, i * C)
    return res.hashes


def stats(d: DaemonProc) -> P.StatsResponse:
    with d.client() as c:
        return c.stats()


def test_reserve_copy_commit_then_lease_verify_copy_release(daemon, handle):
    toks, kv = list(range(3 * C)), kv_for(3 * C, 1)
    # reserve: three new entries, each mapped as one [segments, 2, T, D] view per head class
    res = reserve(handle, entries(handle, toks))
    assert res.states == ["reserved"] * 3 and not res.closed
    view = res.entry(0)
    assert [(x.plan.head_class, tuple(x.view.shape)) for x in view.extents] == [
        ("global", (3, 2, C, 16)), ("local", (3, 2, C, 16))]
    # copy in, commit: visible to every client, reported copy time as given
    for i in range(3):
        res.entry(i).write_from(kv, i * C)
    assert res.commit(transfer_s=0.25) == res.hashes and res.closed and res.entry(0) is None
    assert res.commit() == [] and stats(daemon).reservations_open == 0  # a second close is a no-op
    # reserving them again: answered exists, nothing to copy or commit
    again = reserve(handle, entries(handle, toks))
    assert again.states == ["exists"] * 3 and again.closed and again.commit() == []
    # lease: every entry checked (checksums) and mapped; copy out; release ends the lease
    lease = open_lease(handle, res.hashes, min_tokens=[C] * 3)
    assert lease.states == ["ok"] * 3 and lease.num_leading == 3 and lease.num_corrupt == 0
    out = torch.zeros_like(kv)
    for i in range(3):
        lease.entry(i).read_into(out, i * C)
    assert torch.equal(out, kv)
    assert stats(daemon).leases_held == 1
    assert lease.release() > 0 and lease.closed and lease.entry(0) is None
    assert lease.release() == 0.0 and stats(daemon).leases_held == 0  # idempotent


def test_reader_may_copy_only_the_leading_tokens_of_a_longer_entry(daemon, handle):
    """An entry leased under a key that names fewer tokens (a prefix alias) holds more: the reader
    needs n tokens, gets a view of all of them and copies the first n; an entry with fewer is refused."""
    toks, kv = list(range(2 * C)), kv_for(2 * C, 2)
    hashes = store(handle, toks, kv)
    with open_lease(handle, hashes, min_tokens=[C, 128]) as lease:
        assert lease.states == ["ok", "ok"] and lease.entry(1).num_tokens == C
        out = torch.zeros(3, 2, 2, 128, 16, dtype=torch.bfloat16)
        lease.entry(1).read_into(out, 0, 128)
        assert torch.equal(out, kv[:, :, :, C : C + 128])
    with open_lease(handle, hashes, min_tokens=[C, C + 128]) as lease:
        assert lease.states == ["ok", "short"] and lease.num_leading == 1


def test_a_corrupted_extent_is_never_copied(daemon, handle):
    toks = list(range(3 * C))
    hashes = store(handle, toks, kv_for(3 * C, 3))
    with open_lease(handle, hashes) as lease:  # flip bytes of entry 1's local extent, as a stray write would
        x = [e for e in lease.entry(1).extents if e.plan.head_class == "local"][0].view
        x.view(torch.uint8).view(-1)[:8] ^= 0xFF
    # A prefix reader: entry 1 is unusable, and the run ends there, as at a miss (entry 2 is not even checked).
    lease = open_lease(handle, hashes)
    assert lease.states == ["ok", "bad_checksum", "skipped"] and lease.num_leading == 1
    assert lease.num_corrupt == 1 and lease.entry(1) is None and lease.entry(2) is None
    lease.release()
    # A chunk reader takes every usable entry, in any order: 0 and 2.
    with open_lease(handle, hashes, leading=False) as lease:
        assert [v.hash for v in lease.usable()] == [hashes[0], hashes[2]] and lease.num_corrupt == 1
    # Hashed per entry, right before each copy: nothing is handed out unverified, the corrupt entry never.
    with open_lease(handle, hashes, verify="per_entry") as lease:
        assert lease.states == ["ok", "ok", "ok"] and lease.num_corrupt == 0  # nothing hashed yet
        assert [lease.entry(i) for i in range(3)] == [None, None, None] and list(lease.usable()) == []
        assert lease.verified(0) and lease.entry(0) is not None
        assert not lease.verified(1) and lease.entry(1) is None and lease.states[1] == "bad_checksum"
        assert not lease.verified(1) and lease.num_corrupt == 1  # asked again: still refused, counted once
        assert lease.verified(2) and lease.entry(2) is not None
        assert [v.hash for v in lease.usable()] == [hashes[0], hashes[2]]


def test_a_writer_hashes_what_it_wrote_and_the_daemon_keeps_those_checksums(daemon, handle):
    """``written(i)`` hashes entry i's extents as the writer left them; the commit carries the digests
    and readers verify against them. Bytes changed after ``written`` (a writer's bug) make the entry
    fail its checksum for every reader: a miss, never other bytes served as these."""
    toks, kv = list(range(3 * C)), kv_for(3 * C, 7)
    res = reserve(handle, entries(handle, toks))
    for i in range(3):
        res.entry(i).write_from(kv, i * C)
        if i != 2:
            res.written(i)  # entry 2: left to the daemon
    res.entry(1).extents[0].view.view(torch.uint8).view(-1)[:8] ^= 0xFF  # after its digest was taken
    res.commit()
    sent = handle.client.last(P.CommitRequest).checksums
    assert sorted(sent) == sorted(res.hashes[:2]) and all(len(v) == 2 for v in sent.values())
    lease = open_lease(handle, res.hashes, leading=False)
    assert lease.states == ["ok", "bad_checksum", "ok"] and lease.num_corrupt == 1
    assert [x.checksum for x in lease._answers[0].extents] == sent[res.hashes[0]]
    out = torch.zeros_like(kv)
    for i in (0, 2):
        lease.entry(i).read_into(out, i * C)
    lease.release()
    assert torch.equal(out[:, :, :, :C], kv[:, :, :, :C]) and torch.equal(out[:, :, :, 2 * C :], kv[:, :, :, 2 * C :])
    with pytest.raises(ValueError, match="not reserved"):
        reserve(handle, entries(handle, toks)).written(0)  # exists: nothing to hash


def test_an_exception_while_copying_aborts_the_reservation(daemon, handle):
    toks = list(range(2 * C))
    with pytest.raises(RuntimeError, match="copy failed"):
        with reserve(handle, entries(handle, toks)) as res:
            res.entry(0).write_from(kv_for(2 * C, 4), 0)
            raise RuntimeError("copy failed")
    assert res.closed and stats(daemon).reservations_open == 0
    lookup = handle.client.lookup(P.LookupRequest(fingerprint=handle.fingerprint, namespace=handle.namespace,
                                                  prefix_hashes=res.hashes))
    assert lookup.prefix == []  # nothing became visible
    assert reserve(handle, entries(handle, toks)).states == ["reserved"] * 2  # the space is free again


def test_lossy_extents_are_refused_unless_accepted(daemon, handle):
    hashes = store(handle, list(range(2 * C)), kv_for(2 * C, 5))
    handle.client.lossy = True  # the daemon answers with extents whose bytes came from a lossy codec
    with open_lease(handle, hashes) as lease:
        assert lease.states == ["lossy", "skipped"] and lease.num_leading == 0
    assert handle.client.last(P.LeaseRequest).accept_lossy is False
    with open_lease(handle, hashes, accept_lossy=True) as lease:
        assert lease.states == ["ok", "ok"]
    assert handle.client.last(P.LeaseRequest).accept_lossy is True


def test_only_the_asked_head_classes_are_leased_and_checked(daemon, handle):
    hashes = store(handle, list(range(C)), kv_for(C, 6))
    with open_lease(handle, hashes, classes=["local"]) as lease:
        assert [x.plan.head_class for x in lease.entry(0).extents] == ["local"]


def test_attention_tag_and_aliases_reach_the_daemon(daemon, handle):
    """``computed_under`` (the handle's, or per call) goes with every reserve and lease, and a reserve
    entry's aliases go with it."""
    tag = attention_tag([[0, 4]], [[0, 64]])
    h = ModelHandle(handle.client, SPEC, HM, handle.fingerprint, C, handle.namespace, computed_under=tag)
    toks = list(range(C))
    key = h.hashes(toks)[0]
    alias = P.PrefixAlias(hash="ab" * 16, num_tokens=128)
    reserve(h, [P.ReserveEntry(hash=key, num_tokens=C, aliases=[alias])]).abort()
    sent = handle.client.last(P.ReserveRequest)
    assert sent.computed_under == tag and sent.entries[0].aliases == [alias]
    open_lease(h, [key]).release()
    assert handle.client.last(P.LeaseRequest).computed_under == tag
    open_lease(h, [key], computed_under="exact").release()
    assert handle.client.last(P.LeaseRequest).computed_under == "exact"


def test_keep_alive_holds_a_lease_and_a_reservation_past_the_ttl_and_reports_a_lapse(tmp_path):
    """A copy spread over a long step (a forward on a slow CPU) keeps its hold alive by renewing; a hold
    not renewed lapses, and ``keep_alive`` then closes it and raises, so its views cannot be copied."""
    from kvd.core.errors import NotFound

    ttl = 1.2
    d = DaemonProc(tmp_path, env_extra={"KVD_HOST__LEASE_TTL_S": str(ttl),
                                        "KVD_HOST__RESERVATION_TTL_S": str(ttl)}).start()
    c = RecordingClient(d.socket, register_cuda=False)
    try:
        h = register(c, SPEC, HM, namespace="keep-alive")
        toks, kv = list(range(2 * C)), kv_for(2 * C, 9)
        kept = open_lease(h, store(h, toks[:C], kv[..., :C, :]), min_tokens=[C])
        res = reserve(h, entries(h, toks)[1:])
        for _ in range(4):  # 2.4 s in all, twice the TTL
            time.sleep(ttl / 2)
            kept.keep_alive()
            res.keep_alive()
        out = torch.zeros_like(kv[..., :C, :])
        kept.entry(0).read_into(out, 0)
        assert torch.equal(out, kv[..., :C, :]) and stats(d).leases_held == 1
        res.entry(0).write_from(kv, C)
        assert res.commit() == res.hashes  # the reservation lived through the step
        assert sum(isinstance(r, P.RenewRequest) for r in c.sent) >= 6  # both holds, renewed when due
        kept.release()
        lapsed = open_lease(h, res.hashes, min_tokens=[C])
        time.sleep(ttl + 1.0)  # past the TTL and the daemon's next expiry pass
        with pytest.raises(NotFound, match="not held"):
            lapsed.keep_alive()
        assert lapsed.closed and lapsed.entry(0) is None and stats(d).leases_held == 0
        lapsed.release()  # closed: a no-op
    finally:
        c.close()
        d.kill()
