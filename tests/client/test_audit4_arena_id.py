"""A lease or reservation answered in one arena must be mapped in that arena, never another one the
client happens to have mapped (audit 4): an admin client maps the default arena, but its reservations
and leases in a tenant's namespace are answered in that tenant's arena (``arena_id`` differs)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from kvd.client.client import KvdClient
from kvd.client.prefix import register
from kvd.client.transfer import open_lease, reserve
from kvd.core.errors import DaemonUnavailable
from tests.client.test_transfer import HM, SPEC, entries, kv_for, store
from tests.daemon_proc import DaemonProc


@pytest.fixture
def tenant_daemon(tmp_path):
    cfg = tmp_path / "kvd.toml"
    cfg.write_text(textwrap.dedent("""
        [ssd]
        enabled = false
        [tenants.a]
        uids = [4242]
        gids = [4242]
        namespaces = ["a", "a:*"]
        arena_bytes = "16MiB"
    """))
    d = DaemonProc(tmp_path, env_extra={"KVD_HOST__CAPACITY_BYTES": "16MiB"}, args=["--config", str(cfg)]).start()
    yield d
    d.kill()


def test_an_admin_writing_a_tenants_namespace_never_writes_the_default_arena(tenant_daemon):
    with KvdClient(tenant_daemon.socket, register_cuda=False) as c:  # root: an admin, maps the default arena
        h0 = register(c, SPEC, HM, namespace="shared")
        toks0, kv0 = list(range(256)), kv_for(256, 1)
        store(h0, toks0, kv0)  # an entry in the default arena, at its first slots
        ha = register(c, SPEC, HM, namespace="a")
        toks, kv = list(range(1000, 1256)), kv_for(256, 2)
        try:
            res = reserve(ha, entries(ha, toks))
        except DaemonUnavailable:
            res = None  # refusing is fine; mapping the wrong arena is not
        if res is not None:
            assert c.arena().arena_id == res.arena_id, "reservation views over another arena than answered"
            res.entry(0).write_from(kv, 0)
            res.commit()
        # the default namespace's entry still reads back exactly as committed
        with open_lease(h0, h0.hashes(toks0), verify=False) as le:
            out = torch.zeros_like(kv0)
            le.entry(0).read_into(out)
        assert torch.equal(out, kv0), "another namespace's entry was overwritten through the wrong arena"
        assert c.stats().reservations_open == 0  # a refused reservation is given back
