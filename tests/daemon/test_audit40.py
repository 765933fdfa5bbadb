"""Audit 40: what one tenant can learn of another's KV through the parts shared beyond one arena.

Tenants as real uids in child processes (``tests.daemon.test_tenants``; needs root), real daemons and
the real Redis Cluster of the remote tier.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from kvd.core import index_file as F
from tests.daemon.test_tenants import UID_A, UID_B, attempt, forked_as, read_line, store_as
from tests.daemon_proc import DaemonProc

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as two users needs root")


def _host(root: Path, cluster, prefix: str, uid: int, ns: str) -> DaemonProc:
    """A daemon with one tenant (``uid``, namespace ``ns``) on the shared cluster under ``prefix``."""
    root.mkdir(parents=True)
    os.chmod(root, 0o755)  # the tenant traverses to the socket and its arena
    cfg = root / "kvd.toml"
    cfg.write_text(textwrap.dedent(f"""
        [daemon]
        socket_mode = "0666"
        [ssd]
        enabled = false
        [remote]
        enabled = true
        required = true
        startup_nodes = {json.dumps(cluster.startup_nodes)}
        key_prefix = "{prefix}"
        [tenants.t{uid}]
        uids = [{uid}]
        gids = [{uid}]
        namespaces = ["{ns}"]
        arena_bytes = "16MiB"
    """))
    return DaemonProc(root, env_extra={"KVD_HOST__CAPACITY_BYTES": "16MiB"}, args=["--config", str(cfg)]).start()


def probe_default_index(w, index: str, fp: str, hashes: list[str]) -> None:
    """Tenant B on host 2: reads the daemon's default lookup index and probes it for A's entries."""
    out: dict = {}

    def probe() -> None:
        m, fd = F.map_file(index, writable=False)
        os.close(fd)
        out["found"] = int((m.probe(F.tags_of(F.salt_u64("a", fp), hashes)) != 0).sum())

    attempt(out, "open", probe)
    w.send(out)


def test_another_hosts_tenant_entries_are_not_published_to_every_client(redis_cluster):
    """Host 2 adopts at start every entry the cluster holds, of any namespace; those of namespaces no
    tenant of host 2 lists fall in its default partition, whose lookup index had the socket's mode:
    every client of host 2 (tenant B) could open it and test, tag by tag, whether host 1's tenant A
    had stored a given prompt (hashes are of the tokens, the tags' salt of namespace and model)."""
    base = Path(tempfile.mkdtemp(prefix="kvd-audit40-"))
    os.chmod(base, 0o755)
    prefix = f"kvd-a40-{os.getpid()}-{time.monotonic_ns()}"
    hosts = []
    try:
        h1 = _host(base / "h1", redis_cluster, prefix, UID_A, "a")
        hosts.append(h1)
        pa, fa = forked_as(UID_A, store_as, h1.socket, "a")
        a = read_line(fa)
        pa.join(30)
        assert a["stored"] == 2
        deadline = time.monotonic() + 20  # no head map: written through to the cluster after the commit
        with h1.client() as c:
            while next(t for t in c.stats().tiers if t.name == "remote").num_records < 2:
                assert time.monotonic() < deadline, "host 1 never wrote A's entries to the cluster"
                time.sleep(0.1)
        h2 = _host(base / "h2", redis_cluster, prefix, UID_B, "b")
        hosts.append(h2)
        with h2.client() as c:  # host 2's scan at start adopted them (root: an admin sees every namespace)
            assert {e.namespace for e in c.entries().entries} == {"a"}
        index = str(base / "h2" / "arena.index")
        assert os.path.exists(index)
        pb, fb = forked_as(UID_B, probe_default_index, index, a["fingerprint"], a["hashes"])
        res = read_line(fb)
        pb.join(30)
        assert res["open"] == "OSError 13", res  # EACCES: B learns nothing of A's entries from it
    finally:
        for h in hosts:
            h.kill()
        shutil.rmtree(base, ignore_errors=True)
