"""Fixtures of the SGLang backend's tests: SGLang itself (skipped where it is not installed) and a daemon."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sglang_version():
    pytest.importorskip("sglang")
    from tests.connectors.sglang.sglang_env import import_sglang

    return import_sglang()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from tests.daemon_proc import DaemonProc

    d = DaemonProc(tmp_path_factory.mktemp("kvd"), env_extra={"KVD_HOST__CAPACITY_BYTES": "256MiB"}).start()
    yield d
    d.kill()


def extra_config(socket: str, **kw) -> dict:
    """The extra-config JSON a user writes (docs/sglang.md), as a dict."""
    return {"backend_name": "kvd", "module_path": "kvd.connectors.sglang", "class_name": "KvdHiCacheStorage",
            "interface_v1": 1, "socket": socket, "namespace": "sglang-test", **kw}
