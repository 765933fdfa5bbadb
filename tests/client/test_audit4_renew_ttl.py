"""keep_alive after the daemon's lease TTL was lowered by a reload (audit 4): the client renews on the
TTL it was told at open, the daemon renews by its current one, so the hold lapses between renewals
while keep_alive still says it is held, and the next copy reads slots the daemon may have reused."""

from __future__ import annotations

import signal
import time

from kvd.client.client import KvdClient
from kvd.client.prefix import register
from kvd.client.transfer import open_lease
from kvd.core.errors import NotFound
from tests.client.test_transfer import HM, SPEC, C, kv_for, store
from tests.daemon_proc import DaemonProc


def test_keep_alive_never_vouches_for_a_lease_lapsed_under_a_reloaded_ttl(tmp_path):
    cfg = tmp_path / "kvd.toml"
    cfg.write_text("[host]\nlease_ttl_s = 6.0\n")
    d = DaemonProc(tmp_path, args=["--config", str(cfg)]).start()
    try:
        with KvdClient(d.socket, register_cuda=False) as c:
            h = register(c, SPEC, HM, namespace="ttl")
            le = open_lease(h, store(h, list(range(C)), kv_for(C, 3)), min_tokens=[C])
            cfg.write_text("[host]\nlease_ttl_s = 1.0\n")  # the operator lowers the TTL
            d.signal(signal.SIGHUP)
            time.sleep(2.1)
            le.keep_alive()  # renewed (due at 6/3 s): the daemon now holds it 1 s
            time.sleep(1.7)  # past that second and an expiry pass; not yet due by the client's 2 s
            try:
                le.keep_alive()
            except NotFound:
                return  # told: fine
            assert c.stats().leases_held == 1, "keep_alive passed, but the daemon had taken the lease back"
    finally:
        d.kill()
