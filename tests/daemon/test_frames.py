"""The control socket's framed lookups (``kvd.daemon.frames``) beside HTTP on the same socket.

Raw sockets against the real daemon (served from a thread): a framed answer must be byte for byte the
HTTP compact answer; every bad frame gets the HTTP route's status and error code; slow, idle and
oversized frames close the connection; HTTP is untouched, even when its first bytes trickle in.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest

from kvd.client import prefix as kvio
from kvd.client.client import KvdClient
from kvd.client.http import UnixHttp
from kvd.core import lookup_wire as W
from kvd.core import protocol as P
from kvd.core.keys import ModelSpec
from kvd.daemon.api import METRICS, STATE
from kvd.daemon.frames import PREFACE
from kvd.store.answers import LookupResult
from tests.daemon_thread import ThreadDaemon, settings_for

SPEC = ModelSpec("frames", num_layers=1, num_kv_heads=2, head_dim=16, kv_dtype="bfloat16")
TOKENS = list(range(4 * 256))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A daemon with one stored 4-chunk prefix, and a lookup of it (the prefix plus two unknown chunks)."""
    import torch

    root = tmp_path_factory.mktemp("frames")
    d = ThreadDaemon(settings_for(root, ssd={"enabled": False},
                                 daemon={"idle_timeout_s": 1.0, "body_timeout_s": 0.5,
                                         "max_request_bytes": 4096})).start()
    with KvdClient(d.socket, register_cuda=False) as c:
        h = kvio.register(c, SPEC)
        kv = torch.randn(1, 2, 2, len(TOKENS), 16).to(torch.bfloat16)
        assert kvio.store_prefix(h, TOKENS, kv).stored == 4
        req = P.LookupRequest(fingerprint=h.fingerprint, namespace=h.namespace, prefetch=False,
                              prefix_hashes=h.hashes(TOKENS + list(range(9000, 9512))))
    yield d, req
    d.stop()


def framed(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.sendall(PREFACE)
    return s


def frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def answer(s: socket.socket) -> tuple[int, bytes]:
    head = recv_exactly(s, 6)
    n, status = struct.unpack("<IH", head)
    return status, recv_exactly(s, n)


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"closed after {len(out)} of {n} bytes"
        out += chunk
    return out


def closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_framed_answer_is_the_http_answer_byte_for_byte(served):
    d, req = served
    body = W.encode_lookup(req)
    http = UnixHttp(d.socket, 5)
    try:
        status, over_http = http.request("POST", "/v1/lookup", body, W.CONTENT_TYPE)
    finally:
        http.close()
    assert status == 200
    s = framed(d.socket)
    try:
        s.sendall(frame(body) + frame(body))  # two pipelined requests: answered in order
        first, second = answer(s), answer(s)
    finally:
        s.close()
    assert first == (200, over_http) and second == (200, over_http)
    got = W.decode_answer(over_http, req)
    assert got.num_prefix_hits == 4 and [r.index for r in got.prefix] == [0, 1, 2, 3]


def test_the_client_looks_up_over_frames_and_agrees_with_json(served):
    d, req = served
    with KvdClient(d.socket, register_cuda=False) as c:
        compact, plain = c.lookup_compact(req), c.lookup(req)
    assert compact.num_prefix_hits == plain.num_prefix_hits == 4
    assert [(r.index, r.hash, r.tier, list(r.classes), r.complete, r.num_tokens) for r in compact.prefix] == \
        [(r.index, r.hash, r.tier, r.classes, r.complete, r.num_tokens) for r in plain.prefix]


def _requests(d: ThreadDaemon, status: str) -> float:
    fam = d.daemon.app[METRICS].requests
    return fam.labels("/v1/lookup", status)._value.get()


def test_bad_frames_get_the_http_routes_errors_and_the_connection_stays_usable(served):
    d, req = served
    before = _requests(d, "400")
    s = framed(d.socket)
    try:
        s.sendall(frame(b"NOPE" + bytes(20)))
        status, body = answer(s)
        assert status == 400 and json.loads(body)["error"] == "invalid_request" and "magic" in json.loads(body)["message"]
        s.sendall(frame(b""))
        status, body = answer(s)
        assert status == 400 and "empty frame" in json.loads(body)["message"]
        other = req.model_copy(update={"fingerprint": "0" * 32})
        s.sendall(frame(W.encode_lookup(other)))
        status, body = answer(s)
        assert status == 404 and json.loads(body)["error"] == "not_found"
        s.sendall(frame(W.encode_lookup(req)))  # still answering
        assert answer(s)[0] == 200
    finally:
        s.close()
    assert _requests(d, "400") == before + 2  # counted under the route, as over HTTP


def test_an_oversized_frame_is_refused_and_the_connection_closed(served):
    d, _ = served
    s = framed(d.socket)
    try:
        s.sendall(struct.pack("<I", 1 << 20))
        status, body = answer(s)
        assert status == 413 and "max_request_bytes" in json.loads(body)["message"]
        assert closed_within(s, 2)
    finally:
        s.close()


def test_a_stalled_frame_times_out_and_an_idle_connection_closes(served):
    d, req = served
    s = framed(d.socket)
    try:
        body = W.encode_lookup(req)
        s.sendall(frame(body)[:20])  # the length and part of the body, then nothing
        t0 = time.monotonic()
        status, msg = answer(s)
        assert status == 408 and "body_timeout_s" in json.loads(msg)["message"]
        assert closed_within(s, 2) and time.monotonic() - t0 < 3
    finally:
        s.close()
    idle = framed(d.socket)
    quiet = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # connected, never says what it speaks
    quiet.connect(d.socket)
    try:
        assert closed_within(idle, 3) and closed_within(quiet, 3)  # idle_timeout_s = 1
    finally:
        idle.close()
        quiet.close()


def test_http_is_untouched_even_when_its_first_bytes_trickle_in(served):
    d, _ = served
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(d.socket)
    try:
        for b in b"GET":  # fewer bytes than the preface, one at a time
            s.sendall(bytes([b]))
            time.sleep(0.02)
        s.sendall(b" /v1/health HTTP/1.1\r\nHost: kvd\r\n\r\n")
        head = s.recv(4096)
    finally:
        s.close()
    assert head.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in head


def test_a_framed_lookup_while_shutting_down_is_refused(served):
    d, req = served
    state = d.daemon.app[STATE]
    s = framed(d.socket)
    try:
        state["shutting_down"] = True
        s.sendall(frame(W.encode_lookup(req)))
        status, body = answer(s)
    finally:
        state["shutting_down"] = False
        s.close()
    assert status == 503 and json.loads(body)["error"] == "shutting_down"


def test_the_client_falls_back_to_http_against_a_daemon_without_frames(tmp_path):
    """A daemon from before frames answers the preface with an HTTP 400: the client switches to HTTP
    for good (one framed attempt), and the lookup is answered."""
    path = str(tmp_path / "old.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    seen: list[bytes] = []
    canned = W.encode_answer(LookupResult(chunk_tokens=256, num_prefix_hits=0, prefix=[], chunks=[]))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    seen.append(data[:4])
                    if data.startswith(PREFACE):
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        break
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                                 % (W.CONTENT_TYPE.encode(), len(canned)) + canned)

    threading.Thread(target=serve, daemon=True).start()
    req = P.LookupRequest(fingerprint="f" * 32, namespace="default", prefix_hashes=["a" * 32])
    try:
        with KvdClient(path, register_cuda=False) as c:
            assert c.lookup_compact(req).num_prefix_hits == 0
            assert c.lookup_compact(req).num_prefix_hits == 0
    finally:
        listener.close()
    assert seen.count(PREFACE) == 1 and seen.count(b"POST") == 2


def test_a_client_that_does_not_read_its_answers_is_held_not_buffered(served):
    """Thousands of pipelined lookups and no reads: the daemon stops serving (and then reading) that
    connection once its write buffer is full, so what it holds stays bounded; when the client reads,
    every answer arrives, in order."""
    d, req = served
    body = frame(W.encode_lookup(req))
    n = (4 << 20) // len(body)  # unheld, requests and answers would pile up to megabytes
    s = framed(d.socket)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # the sender advances only as fast as this thread reads answers (the point of the test); on a
    # loaded 2-core machine a send waited past 5 s, stopped mid-frame, and the daemon then rightly
    # closed the connection for a body that never came (daemon.body_timeout_s)
    s.settimeout(120)
    sender = threading.Thread(target=s.sendall, args=(body * n,), daemon=True)
    sender.start()
    time.sleep(1.0)
    (conn,) = list(d.daemon._control.frames)
    held = conn.transport.get_write_buffer_size() + len(conn.buf)
    # bounded: the write buffer's high-water mark, and the request limit plus one read (256 KiB)
    assert held < 640 << 10, f"{held} bytes held for a client that does not read"
    try:
        got = [answer(s) for _ in range(n)]
    finally:
        sender.join(10)
        s.close()
    assert {status for status, _ in got} == {200} and len({b for _, b in got}) == 1


def test_a_frame_that_trickles_in_still_times_out_from_its_first_byte(served):
    """daemon.body_timeout_s bounds a frame's whole arrival, as it bounds an HTTP body's: a client
    sending one byte of its frame every 0.2 s (body_timeout_s = 0.5) used to re-arm the timer with
    each byte, holding its connection (and the daemon's buffer for it) as long as it liked."""
    d, req = served
    data = frame(W.encode_lookup(req))
    s = framed(d.socket)
    try:
        t0 = time.monotonic()
        sent, head = 0, b""
        s.settimeout(0.2)
        while time.monotonic() - t0 < 3 and sent < len(data) - 1:
            try:
                s.sendall(data[sent:sent + 1])
            except OSError:
                break  # closed on us: what we wanted
            sent += 1
            try:
                head = s.recv(4096)
            except TimeoutError:
                continue
            break  # the answer (or the close) came
        elapsed = time.monotonic() - t0
    finally:
        s.close()
    assert elapsed < 2, f"a trickling frame held its connection for {elapsed:.1f} s ({sent} bytes sent)"
    assert head[4:6] == struct.pack("<H", 408)
