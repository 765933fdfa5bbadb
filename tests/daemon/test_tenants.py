"""Two tenants on one daemon, as two real users (uids set in child processes): isolation that holds.

Tenant A (uid 61001) and tenant B (uid 61002) each get their own arena file and namespaces. B must
not be able to look up, load, list, delete or evict A's entries, map A's arena (EACCES), release A's
lease or commit A's reservation — and both must work normally in their own namespaces. Needs root
(to act as other users); CI runs as root.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kvd.client import prefix as kvio
from kvd.client.client import KvdClient
from kvd.core import protocol as P
from kvd.core.errors import KvdError
from kvd.core.keys import ModelSpec
from kvd.core.protocol_lookup import LookupReport, ReportItem
from tests.daemon_proc import DaemonProc

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as two users needs root")
UID_A, UID_B = 61001, 61002

SPEC = ModelSpec("toy", num_layers=2, num_kv_heads=2, head_dim=32, kv_dtype="bfloat16")
TOKENS = list(range(512))


# Children come from a forkserver: a fresh single-threaded interpreter started as root (so it can
# read an interpreter under /root), which forks each child. Forking pytest itself copied locks held by
# its other threads (executors, torch) into the child, which then hung on one of them.
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["torch", "kvd.client.prefix", "tests.daemon.test_tenants"])


def _as_user(uid: int, conn, fn, args) -> None:
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        fn(conn, *args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send({"child_error": repr(e)})
        raise


def forked_as(uid: int, fn, *args):
    """Run ``fn(conn, *args)`` in a child process that has become ``uid`` (uid and gid); returns the
    process and the parent's end of a pipe the child sends dicts on."""
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=_as_user, args=(uid, child, fn, args), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def attempt(out: dict, name: str, fn) -> None:
    try:
        fn()
        out[name] = "ok"
    except KvdError as e:
        out[name] = f"{type(e).__name__}: {e}"
    except OSError as e:
        out[name] = f"OSError {e.errno}"


def own_work(c: KvdClient, ns: str, fill: float, out: dict):
    h = kvio.register(c, SPEC, namespace=ns)
    out["arena"] = c.arena_info.path
    kv = torch.full((2, 2, 2, 512, 32), fill, dtype=torch.bfloat16)
    out["stored"] = kvio.store_prefix(h, TOKENS, kv).stored
    out["hits"] = kvio.lookup_prefix(h, TOKENS).num_prefix_hits
    req = P.LookupRequest(fingerprint=h.fingerprint, namespace=ns, prefix_hashes=h.hashes(TOKENS), prefetch=False)
    out["local_hits"] = [c.lookup_compact(req).num_prefix_hits for _ in range(2)]  # the second from its index
    out["index"], out["local_answered"] = c.arena_info.index_path, c.local.answered
    with kvio.load_prefix(h, TOKENS) as loaded:
        out["loaded_equal"] = bool(loaded.to_tensor().equal(kv))
    return h


def holder(w, socket_path: str, flag: str) -> None:
    """Tenant A: stores, then holds a lease and a reservation until B has tried to take them."""
    with KvdClient(socket_path, register_cuda=False) as c:
        out: dict = {}
        h = own_work(c, "a", 1.0, out)
        le = c.lease(P.LeaseRequest(fingerprint=h.fingerprint, namespace="a", hashes=h.hashes(TOKENS)))
        r = c.reserve(P.ReserveRequest(fingerprint=h.fingerprint, namespace="a",
                                       entries=[P.ReserveEntry(hash="c" * 32, num_tokens=256)]))
        out.update(lease_id=le.lease_id, reservation_id=r.reservation_id, hashes=h.hashes(TOKENS),
                   fingerprint=h.fingerprint)
        w.send(out)
        while not os.path.exists(flag):
            time.sleep(0.05)
        rest: dict = {}
        attempt(rest, "own_release", lambda: c.release(P.ReleaseRequest(lease_id=le.lease_id)))
        w.send(rest)


def intruder(w, socket_path: str, a: dict) -> None:
    """Tenant B: its own work succeeds; every reach for A's fails."""
    with KvdClient(socket_path, register_cuda=False) as c:
        out: dict = {}
        own_work(c, "b", 2.0, out)
        fp, hs = a["fingerprint"], a["hashes"]
        attempt(out, "lookup_a", lambda: c.lookup(P.LookupRequest(fingerprint=fp, namespace="a", prefix_hashes=hs)))
        attempt(out, "lookup_a_framed", lambda: c.lookup_compact(  # the engines' hot path (kvd.daemon.frames)
            P.LookupRequest(fingerprint=fp, namespace="a", prefix_hashes=hs)))
        attempt(out, "lease_a", lambda: c.lease(P.LeaseRequest(fingerprint=fp, namespace="a", hashes=hs)))
        attempt(out, "list_a", lambda: c.entries(namespace="a"))
        attempt(out, "list_all", lambda: c.entries())
        attempt(out, "delete_a", lambda: c.delete(P.EntriesRequest(namespace="a", hashes=hs)))
        attempt(out, "evict", lambda: c.evict(P.EvictRequest(tier="host")))
        attempt(out, "release_a", lambda: c.release(P.ReleaseRequest(lease_id=a["lease_id"])))
        attempt(out, "commit_a", lambda: c.commit(P.CommitRequest(reservation_id=a["reservation_id"])))
        attempt(out, "abort_a", lambda: c.abort(P.AbortRequest(reservation_id=a["reservation_id"])))
        attempt(out, "map_a", lambda: os.close(os.open(a["arena"], os.O_RDWR)))
        attempt(out, "map_a_index", lambda: os.close(os.open(a["index"], os.O_RDONLY)))  # A's lookup index
        attempt(out, "report_a", lambda: c._send_report(LookupReport(items=[ReportItem(
            namespace="a", fingerprint=fp, lookups=1, asked_tokens=256, hit_tokens={}, seen=[(hs[0], 1)])])))
        w.send(out)


def read_line(conn) -> dict:
    assert conn.poll(120), "the child sent nothing within 120 s"
    doc = conn.recv()
    assert "child_error" not in doc, doc["child_error"]
    return doc


@pytest.fixture
def daemon():
    root = Path(tempfile.mkdtemp(prefix="kvd-tenants-"))
    os.chmod(root, 0o755)  # other users traverse to the socket and their arenas
    cfg = root / "kvd.toml"
    cfg.write_text(textwrap.dedent(f"""
        [daemon]
        socket_mode = "0666"
        [ssd]
        enabled = false
        [tenants.a]
        uids = [{UID_A}]
        gids = [{UID_A}]
        namespaces = ["a", "a:*"]
        arena_bytes = "16MiB"
        [tenants.b]
        uids = [{UID_B}]
        gids = [{UID_B}]
        namespaces = ["b", "b:*"]
        arena_bytes = "16MiB"
    """))
    d = DaemonProc(root, env_extra={"KVD_HOST__CAPACITY_BYTES": "16MiB"}, args=["--config", str(cfg)]).start()
    yield d
    d.kill()
    shutil.rmtree(root, ignore_errors=True)  # its arenas: 48 MiB a run


def test_a_tenant_cannot_reach_another_tenants_kv(daemon):
    flag = str(daemon.root / "b_done")
    pa, fa = forked_as(UID_A, holder, daemon.socket, flag)
    first = read_line(fa)
    assert first["stored"] == 2 and first["hits"] == 2 and first["loaded_equal"]
    pb, fb = forked_as(UID_B, intruder, daemon.socket, first)
    res = read_line(fb)
    Path(flag).touch()
    assert res["stored"] == 2 and res["hits"] == 2 and res["loaded_equal"]  # B's own namespace works
    assert Path(res["arena"]).name != Path(first["arena"]).name  # each tenant maps its own arena
    for op in ("lookup_a", "lookup_a_framed", "lease_a", "list_a", "list_all", "delete_a", "evict", "release_a", "commit_a", "abort_a"):
        assert res[op].startswith("Forbidden"), (op, res[op])
    assert res["map_a"] == "OSError 13"  # EACCES: A's arena is A's group's
    assert res["map_a_index"] == "OSError 13"  # and so is its lookup index
    assert res["report_a"].startswith("Forbidden"), res["report_a"]
    for doc in (first, res):  # each tenant answers its own lookups from its own index
        assert doc["local_hits"] == [2, 2] and doc["local_answered"] == 1, doc
    assert first["index"] != res["index"]
    assert read_line(fa)["own_release"] == "ok"  # A's lease was still A's to release
    for p in (pa, pb):
        p.join(60)
        assert p.exitcode == 0
    with daemon.client() as c:  # root is an admin: sees both tenants
        assert {e.namespace for e in c.entries().entries} == {"a", "b"}


def test_without_tenants_everything_is_one_trust_domain(tmp_path):
    d = DaemonProc(tmp_path).start()
    try:
        with d.client() as c:
            assert c.stats().num_entries == 0 and c.evict(
                __import__("kvd.core.protocol", fromlist=["P"]).EvictRequest()).count == 0
    finally:
        d.kill()


# ---- audit 7: the API surface under tenants -------------------------------------------------------


def store_as(w, socket_path: str, ns: str) -> None:
    """A tenant stores its prefix in its namespace and says what it stored."""
    with KvdClient(socket_path, register_cuda=False) as c:
        out: dict = {}
        h = own_work(c, ns, 1.0, out)
        out.update(hashes=h.hashes(TOKENS), fingerprint=h.fingerprint)
        w.send(out)


def send_and_hang_up(w, socket_path: str, requests: list[tuple[str, bytes]]) -> None:
    """Each request on its own connection, closed as soon as it is sent (the answer is never read)."""
    import socket as so

    for route, body in requests:
        with so.socket(so.AF_UNIX, so.SOCK_STREAM) as s:
            s.connect(socket_path)
            s.sendall(f"POST {route} HTTP/1.1\r\nHost: kvd\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    w.send({"sent": len(requests)})


def list_models(w, socket_path: str) -> None:
    with KvdClient(socket_path, register_cuda=False) as c:
        w.send({"models": {m.model_id: m.num_entries for m in c.models().models}})


def _answered(daemon, route: str) -> dict[str, float]:
    """``status -> count`` of requests the daemon answered on ``route`` (from /metrics)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics", timeout=10).read().decode()
    return {s.labels["status"]: s.value for f in text_string_to_metric_families(text) if f.name == "kvd_requests"
            for s in f.samples if s.name == "kvd_requests_total" and s.labels.get("route") == route and s.value}


def test_a_tenant_that_hangs_up_is_not_served_as_an_admin(daemon):
    """A request whose client closed its connection while the daemon parsed its body (over 1 MiB:
    parsed on a worker thread) was served with no peer credentials, i.e. as an admin: tenant B
    deleted tenant A's entries and ran the admin-only evict (found by audit 7)."""
    pa, fa = forked_as(UID_A, store_as, daemon.socket, "a")
    a = read_line(fa)
    assert a["stored"] == 2
    pad = b" " * ((1 << 20) + 1024)  # whitespace: valid JSON, and over the size parsed off the loop
    delete = P.EntriesRequest(namespace="a", fingerprint=a["fingerprint"], hashes=a["hashes"])
    pb, fb = forked_as(UID_B, send_and_hang_up, daemon.socket, [
        ("/v1/delete", delete.model_dump_json().encode() + pad),
        ("/v1/evict", P.EvictRequest(tier="host").model_dump_json().encode() + pad)])
    assert read_line(fb)["sent"] == 2
    deadline = time.monotonic() + 30
    while not (_answered(daemon, "/v1/delete") and _answered(daemon, "/v1/evict")):
        assert time.monotonic() < deadline, "the daemon never answered the requests"
        time.sleep(0.05)
    assert "200" not in _answered(daemon, "/v1/delete") and "200" not in _answered(daemon, "/v1/evict")
    with daemon.client() as c:  # root, an admin: A's entries are all there, still in A's arena
        left = c.entries(namespace="a").entries
        assert sorted(e.hash for e in left) == sorted(a["hashes"]) and all("host" in e.tiers for e in left)
    for p in (pa, pb):
        p.join(60)
        assert p.exitcode == 0


def test_models_count_only_the_callers_own_entries(daemon):
    """``GET /v1/models`` answered every tenant with the entries and bytes of every tenant's
    namespaces (found by audit 7): B saw how much A had stored of each model."""
    pa, fa = forked_as(UID_A, store_as, daemon.socket, "a")
    assert read_line(fa)["stored"] == 2
    pb, fb = forked_as(UID_B, list_models, daemon.socket)
    assert read_line(fb)["models"] == {"toy": 0}  # the model is shared; A's entries are not B's to count
    with daemon.client() as c:  # an admin counts everyone's
        assert {m.model_id: m.num_entries for m in c.models().models} == {"toy": 2}
    for p in (pa, pb):
        p.join(60)
        assert p.exitcode == 0
