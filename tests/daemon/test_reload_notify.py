"""SIGHUP under systemd's notify protocol: RELOADING=1 (with MONOTONIC_USEC), then READY=1 with a
STATUS saying what changed; a failed reload ends in READY=1 too (the daemon keeps serving) with
ERRNO and a STATUS that says why. The daemon sent nothing around reloads before issue 16."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from tests.daemon_proc import DaemonProc


@pytest.fixture
def notify(tmp_path):
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(30)
    yield path, s
    s.close()


def _next(sock, key: str) -> dict[str, str]:
    """The next datagram carrying ``key`` (WATCHDOG=1 pings may come between)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
        if key in fields:
            return fields
    raise AssertionError(f"no {key} from the daemon")


def test_reload_brackets_with_reloading_and_ready_and_reports_failure(tmp_path, notify):
    path, sock = notify
    cfg = tmp_path / "kvd.toml"
    cfg.write_text('[daemon]\nlog_level = "INFO"\n')
    d = DaemonProc(tmp_path, env_extra={"NOTIFY_SOCKET": str(path)}, args=["--config", str(cfg)]).start()
    try:
        assert _next(sock, "READY")["STATUS"].startswith("serving on")
        cfg.write_text('[daemon]\nlog_level = "DEBUG"\n')
        d.signal(signal.SIGHUP)
        first = _next(sock, "RELOADING")
        assert int(first["MONOTONIC_USEC"]) > 0
        ready = _next(sock, "READY")
        assert "reloaded daemon.log_level" in ready["STATUS"] and ready["ERRNO"] == "0"

        cfg.write_text('[daemon]\nlog_level = "LOUD"\n')
        d.signal(signal.SIGHUP)
        _next(sock, "RELOADING")
        failed = _next(sock, "READY")
        assert "reload failed" in failed["STATUS"] and "log_level" in failed["STATUS"] and failed["ERRNO"] == "22"
        with d.client() as c:  # still serving, on the configuration it had
            assert c.config()["daemon"]["log_level"] == "DEBUG"
    finally:
        assert d.stop() == 0
    assert "SIGHUP: configuration not reloaded" in d.log.read_text()
