"""Each tenant's arena is readable by its group (mode 0660), so that group must be the tenant's own
(audit 13's suspicion): a tenant listed by uid only left its arena in the daemon's group, which every
client that reaches the socket is in (the shipped unit's engines join it), so any tenant could map it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvd.core.config import load_settings
from kvd.core.errors import ConfigError
from kvd.daemon.tenants import Tenants


def tenants(**by_name) -> Tenants:
    return Tenants(load_settings(None, environ={}, overrides={"tenants": by_name}))


def test_a_tenant_arena_gets_a_group_of_its_own():
    ok = tenants(a={"uids": [4001], "gids": [5001], "namespaces": ["a"]},
                 b={"uids": [4002], "group": 5002, "namespaces": ["b"]})
    assert {n: s.gid for n, s in ok.arenas(Path("/dev/shm/k.arena"), 1 << 20).items()} == {
        "": None, "a": 5001, "b": 5002}
    with pytest.raises(ConfigError, match="tenants.a: its arena needs a group of its own"):
        tenants(a={"uids": [4001], "namespaces": ["a"]})
    with pytest.raises(ConfigError, match="the daemon's group"):
        tenants(a={"uids": [4001], "group": os.getegid(), "namespaces": ["a"]})
    with pytest.raises(ConfigError, match="both give their arena group 5001"):
        tenants(a={"uids": [4001], "gids": [5001], "namespaces": ["a"]},
                b={"uids": [4002], "group": 5001, "namespaces": ["b"]})
