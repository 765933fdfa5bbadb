"""Audit 39 of the daemon: stalls. The real ``kvd`` process with its real LMDB tier, whose writes are
made to stall inside the tier (a ``sitecustomize`` on the daemon's path holds ``SsdTier.write_many``
in the tier's gate, as a disk that stopped answering would), must stay bounded: other clients are
answered, and a SIGTERM ends it within twice ``daemon.shutdown_timeout_s`` (docs/deploy.md)."""

from __future__ import annotations

import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kvd.client import prefix as kvio
from kvd.core.keys import ModelSpec
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("audit39-daemon", num_layers=1, num_kv_heads=2, head_dim=16, kv_dtype="bfloat16")
REPO = Path(__file__).resolve().parents[2]
STALL = textwrap.dedent("""
    import os, time
    if os.environ.get("AUDIT39_STALL_MARK"):
        from kvd.tiers import ssd
        _write_many = ssd.SsdTier.write_many

        def stalled(self, items):
            items = list(items)
            with self._gate:  # an operation in flight, as a write waiting on the device
                open(os.environ["AUDIT39_STALL_MARK"], "w").close()
                time.sleep(float(os.environ["AUDIT39_STALL_S"]))
            return _write_many(self, items)

        ssd.SsdTier.write_many = stalled
""")


@pytest.fixture
def stalled_daemon(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STALL)
    mark = tmp_path / "stalled"
    d = DaemonProc(tmp_path / "d", env_extra={
        "PYTHONPATH": f"{site}:{REPO}", "AUDIT39_STALL_MARK": str(mark), "AUDIT39_STALL_S": "60",
        "KVD_SSD__ADMIT_AFTER": "0", "KVD_DAEMON__SHUTDOWN_TIMEOUT_S": "2"})
    d.root.mkdir()
    d.start()
    yield d, mark
    d.kill()


def test_sigterm_while_an_ssd_write_is_stuck_exits_within_twice_the_shutdown_timeout(stalled_daemon):
    """The tiers were closed on the event loop after the requests: the SSD tier's close waited for the
    stuck write (its gate), then the I/O pool and the interpreter's exit joined its thread, so the
    daemon outlived SIGTERM for as long as the write (here 60 s; forever on a dead device), against
    the documented 2 x shutdown_timeout_s (4 s here)."""
    d, mark = stalled_daemon
    c = d.client(timeout_s=2.0)
    try:
        h = kvio.register(c, SPEC)
        tokens = list(range(512))
        assert kvio.store_prefix(h, tokens, torch.randn(1, 2, 2, 512, 16).to(torch.bfloat16)).stored == 2
        t0 = time.monotonic()
        while not mark.exists():  # the write-back (every entry admitted at once) reached the SSD tier
            assert time.monotonic() - t0 < 10, "no SSD write-back started"
            time.sleep(0.02)
        t = time.monotonic()
        c.health()  # the event loop answers meanwhile
        assert time.monotonic() - t < 0.5
        answer = kvio.lookup_prefix(h, tokens)
        assert answer.num_prefix_hits == 2
    finally:
        c.close()
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    try:
        rc = d.proc.wait(12)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kvd still running {time.monotonic() - t0:.1f} s after SIGTERM (bound 2 x 2 s)")
    took = time.monotonic() - t0
    assert rc == 0
    assert took < 2 * 2 + 1.5, f"kvd took {took:.1f} s to stop"
    assert "still stuck" in d.log.read_text()
