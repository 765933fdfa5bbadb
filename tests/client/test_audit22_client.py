"""Audit 22 of the client SDK (``kvd.client``), against a real daemon: a request cut off mid-exchange,
and copies between entries and KV of another dtype or shape."""

from __future__ import annotations

import pytest
import torch

from kvd.client.client import KvdClient
from kvd.client.http import UnixHttp
from kvd.client.prefix import register
from kvd.client.transfer import open_lease
from tests.client import test_transfer
from tests.client.test_transfer import HM, SPEC, C, kv_for, store

daemon, handle = test_transfer.daemon, test_transfer.handle  # the transfer tests' daemon and handle


def test_a_request_interrupted_before_its_answer_never_hands_that_answer_to_the_next_call(handle, monkeypatch):
    """A KeyboardInterrupt (or any exception) after a request was sent left the kept-alive connection
    carrying its answer, which the next call read as its own: a lease of other entries, or worse."""
    toks_a, toks_b = list(range(C)), list(range(5000, 5000 + C))
    kv_a, kv_b = kv_for(C, 1), kv_for(C, 2)
    store(handle, toks_a, kv_a)
    store(handle, toks_b, kv_b)

    def interrupted(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(UnixHttp, "_fill", interrupted)
        with pytest.raises(KeyboardInterrupt):
            open_lease(handle, handle.hashes(toks_a))  # sent; interrupted before its answer is read
    with open_lease(handle, handle.hashes(toks_b)) as lease:
        assert lease.hashes == handle.hashes(toks_b)
        out = torch.zeros_like(kv_b)
        lease.entry(0).read_into(out)
    assert torch.equal(out, kv_b)
    assert handle.client.health().status == "ok"


def test_copies_between_an_entry_and_kv_of_another_dtype_or_too_few_tokens_refuse(handle):
    """On the CPU, copies went through same-size integer views, so float16 KV read out of (or written into)
    a bfloat16 entry moved the raw bits: other numbers, silently. And a KV slice of one token broadcast
    into every token of the extent (numpy and torch copies broadcast): one token's KV stored T times."""
    toks, kv = list(range(20000, 20000 + C)), kv_for(C, 3)
    store(handle, toks, kv)
    with open_lease(handle, handle.hashes(toks)) as lease:
        out = torch.zeros(kv.shape, dtype=torch.float16)
        with pytest.raises(ValueError, match="dtype"):
            lease.entry(0).read_into(out)
        assert not out.any()
    toks2 = list(range(30000, 30000 + C))
    from kvd.client.transfer import reserve
    from tests.client.test_transfer import entries

    with pytest.raises(ValueError, match="dtype"), reserve(handle, entries(handle, toks2)) as res:
        res.entry(0).write_from(kv.half())
    with pytest.raises(ValueError, match="shape"), reserve(handle, entries(handle, toks2)) as res:
        res.entry(0).write_from(kv[:, :, :, :1])  # one token for an entry of C
    assert handle.client.stats().reservations_open == 0
    with open_lease(handle, handle.hashes(toks2)) as lease:
        assert lease.states == ["missing"]  # aborted: nothing of the refused copies was committed


def test_a_reserved_extent_smaller_than_this_clients_layout_is_never_written(daemon, request):
    """A reservation's extents were mapped at their offset with this client's plan's size, whatever size
    the daemon answered: a slot run answered smaller had the writer copy past its end (over whatever
    follows it in the arena), and ``written`` hashed other bytes than the view holds. Leases refuse such an
    extent (``incomplete``); a reservation now refuses it too, and is given back."""
    from kvd.client.transfer import reserve
    from kvd.core import protocol as P
    from kvd.core.errors import KvdError
    from tests.client.test_transfer import entries

    class Shrinking(KvdClient):
        def reserve(self, req: P.ReserveRequest) -> P.ReserveResponse:
            resp = super().reserve(req)
            x = resp.entries[0].extents[0]
            resp.entries[0].extents[0] = x.model_copy(update={"nbytes": x.nbytes // 2})
            return resp

    c = Shrinking(daemon.socket, register_cuda=False)
    try:
        h = register(c, SPEC, HM, namespace=request.node.name[:100])
        with pytest.raises(KvdError, match="bytes"):
            reserve(h, entries(h, list(range(C))))
        assert c.stats().reservations_open == 0
    finally:
        c.close()


def test_a_lease_without_wait_s_is_given_the_daemons_default_wait_before_timing_out():
    """A lease without wait_s timed out on the client after timeout_s (5 s) while the daemon may wait
    ssd.prefetch_deadline_s (5 s) for promotions first: a lease of entries coming up from SSD raised
    DaemonUnavailable (tripping the session's breaker) and the lease then granted was held by nobody."""
    from kvd.client.client import lease_wait
    from kvd.core import protocol as P
    from kvd.core.config import SsdSettings

    assert lease_wait(P.LeaseRequest(fingerprint="0" * 32, hashes=[])) == SsdSettings().prefetch_deadline_s
    assert lease_wait(P.LeaseRequest(fingerprint="0" * 32, hashes=[], wait_s=1.5)) == 1.5
