"""Pages stored by one SGLang process are found by another (restart reuse), and daemon failures
mid-call give misses, never partial pages marked present."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvd.connectors.sglang.pages import HostPages
from tests.connectors.sglang.conftest import extra_config
from tests.connectors.sglang.sglang_env import Controller, fill_random, make_pool, page_keys

P = 64
REPO = Path(__file__).resolve().parents[3]


def run_pool(*args) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "tests.connectors.sglang.pool_proc", *map(str, args)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_a_page_stored_by_one_process_is_loaded_by_another(sglang_version, daemon, tmp_path):
    """Process 1 (page_first pool) stores 6 pages and exits; process 2 (a restarted SGLang, page_head
    pool) finds and loads all of them, bit-exact."""
    run_pool("store", daemon.socket, "page_first", 7, 6, tmp_path / "a.pt")
    run_pool("load", daemon.socket, "page_head", 7, 6, tmp_path / "b.pt")
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a["tokens"] == b["tokens"] == 6 * P
    assert torch.equal(a["pages"].view(torch.int16), b["pages"].view(torch.int16))


@pytest.fixture
def own_daemon(tmp_path):
    from tests.daemon_proc import DaemonProc

    d = DaemonProc(tmp_path / "kvd", env_extra={"KVD_HOST__CAPACITY_BYTES": "512MiB"})
    (tmp_path / "kvd").mkdir()
    yield d.start()
    d.proc.send_signal(signal.SIGCONT)
    d.kill()


def stored_batch(own_daemon, num_pages: int, **cfg):
    """A controller whose backend holds ``num_pages`` stored pages, and fresh all-zero host pages."""
    c = Controller(make_pool("page_first", num_pages=2 * num_pages, page_size=P), extra_config(own_daemon.socket, **cfg))
    toks = torch.randint(3, 49000, (num_pages * P,), generator=torch.Generator().manual_seed(9)).tolist()
    keys = page_keys(toks, P)
    idx = c.pool.alloc(num_pages * P)
    fill_random(c.pool, idx, seed=9)
    assert c.backend.batch_set_v1(keys, idx) == [True] * num_pages
    dst = c.pool.alloc(num_pages * P)
    c.pool.kv_buffer[:, dst] = 0
    return c, keys, dst


def test_daemon_killed_mid_batch_get_v1_gives_misses(sglang_version, own_daemon):
    """128 pages (one SGLang batch, 184 MB): the daemon is SIGKILLed once the first page has been
    copied into the pool and before the last one is; the call reports every page missing."""
    c, keys, dst = stored_batch(own_daemon, 128)
    pages = HostPages(c.pool)
    first, last = pages.kv(dst[0].item()), pages.kv(dst[-P].item())
    seen = {}

    def kill_mid_copy():
        deadline = time.monotonic() + 60
        while not bool(first.view(torch.int16).any()) and time.monotonic() < deadline:
            pass
        own_daemon.proc.kill()
        seen["last_page_written"] = bool(last.view(torch.int16).any())

    try:
        t = threading.Thread(target=kill_mid_copy)
        t.start()
        got = c.backend.batch_get_v1(keys, dst)
        t.join()
        assert not seen["last_page_written"], "the kill came after the copy: not a mid-call kill"
        assert got == [False] * 128
        assert c.backend.counters["load_unconfirmed_pages"] == 128
    finally:
        c.close()


def test_hung_daemon_gives_misses_within_the_timeout(sglang_version, own_daemon):
    c, keys, dst = stored_batch(own_daemon, 4, timeout_s=0.5, retry_interval_s=0.2, max_retry_interval_s=0.2)
    try:
        own_daemon.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        assert c.backend.batch_get_v1(keys, dst) == [False] * 4
        assert c.backend.batch_exists(keys) == 0  # breaker open: not even asked
        assert time.monotonic() - t0 < 3.0
        own_daemon.proc.send_signal(signal.SIGCONT)
        time.sleep(0.3)
        assert c.backend.batch_get_v1(keys, dst) == [True] * 4
    finally:
        c.close()
