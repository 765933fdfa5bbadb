"""A real Redis Cluster on loopback for tests and benchmarks: 3 masters + 3 replicas, torn down after.

Each node is a ``redis-server`` process (Debian's package; the Makefile installs it) in its own
directory under a temp dir, on free loopback ports, with cluster mode on and persistence off. The
cluster is formed with ``redis-cli --cluster create ... --cluster-replicas 1`` and waited for until
every slot is served (``cluster_state:ok``).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = 6


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free now whose cluster-bus ports (+10000) are free too."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        out.append(port)
    return out


class RedisCluster:
    def __init__(self, root: Path, *, nodes: int = NODES, requirepass: str | None = None,
                 maxmemory: str = "256mb") -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server / redis-cli not found; `make test` installs Debian's redis-server")
        self.root = Path(root)
        self.ports = free_ports(nodes)
        self.password = requirepass
        self.maxmemory = maxmemory  # per node; allkeys-lru beyond it, as docs/remote.md advises
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def startup_nodes(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def _args(self, port: int) -> list[str]:
        d = self.root / str(port)
        d.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout", "1000",
                "--dir", str(d), "--save", "", "--appendonly", "no", "--protected-mode", "no",
                "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru", "--logfile", str(d / "log"),
                # a replica may take over however long its master has been gone (tests kill masters)
                "--cluster-replica-validity-factor", "0"]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        return args

    def start_node(self, port: int) -> None:
        self.procs[port] = subprocess.Popen(self._args(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_port(port)

    def start(self, attempts: int = 3) -> RedisCluster:
        """Start the nodes and form the cluster. A failure (a port taken between ``free_ports`` and the
        node's bind, under a busy machine) stops every node started so far and tries again on fresh
        ports: before, such a failure left five redis-servers running after the test."""
        for attempt in range(attempts):
            try:
                return self._start()
            except (subprocess.SubprocessError, TimeoutError, OSError):
                self.stop()
                if attempt == attempts - 1:
                    raise
                self.ports = free_ports(len(self.ports))
        raise AssertionError("unreachable")

    def _start(self) -> RedisCluster:
        for p in self.ports:
            self.start_node(p)
        cmd = ["redis-cli", "--cluster", "create", *self.startup_nodes, "--cluster-replicas", "1", "--cluster-yes"]
        if self.password:
            cmd[1:1] = ["-a", self.password, "--no-auth-warning"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        self.wait_ok()
        self._wait_replicas_synced()
        return self

    def _wait_replicas_synced(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = [self.cli(p, "info", "replication") for p in self.procs]
            replicas = [i for i in infos if "role:slave" in i]
            if len(replicas) == len(self.procs) // 2 and all("master_link_status:up" in i for i in replicas):
                return
            time.sleep(0.1)
        raise TimeoutError("the Redis cluster's replicas did not sync")

    def wait_replicated(self, master: int, timeout: float = 10.0) -> None:
        """Until ``master``'s replicas have acknowledged its whole replication stream (Redis replicates
        asynchronously: a write acknowledged just before the master dies may otherwise be lost)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = dict(line.split(":", 1) for line in self.cli(master, "info", "replication").splitlines()
                        if ":" in line)
            head = int(info.get("master_repl_offset", "0"))
            acked = [int(dict(kv.split("=") for kv in v.split(",")).get("offset", -1))
                     for k, v in info.items() if k.startswith("slave") and k[5:].isdigit()]
            if acked and min(acked) >= head:
                return
            time.sleep(0.05)
        raise TimeoutError(f"the replicas of {master} did not catch up")

    def cli(self, port: int, *args: str) -> str:
        cmd = ["redis-cli", "-p", str(port)]
        if self.password:
            cmd += ["-a", self.password, "--no-auth-warning"]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=10).stdout

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says ``cluster_state:ok`` and every slot is served by a live master
        (after a kill: once the dead master is marked failed and its replica promoted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [p for p, proc in self.procs.items() if proc.poll() is None]
            if all("cluster_state:ok" in self.cli(p, "cluster", "info") for p in alive) and self._slots_live(alive):
                return
            time.sleep(0.2)
        raise TimeoutError("the Redis cluster did not reach cluster_state:ok")

    def _slots_live(self, alive: list[int]) -> bool:
        served = 0
        for line in self.cli(alive[0], "cluster", "nodes").splitlines():
            parts = line.split()
            port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
            if "master" in parts[2] and len(parts) > 8:
                if port not in alive or "fail" in parts[2]:
                    return False
                for rng in parts[8:]:
                    lo, _, hi = rng.partition("-")
                    served += int(hi or lo) - int(lo) + 1
        return served == 16384

    def evicted_keys(self) -> int:
        """Keys the live nodes' LRU has evicted since they started (``INFO stats``)."""
        total = 0
        for p, proc in self.procs.items():
            if proc.poll() is None:
                for line in self.cli(p, "info", "stats").splitlines():
                    if line.startswith("evicted_keys:"):
                        total += int(line.split(":")[1])
        return total

    def masters(self) -> list[int]:
        out = []
        for line in self.cli(self.ports[0], "cluster", "nodes").splitlines():
            parts = line.split()
            if "master" in parts[2] and "fail" not in parts[2]:
                out.append(int(parts[1].split("@")[0].rsplit(":", 1)[1]))
        return out

    def kill(self, port: int) -> None:
        """SIGKILL one node (a crash); its replica is promoted after the node timeout."""
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def command_calls(self, command: str) -> int:
        """Calls of ``command`` (e.g. ``get``) served by the whole cluster so far (INFO commandstats)."""
        total = 0
        for p, proc in self.procs.items():
            if proc.poll() is not None:
                continue
            for line in self.cli(p, "info", "commandstats").splitlines():
                if line.startswith(f"cmdstat_{command}:"):
                    total += int(line.split("calls=")[1].split(",")[0])
        return total

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait()
        self.procs.clear()

    @staticmethod
    def _wait_port(port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {port} did not start")
