"""Audit 32: the control API's handlers and request parsing, against a real daemon process."""

from __future__ import annotations

import json

import pytest

from kvd.client import prefix as kvio
from kvd.core import protocol as P
from kvd.core.keys import ModelSpec
from tests.daemon.rawhttp import send
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("toy", num_layers=2, num_kv_heads=2, head_dim=32, kv_dtype="bfloat16")


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProc(tmp_path, env_extra={"KVD_HOST__SLOT_BYTES": "64KiB"}).start()
    yield d
    d.kill()


def post(d: DaemonProc, route: str, body: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    status, raw, _ = send(d.socket, "POST", route, body, timeout=timeout)
    return status, json.loads(raw) if raw else {}


def test_a_commit_naming_an_entry_twice_is_a_400_and_leaves_the_reservation_whole(daemon):
    """``hashes`` naming one entry twice inserted it twice: an AssertionError, a 500, with the entry
    already handed to write-back and admission while the commit was rolled back."""
    h = "a" * 32
    with daemon.client() as c:
        fp = kvio.register(c, SPEC).fingerprint
        rid = c.reserve(P.ReserveRequest(fingerprint=fp, entries=[P.ReserveEntry(hash=h, num_tokens=256)])
                        ).reservation_id
    status, doc = post(daemon, "/v1/commit", json.dumps({"reservation_id": rid, "hashes": [h, h]}).encode())
    assert status == 400 and doc["error"] == "invalid_request", doc
    assert h in doc["message"] and "twice" in doc["message"]
    assert "unhandled error" not in daemon.log.read_text()
    with daemon.client() as c:
        assert c.entries().entries == []  # nothing committed by the refused request
        assert c.commit(P.CommitRequest(reservation_id=rid, hashes=[h])).committed == [h]  # still open, whole
        assert [e.hash for e in c.entries().entries] == [h]

