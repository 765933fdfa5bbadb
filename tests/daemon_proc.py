"""Start the real ``kvd`` entry point as a subprocess on a temporary socket, arena and port."""

from __future__ import annotations

import os
import signal as _signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvd.client.client import KvdClient
from kvd.core.errors import DaemonUnavailable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DaemonProc:
    root: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    wrapper: list[str] = field(default_factory=list)  # a command the daemon runs under (unshare ...)
    proc: subprocess.Popen | None = None
    port: int = 0

    @property
    def socket(self) -> str:
        return str(self.root / "kvd.sock")

    @property
    def log(self) -> Path:
        return self.root / "kvd.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVD_")}
        env.update({
            "KVD_HOST__PATH": str(self.root / "arena"),
            "KVD_HOST__CAPACITY_BYTES": "64MiB",
            "KVD_SSD__PATH": str(self.root / "ssd"),
            "KVD_SSD__CAPACITY_BYTES": "256MiB",
            "KVD_DAEMON__SHUTDOWN_TIMEOUT_S": "5",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.env_extra)
        return env

    def start_in_background(self) -> DaemonProc:
        """Start the process and return at once (``start`` waits until it answers)."""
        self.port = self.port or free_port()
        cmd = [*self.wrapper, sys.executable, "-m", "kvd.daemon.service", "--socket", self.socket,
               "--metrics-addr", f"127.0.0.1:{self.port}", *self.args]
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        return self

    def start(self, timeout: float = 30.0) -> DaemonProc:
        self.start_in_background()
        deadline = time.monotonic() + timeout
        c = KvdClient(self.socket, timeout_s=1.0, register_cuda=False)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"kvd exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
                try:
                    c.health()
                    return self
                except DaemonUnavailable:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"kvd did not come up:\n{self.log.read_text()[-3000:]}") from None
                    time.sleep(0.05)
        finally:
            c.close()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = _signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self, **kw) -> KvdClient:
        kw.setdefault("register_cuda", False)
        return KvdClient(self.socket, **kw)
