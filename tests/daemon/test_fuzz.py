"""Fuzzing the control API of a real daemon: over 2,000 malformed requests across every route, from a
table of known attacks and from hypothesis (random JSON, valid bodies with one field broken). Every
one must be answered in under 2 s with a status below 500 — no crash, no 5xx, no hang — and the
daemon must store and load correctly afterwards.
"""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvd.client import prefix as kvio
from kvd.core.keys import ModelSpec
from tests.daemon.rawhttp import send
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("toy", num_layers=2, num_kv_heads=2, head_dim=32, kv_dtype="bfloat16")
H = "a" * 32
FP = "0" * 32  # replaced by the registered fingerprint
MAX_S = 2.0
VALID = {
    "/v1/models": {"model_id": "toy", "num_layers": 2, "num_kv_heads": 2, "head_dim": 32},
    "/v1/lookup": {"fingerprint": FP, "prefix_hashes": [H], "namespace": "default"},
    "/v1/reserve": {"fingerprint": FP, "entries": [{"hash": H, "num_tokens": 256, "start_token": 0}]},
    "/v1/commit": {"reservation_id": "x" * 32},
    "/v1/abort": {"reservation_id": "x" * 32},
    "/v1/lease": {"fingerprint": FP, "hashes": [H], "wait_s": 0},
    "/v1/release": {"lease_id": "x" * 32},
    "/v1/delete": {"hashes": [H]},
    "/v1/pin": {"hashes": [H]},
    "/v1/unpin": {"hashes": [H]},
    "/v1/evict": {"tier": "host", "max_bytes": 1, "dry_run": True},
    "/v1/flush": {"namespace": "default"},
    "/v1/compact": {},
}
GETS = ["/v1/health", "/v1/config", "/v1/stats", "/v1/models", "/v1/entries", "/v1/entries?limit=abc",
        "/v1/entries?tier=moon", "/v1/entries?limit=0", "/v1/entries?namespace=" + "n" * 5000, "/v1/nothing"]
HUGE = 10**400
TABLE = [  # (route, body bytes, extra headers): the re-check's findings and their cousins
    ("/v1/flush", b"{}", {}),
    ("/v1/flush", json.dumps({"hashes": [H]}).encode(), {}),
    ("/v1/lookup", json.dumps({"fingerprint": FP, "chunk_hashes": [H], "chunk_num_tokens": [HUGE]}).encode(), {}),
    ("/v1/reserve", json.dumps({"fingerprint": FP, "entries": [{"hash": H, "num_tokens": 1, "start_token": HUGE}]}).encode(), {}),
    ("/v1/reserve", json.dumps({"fingerprint": FP, "entries": [{"hash": H, "num_tokens": 1, "start_token": 10**300}]}).encode(), {}),
    ("/v1/models", json.dumps({"model_id": "m", "num_layers": 4096, "num_kv_heads": 4096, "head_dim": 4096}).encode(), {}),
    ("/v1/models", json.dumps({"model_id": "m", "num_layers": 200, "num_kv_heads": 80, "head_dim": 4096}).encode(), {}),
    ("/v1/lookup", b'{"fingerprint": "x"}', {"Content-Encoding": "gzip"}),
    ("/v1/lookup", gzip.compress(b'{"fingerprint": "' + b"x" * 100000 + b'"}'), {"Content-Encoding": "gzip"}),
    ("/v1/lookup", b"\xff\xfe\x00garbage", {}),
    ("/v1/lookup", b"[" * 5000 + b"]" * 5000, {}),
    ("/v1/lookup", json.dumps({"fingerprint": "x" * 1_000_000}).encode(), {}),
    ("/v1/reserve", json.dumps({"fingerprint": FP, "entries": [{"hash": H, "num_tokens": 256}] * 5000}).encode(), {}),
    ("/v1/lookup", json.dumps({"fingerprint": FP, "token_ids": [-1]}).encode(), {}),
    ("/v1/lookup", json.dumps({"fingerprint": FP, "namespace": "../../etc"}).encode(), {}),
    ("/v1/lookup", json.dumps({"fingerprint": FP, "computed_under": "hm-zz"}).encode(), {}),
    ("/v1/lease", json.dumps({"fingerprint": FP, "hashes": [H], "wait_s": -1}).encode(), {}),
    ("/v1/release", json.dumps({"lease_id": "x", "transfer_s": float("inf")}).encode().replace(b"Infinity", b"1e999"), {}),
]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    d = DaemonProc(tmp_path_factory.mktemp("fuzz")).start()
    with d.client() as c:
        h = kvio.register(c, SPEC)
    d.fp = h.fingerprint
    d.answers = []  # (route, status, seconds) of every request sent
    yield d
    d.kill()


def fire(live, route: str, body: bytes, headers: dict | None = None, method: str = "POST") -> None:
    body = body.replace(FP.encode(), live.fp.encode())
    status, payload, secs = send(live.socket, method, route, body, headers=headers, timeout=MAX_S)
    live.answers.append((route, status, secs))
    assert status != 0, f"{route}: no answer within {MAX_S} s"
    assert status < 500, f"{route}: {status} {payload[:300]!r}"
    assert live.proc.poll() is None, "the daemon died"


@pytest.mark.parametrize("case", range(len(TABLE)), ids=[f"{t[0]}-{i}" for i, t in enumerate(TABLE)])
def test_table_of_attacks(live, case):
    route, body, headers = TABLE[case]
    fire(live, route, body, headers)


@pytest.mark.parametrize("route", GETS)
def test_get_routes(live, route):
    fire(live, route, b"", method="GET")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40) | st.just(HUGE) | st.just("a" * 32),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=12)


def broken(route: str):
    """A valid body of ``route`` with one field replaced, removed, or an unknown one added."""
    base = VALID[route]

    @st.composite
    def make(draw):
        body = json.loads(json.dumps(base))
        keys = list(body) or ["x"]
        key = draw(st.sampled_from(keys + ["unknown_field"]))
        how = draw(st.sampled_from(["replace", "delete", "wrap"]))
        if how == "delete":
            body.pop(key, None)
        elif how == "wrap":
            body[key] = [body.get(key)]
        else:
            body[key] = draw(json_values)
        return json.dumps(body).encode()

    return make()


ROUTES = sorted(VALID)
EXAMPLES = 170  # per route below: 13 routes x up to 170 (hypothesis drops duplicates), + the table and GETs


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
@pytest.mark.parametrize("route", ROUTES)
def test_broken_bodies(live, route, data):
    kind = data.draw(st.sampled_from(["broken", "random", "bytes"]))
    if kind == "broken":
        body = data.draw(broken(route))
    elif kind == "random":
        body = json.dumps(data.draw(json_values)).encode()
    else:
        body = data.draw(st.binary(max_size=200))
    fire(live, route, body)


def test_after_the_fuzz_it_still_stores_and_loads(live):
    assert len(live.answers) >= 2000, len(live.answers)
    assert max(s for _, _, s in live.answers) < MAX_S
    with live.client() as c:
        h = kvio.register(c, SPEC)
        kv = torch.randn(2, 2, 2, 512, 32).to(torch.bfloat16)
        toks = list(range(90_000, 90_512))
        assert kvio.store_prefix(h, toks, kv).stored == 2
        with kvio.load_prefix(h, toks) as loaded:
            assert loaded.to_tensor().view(torch.int16).equal(kv.view(torch.int16))
