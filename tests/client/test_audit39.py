"""Audit 39 of the client SDK: stalls. A control call must never keep its engine longer than its
``timeout_s``, whatever else the client is doing, against a real daemon stopped with SIGSTOP."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from kvd.client import local_lookup
from kvd.client import prefix as kvio
from kvd.client.session import DaemonSession
from kvd.core import protocol as P
from kvd.core.keys import ModelSpec
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("audit39-client", num_layers=1, num_kv_heads=2, head_dim=16, kv_dtype="bfloat16")
TOKENS = list(range(2 * 256))
TIMEOUT_S = 2.0


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProc(tmp_path).start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.signal(signal.SIGCONT)
    d.kill()


def test_a_lookup_report_in_flight_does_not_add_its_wait_to_the_engines_call(daemon, monkeypatch):
    """The client's background report of local lookups (``/v1/lookup/report``) held the client's lock
    for its whole ``timeout_s`` against a stopped daemon, and an engine's call arriving meanwhile waited
    for that lock before its own ``timeout_s`` began: up to twice the documented bound per call (a
    vLLM scheduler step blocked ~2x ``timeout_s``)."""
    monkeypatch.setattr(local_lookup, "REPORT_INTERVAL_S", 0.05)
    c = daemon.client(timeout_s=TIMEOUT_S)
    try:
        h = kvio.register(c, SPEC)
        kv = torch.randn(1, 2, 2, len(TOKENS), 16).to(torch.bfloat16)
        assert kvio.store_prefix(h, TOKENS, kv).stored == 2
        req = P.LookupRequest(fingerprint=h.fingerprint, namespace=h.namespace,
                              prefix_hashes=h.hashes(TOKENS), prefetch=False)
        c.lookup_compact(req)  # through the daemon: vouches for the pair
        before = c.local.answered
        c.lookup_compact(req)  # answered locally, noted for the next report
        assert c.local.answered == before + 1
        daemon.signal(signal.SIGSTOP)
        time.sleep(0.3)  # the report (every 0.05 s here) is now waiting on the stopped daemon
        session = DaemonSession(c, SPEC, None)
        session._handle = h
        other = req.model_copy(update={"namespace": "elsewhere"})  # not vouched: asks the daemon
        t0 = time.monotonic()
        assert session.call("lookup", lambda hh: hh.client.lookup_compact(other)) is None
        took = time.monotonic() - t0
        assert session.counters["daemon_failures"] == 1
        assert took < TIMEOUT_S + 0.5, f"the call took {took:.2f} s against timeout_s {TIMEOUT_S}"
    finally:
        daemon.signal(signal.SIGCONT)
        c.close()
