"""Audit 32: the control API's handlers and request parsing, against a real daemon process."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from kvd.client import prefix as kvio
from kvd.core import protocol as P
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec
from tests.daemon.rawhttp import send
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("toy", num_layers=2, num_kv_heads=2, head_dim=32, kv_dtype="bfloat16")
MODEL = {"model_id": "toy", "num_layers": 2, "num_kv_heads": 2, "head_dim": 32}


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


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_registration_with_a_non_finite_number_is_refused(daemon, number):
    """JSON numbers kvd cannot write back (NaN, infinities, 1e400) were accepted in ``rope`` and the head
    map's scores: the registration was persisted with null in their place, so on the next start its
    fingerprint no longer matched, the model was not registered, and every SSD record of it was dropped."""
    rope = b'{"model_id": "toy", "num_layers": 2, "num_kv_heads": 2, "head_dim": 32, "rope": {"rope_theta": %s}}'
    status, doc = post(daemon, "/v1/models", rope % number.encode())
    assert status == 400 and "rope.rope_theta" in doc["message"] and "finite" in doc["message"], doc
    hm = json.loads(HeadMap.all_global("toy", 2, 2).model_dump_json())
    hm["scores"] = {"retrieval": [[0.5, 0.5], [0.5, 0.0]]}
    body = json.dumps({**MODEL, "head_map": hm}).replace("0.0]]", f"{number}]]").encode()
    status, doc = post(daemon, "/v1/models", body)
    assert status == 400 and "head_map.scores.retrieval.1.1" in doc["message"], doc
    with daemon.client() as c:
        assert c.models().models == []


def test_a_finite_rope_registration_survives_a_restart(tmp_path):
    """The refused numbers' neighbours still register, and their entries come back after a restart."""
    d = DaemonProc(tmp_path).start()
    body = json.dumps({**MODEL, "rope": {"rope_theta": 1e300, "scaling": [0.25, -3]}}).encode()
    try:
        status, doc = post(d, "/v1/models", body)
        assert status == 200, doc
        fp = doc["fingerprint"]
        with d.client() as c:
            rid = c.reserve(P.ReserveRequest(fingerprint=fp, entries=[P.ReserveEntry(hash="b" * 32, num_tokens=256)])
                            ).reservation_id
            c.commit(P.CommitRequest(reservation_id=rid))
            assert c.flush(P.FlushRequest()).count == 1
        assert d.stop() == 0
        d.start()
        with d.client() as c:
            assert [e.hash for e in c.entries().entries] == ["b" * 32]
        assert post(d, "/v1/models", body)[1]["fingerprint"] == fp
    finally:
        d.kill()


def test_a_lease_naming_one_class_a_million_times_does_not_hold_the_daemon(daemon):
    """A lease's ``classes`` filter was matched in full against every extent of every entry: naming
    "local" a million times (9 MB, under the body limit) over 200 entries held the event loop for
    about 20 s, every other client's request with it. Repeats name nothing more: they are dropped."""
    with daemon.client() as c:
        h = kvio.register(c, SPEC, HeadMap.from_classes("toy", [[True, False]] * 2, sink=4, window=64))
        tokens = list(range(256 * 200))
        assert kvio.store_prefix(h, tokens, torch.ones((2, 2, 2, len(tokens), 32), dtype=torch.bfloat16)).stored == 200
        hashes = h.hashes(tokens)
    body = json.dumps({"fingerprint": h.fingerprint, "hashes": hashes, "classes": ["local"] * 1_000_000,
                       "wait_s": 0}).encode()
    answer: list = []
    big = threading.Thread(target=lambda: answer.append(post(daemon, "/v1/lease", body, timeout=120)))
    big.start()
    time.sleep(0.5)  # the body is in and being served
    status, doc = post(daemon, "/v1/lookup", json.dumps({"fingerprint": h.fingerprint, "prefix_hashes": hashes[:1],
                                                         "prefetch": False}).encode(), timeout=5.0)
    big.join(120)
    assert status == 200 and doc["num_prefix_hits"] == 1, "the daemon did not answer another client meanwhile"
    status, doc = answer[0]
    assert status == 200 and all(e["status"] == "ok" and [x["head_class"] for x in e["extents"]] == ["local"]
                                 for e in doc["entries"]), [(e["status"], e["extents"]) for e in doc["entries"]][:2]
