"""Audit 39 of the tiers: stalls. Every master of a real Redis Cluster stops answering (SIGSTOP, not a
crash: connections stay open and nothing is refused). A daemon's lookups must cost at most
``remote.lookup_deadline_s`` (docs/remote.md), its leases at most their ``wait_s``, its event loop must
keep answering other clients, and closing it must not wait for the stuck cluster. (Found bounded by
audit 39; kept as the check of those bounds.)"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

from kvd.daemon.api import STORE
from tests.store.test_defects import Api
from tests.store.test_remote_hosts import MODEL, remote

DEADLINE_S = 0.05  # remote.lookup_deadline_s's default
SLACK_S = 0.4  # a loaded 2-core CI machine's scheduling, not a bound of kvd's


async def _worst_health(api: Api, stop: asyncio.Event) -> float:
    worst = 0.0
    while not stop.is_set():
        t = time.monotonic()
        assert (await api.http.get("/v1/health")).status == 200
        worst = max(worst, time.monotonic() - t)
        await asyncio.sleep(0.01)
    return worst


async def test_a_stopped_cluster_costs_lookups_their_deadline_and_leases_their_wait(tmp_path, redis_cluster_factory):
    cluster = redis_cluster_factory()
    prefix = "s" + uuid.uuid4().hex[:8]
    apis: list[Api] = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        apis.append(await Api(tmp_path / name, {"remote": remote(cluster, prefix)}).start(MODEL))
    a, b = apis
    stopped: list[int] = []
    try:
        seqs = [await a.store_seq(40 + i, chunks=2) for i in range(6)]
        await a.app[STORE].background.step()  # written through
        for hs, _ in seqs[3:]:  # b indexes these as the cluster's
            # A lookup waits at most lookup_deadline_s (50 ms) for the cluster; on a loaded 2-core machine
            # (the full suite) the first may give up, and the find it started still indexes them.
            for _ in range(50):
                if (await b.lookup(hs))["num_prefix_hits"] == 2:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("host b never found host a's entries in the cluster")
        for victim in cluster.masters():
            cluster.procs[victim].send_signal(signal.SIGSTOP)
            stopped.append(victim)
        stop = asyncio.Event()
        health = asyncio.create_task(_worst_health(b, stop))
        for hs, _ in seqs[:3]:  # not in b's index: asks the stopped cluster
            t = time.monotonic()
            assert (await b.lookup(hs))["num_prefix_hits"] == 0
            assert time.monotonic() - t < DEADLINE_S + SLACK_S
        for hs, _ in seqs[3:]:  # in b's index: promotions from the stopped cluster
            t = time.monotonic()
            status, _ = await b.read_back(hs, wait_s=1.0)
            assert time.monotonic() - t < 1.0 + SLACK_S
            assert "ok" not in status
        stop.set()
        assert await health < SLACK_S
        t = time.monotonic()
        await b.close()
        apis.remove(b)
        assert time.monotonic() - t < 2 * b.settings.daemon.shutdown_timeout_s
    finally:
        for p in stopped:
            cluster.procs[p].send_signal(signal.SIGCONT)
        for api in apis:
            await api.close()
