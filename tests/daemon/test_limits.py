"""Slow clients, idle connections, floods of new clients, and what a kill -9 leaves behind.

Each was a way to freeze or fill the daemon: a request with a short body was never answered, 3,600
slow or idle connections were all held, 161 of 300 simultaneous new connections were refused
(backlog 128, one retry), and a killed daemon's arena and socket stayed until a restart on the same
socket.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import threading
import time

import pytest

from kvd.client.client import KvdClient
from tests.daemon.rawhttp import send
from tests.daemon_proc import DaemonProc


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProc(tmp_path, env_extra={"KVD_DAEMON__IDLE_TIMEOUT_S": "1", "KVD_DAEMON__BODY_TIMEOUT_S": "1",
                                        "KVD_SSD__ENABLED": "false"}).start()
    yield d
    d.kill()


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed ``sock`` (recv returns b"" or resets), None if it did not in time."""
    sock.settimeout(seconds)
    t0 = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def test_idle_and_slow_header_connections_are_closed_on_time(daemon):
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(daemon.socket)
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(daemon.socket)
    slow.sendall(b"POST /v1/lookup HTTP/1.1\r\nHost: kvd\r\n")

    def trickle() -> None:  # one header byte every 0.2 s: never a complete request
        try:
            for _ in range(30):
                time.sleep(0.2)
                slow.sendall(b"X")
        except OSError:
            pass

    threading.Thread(target=trickle, daemon=True).start()
    assert closed_within(idle, 4) is not None
    assert closed_within(slow, 4) is not None
    status, _, secs = send(daemon.socket, "GET", "/v1/health", timeout=2)
    assert status == 200 and secs < 1  # and the daemon serves the others meanwhile


def test_a_short_body_gets_408_not_silence(daemon):
    status, body, secs = send(daemon.socket, "POST", "/v1/lookup", b'{"fingerprint": ', timeout=5,
                              headers={"Content-Length": "1000"})
    assert status == 408 and b"body_timeout_s" in body and secs < 3


def test_hundreds_of_idle_connections_do_not_block_and_are_dropped(daemon):
    socks = []
    for _ in range(300):
        s = socket.socket(socket.AF_UNIX)
        s.connect(daemon.socket)
        socks.append(s)
    status, _, secs = send(daemon.socket, "GET", "/v1/health", timeout=2)
    assert status == 200 and secs < 1
    time.sleep(2.5)  # past idle_timeout_s = 1
    assert all(closed_within(s, 0.5) is not None for s in socks)
    for s in socks:
        s.close()


def test_a_thousand_simultaneous_new_clients_all_succeed(tmp_path):
    # The daemon's default timeouts, not the module fixture's 1 s idle timeout: one client loop opening
    # 1,000 connections on a loaded 2-core machine can leave one unwritten for over a second, and the
    # daemon then rightly closes it (seen once in a full run; this test is about the burst).
    d = DaemonProc(tmp_path, env_extra={"KVD_SSD__ENABLED": "false"}).start()
    try:
        _burst_of_new_clients(d)
    finally:
        d.kill()


def _burst_of_new_clients(daemon) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))

    async def one() -> int:
        reader, writer = await asyncio.open_unix_connection(daemon.socket)
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: kvd\r\nConnection: close\r\n\r\n")
        await writer.drain()
        line = await reader.readline()
        writer.close()
        return int(line.split()[1])

    async def burst() -> list[int]:
        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(1000))), 60)

    assert asyncio.run(burst()) == [200] * 1000


def test_the_client_retries_a_full_backlog(tmp_path):
    """A listen backlog of 8 and 200 clients connecting at once: connects that get EAGAIN are retried
    with back-off inside the client's timeout; none is reported unreachable."""
    d = DaemonProc(tmp_path, env_extra={"KVD_DAEMON__LISTEN_BACKLOG": "8", "KVD_SSD__ENABLED": "false"}).start()
    failures: list[Exception] = []
    start = threading.Barrier(200)

    def client() -> None:
        start.wait()
        try:
            with KvdClient(d.socket, register_cuda=False, timeout_s=10) as c:
                c.health()
        except Exception as e:  # noqa: BLE001 - counted
            failures.append(e)

    threads = [threading.Thread(target=client) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    d.kill()
    assert failures == []


def test_kill_9_leftovers_are_removed_by_the_next_daemon_of_any_socket(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    a = DaemonProc(tmp_path / "a", env_extra={"KVD_HOST__PATH": str(shm / f"kvd-{os.getuid()}-a.arena")})
    (tmp_path / "a").mkdir()
    a.start()
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    assert (shm / f"kvd-{os.getuid()}-a.arena").exists() and os.path.exists(a.socket)  # what kill -9 leaves
    b = DaemonProc(tmp_path / "b", env_extra={"KVD_HOST__PATH": str(shm / f"kvd-{os.getuid()}-b.arena")})
    (tmp_path / "b").mkdir()
    b.start()  # another instance, another socket
    try:
        assert not (shm / f"kvd-{os.getuid()}-a.arena").exists() and not os.path.exists(a.socket)
    finally:
        b.kill()
