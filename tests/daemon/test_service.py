"""The real ``kvd`` entry point as a subprocess: round trips, several clients, restarts, signals."""

import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvd.client import prefix as kvio
from kvd.core.errors import DaemonUnavailable, ShuttingDown
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("toy", num_layers=3, num_kv_heads=2, head_dim=64, kv_dtype="bfloat16")
HM = HeadMap.from_classes("toy", [[True, False]] * 3, sink=4, window=64)


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProc(tmp_path).start()
    yield d
    d.kill()


def kv_for(spec: ModelSpec, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.num_layers, 2, spec.num_kv_heads, tokens, spec.head_dim, generator=g) * 3
    return x.to(getattr(torch, spec.kv_dtype))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_store_lookup_load_round_trip_is_bit_exact(daemon, dtype):
    spec = ModelSpec(f"toy-{dtype}", 3, 2, 64, kv_dtype=dtype)
    hm = HeadMap.from_classes(spec.model_id, [[True, False]] * 3, sink=4, window=64)
    with daemon.client() as c:
        h = kvio.register(c, spec, hm)
        toks = list(range(900))
        kv = kv_for(spec, 900, 1)
        kv[0, 0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, -float("inf")])
        assert kvio.store_prefix(h, toks, kv).stored == 3
        assert kvio.lookup_prefix(h, toks).num_prefix_hits == 3
        with kvio.load_prefix(h, toks) as loaded:
            out = loaded.to_tensor()
        ref = kv[:, :, :, :768]
        assert out.view(torch.uint8).equal(ref.contiguous().view(torch.uint8))  # bit for bit, NaN included
        assert kvio.store_prefix(h, toks, kv).existing == 3  # stored once


CHILD = textwrap.dedent("""
    import sys, torch
    from kvd.client.client import KvdClient
    from kvd.client import prefix as kvio
    from tests.daemon.test_service import SPEC, HM, kv_for
    c = KvdClient(sys.argv[1], register_cuda=False)
    h = kvio.register(c, SPEC, HM)
    toks = list(range(int(sys.argv[2])))
    if sys.argv[3] == "store":
        print(kvio.store_prefix(h, toks, kv_for(SPEC, len(toks), 7)).stored)
    else:
        le = kvio.load_prefix(h, toks)
        print(le.num_chunks, flush=True)
        import time; time.sleep(600)   # hold the lease until killed
""")


def run_child(daemon, *args, **kw):
    return subprocess.Popen([sys.executable, "-c", CHILD, daemon.socket, *map(str, args)], stdout=subprocess.PIPE,
                            text=True, **kw)


def test_two_client_processes_share_entries(daemon):
    child = run_child(daemon, 1024, "store")
    assert child.communicate(timeout=60)[0].strip() == "4"
    with daemon.client() as c:
        h = kvio.register(c, SPEC, HM)
        toks = list(range(1024))
        with kvio.load_prefix(h, toks) as loaded:
            assert loaded.num_chunks == 4
            assert torch.equal(loaded.to_tensor(), kv_for(SPEC, 1024, 7))


def test_client_killed_with_a_lease_gives_it_back(daemon):
    with daemon.client() as c:
        h = kvio.register(c, SPEC, HM)
        kvio.store_prefix(h, list(range(512)), kv_for(SPEC, 512, 3))
        child = run_child(daemon, 512, "lease")
        assert child.stdout.readline().strip() == "2"
        assert c.stats().leases_held == 1
        child.kill()
        child.wait()
        deadline = time.monotonic() + 10
        while c.stats().leases_held and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.stats().leases_held == 0
        assert "owner_died" in daemon.log.read_text()


def test_client_survives_a_daemon_restart(daemon):
    with daemon.client(timeout_s=2.0) as c:
        h = kvio.register(c, SPEC, HM)
        toks = list(range(512))
        kvio.store_prefix(h, toks, kv_for(SPEC, 512, 5))
        old_arena = c.arena().arena_id
        assert daemon.stop() == 0
        with pytest.raises(DaemonUnavailable):
            kvio.lookup_prefix(h, toks)
        daemon.start()
        # The same client: reconnects, re-registers its model, sees the (host-only) cache empty.
        assert kvio.lookup_prefix(h, toks).num_prefix_hits == 0
        assert kvio.store_prefix(h, toks, kv_for(SPEC, 512, 5)).stored == 2
        with kvio.load_prefix(h, toks) as loaded:
            assert torch.equal(loaded.to_tensor(), kv_for(SPEC, 512, 5))
        assert c.arena().arena_id != old_arena


def test_sigterm_finishes_the_commit_in_flight_and_exits_zero(daemon):
    with daemon.client(timeout_s=10.0) as c:
        h = kvio.register(c, SPEC, HM)
        toks = list(range(256 * 40))
        kv = kv_for(SPEC, len(toks), 9)
        result = {}

        def store():
            try:
                result["r"] = kvio.store_prefix(h, toks, kv)
            except (DaemonUnavailable, ShuttingDown) as e:
                result["e"] = e

        t = threading.Thread(target=store)
        t.start()
        time.sleep(0.05)
        assert daemon.stop(signal.SIGTERM) == 0
        t.join(30)
        log = daemon.log.read_text()
        assert "kvd stopped in" in log and "Traceback" not in log
        # Either the whole batch was committed before the exit, or the client was told it was not.
        assert ("r" in result and result["r"].stored == 40) or "e" in result


def test_metrics_endpoint_parses(daemon):
    import urllib.request

    with daemon.client() as c:
        h = kvio.register(c, SPEC, HM)
        kvio.store_prefix(h, list(range(512)), kv_for(SPEC, 512, 1))
        kvio.lookup_prefix(h, list(range(768)))
    body = urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics", timeout=5).read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    for name in ("kvd_tier_used_bytes", "kvd_tier_capacity_bytes", "kvd_tier_entries", "kvd_tier_segments",
                 "kvd_lookup_tokens", "kvd_hit_tokens", "kvd_moved_bytes", "kvd_request_duration_seconds",
                 "kvd_leases_held"):
        assert name in fams, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert samples[("kvd_lookup_tokens_total", (("kind", "prefix"),))] == 768
    assert samples[("kvd_tier_entries", (("tier", "host"),))] == 2
    assert not any(n.startswith("kvd_gpu_") for n in fams)  # no GPU here: absent, not zero
    health = urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/healthz", timeout=5).read()
    assert health == b"ok\n"


def test_systemd_notify_ready_and_stopping(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(20)
    d = DaemonProc(tmp_path, env_extra={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}).start()
    try:
        msgs = [s.recv(4096).decode() for _ in range(2)]
        assert any("READY=1" in m for m in msgs) and any("WATCHDOG=1" in m for m in msgs)
        assert d.stop() == 0
        seen = ""
        while "STOPPING=1" not in seen:
            seen = s.recv(4096).decode()
    finally:
        d.kill()
        s.close()


def test_sighup_reloads_what_can_change(tmp_path):
    cfg = tmp_path / "kvd.toml"
    cfg.write_text("[host]\nlease_ttl_s = 30.0\n")
    d = DaemonProc(tmp_path, args=["--config", str(cfg)]).start()
    try:
        with d.client() as c:
            assert c.config()["host"]["lease_ttl_s"] == 30.0
            cfg.write_text("[host]\nlease_ttl_s = 5.0\nslot_bytes = 131072\n")
            d.signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while c.config()["host"]["lease_ttl_s"] != 5.0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.config()["host"]["lease_ttl_s"] == 5.0
        assert "need a restart: host.slot_bytes" in d.log.read_text()
    finally:
        d.kill()


def test_second_daemon_on_the_same_socket_refuses_clearly(daemon, tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvd.daemon.service", "--socket", daemon.socket, "--metrics-addr", ""],
                       capture_output=True, text=True, timeout=60, env=daemon.env())
    assert r.returncode == 1 and "already serving" in r.stderr and "Traceback" not in r.stderr


async def test_async_client_round_trip(daemon):
    """The asyncio client: register, reserve, write through its arena views, commit, lease, read back."""
    from kvd.client.client import AsyncKvdClient
    from kvd.core import protocol as P

    c = AsyncKvdClient(daemon.socket, register_cuda=False)
    try:
        reg = await c.register_model(P.RegisterModelRequest(model_id="toy", num_layers=3, num_kv_heads=2,
                                                            head_dim=64, head_map=HM))
        h = kvio.ModelHandle(None, SPEC, HM, reg.fingerprint, reg.chunk_tokens)
        hashes = h.hashes(list(range(256)))
        kv = kv_for(SPEC, 256, 11)
        r = await c.reserve(P.ReserveRequest(fingerprint=reg.fingerprint,
                                             entries=[P.ReserveEntry(hash=hashes[0], num_tokens=256)]))
        arena = await c.arena(r.arena_id)
        for ext in r.entries[0].extents:
            view = arena.torch_extent(ext, h.plans(256)[ext.head_class], "bfloat16")
            for part, src in kvio.extent_to_kv_views(h.plans(256)[ext.head_class], view, kv, 0):
                part.copy_(src)
        await c.commit(P.CommitRequest(reservation_id=r.reservation_id))
        assert (await c.lookup(P.LookupRequest(fingerprint=reg.fingerprint, prefix_hashes=hashes))).num_prefix_hits == 1
        le = await c.lease(P.LeaseRequest(fingerprint=reg.fingerprint, hashes=hashes))
        out = torch.empty_like(kv)
        for ext in le.entries[0].extents:
            plan = h.plans(256)[ext.head_class]
            for part, dst in kvio.extent_to_kv_views(plan, arena.torch_extent(ext, plan, "bfloat16"), out, 0):
                dst.copy_(part)
        assert torch.equal(out, kv)
        await c.release(P.ReleaseRequest(lease_id=le.lease_id))
    finally:
        await c.close()


def test_sighup_applies_what_it_says_it_applied(tmp_path, caplog):
    """SIGHUP reported daemon.max_request_bytes, codec.zstd_level, codec.threads and
    policy.recency_half_life_s as reloaded, while the HTTP server, the zstd compressor and the
    eviction policies kept the values they were built with (found by audit 7). Each is either in
    force after the reload or reported as needing a restart."""
    import asyncio
    import logging

    from tests.daemon.rawhttp import send
    from tests.daemon_thread import ThreadDaemon, settings_for

    def toml(max_request_bytes: int, zstd_level: int, threads: int, half_life_s: float) -> str:
        return (f"[daemon]\nmax_request_bytes = {max_request_bytes}\n[codec]\nzstd_level = {zstd_level}\n"
                f"threads = {threads}\n[policy]\nrecency_half_life_s = {half_life_s}\n")

    cfg = tmp_path / "kvd.toml"
    over = dict(daemon={"max_request_bytes": 64 << 10}, codec={"zstd_level": 1, "threads": 1},
                policy={"recency_half_life_s": 300.0})
    d = ThreadDaemon(settings_for(tmp_path, ssd={"enabled": False}, **over))
    d.daemon.config_path = str(cfg)
    d.daemon.overrides = {"daemon": {"socket": d.socket, "metrics_addr": ""}, "host": {"path": str(tmp_path / "kvd.arena")},
                          "ssd": {"enabled": False, "path": str(tmp_path / "ssd")}}
    d.start()
    try:
        body = b"{}" + b" " * (100 << 10)  # between the old limit and the new one
        assert send(d.socket, "POST", "/v1/lookup", body)[0] == 413
        cfg.write_text(toml(1 << 20, 9, 2, 60.0))
        with caplog.at_level(logging.INFO, logger="kvd"):
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), d._loop).result(10)  # the loop runs
            d._loop.call_soon_threadsafe(d.daemon.reload)
            deadline = time.monotonic() + 10
            while "SIGHUP: reloaded" not in caplog.text:
                assert time.monotonic() < deadline, "no reload logged"
                time.sleep(0.05)
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("SIGHUP: reloaded"))
        applied = line.split("; need a restart")[0]
        zstd = d.store.pipeline.forms.codecs._zstd
        in_force = {
            "daemon.max_request_bytes": send(d.socket, "POST", "/v1/lookup", body)[0] != 413,
            "codec.zstd_level": zstd.level == 9,
            "codec.threads": zstd.threads == 2,
            "policy.recency_half_life_s": all(lv.policy.half_life_s == 60.0 for lv in d.store.index.levels),
        }
        for key, ok in in_force.items():
            assert ok or key not in applied, f"{key} reported reloaded but not in force: {line}"
            assert key in line, line  # reported either way
    finally:
        d.stop()
