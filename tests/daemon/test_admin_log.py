"""Admin actions leave one INFO line each, naming the action, its scope, its result and who asked
(the peer's pid, uid and gid from SO_PEERCRED). They left none before issue 16."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from kvd.client import prefix as kvio
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("toy", num_layers=2, num_kv_heads=2, head_dim=32, kv_dtype="bfloat16")


def test_each_admin_action_is_logged_with_who_asked(tmp_path):
    d = DaemonProc(tmp_path).start()
    try:
        with d.client() as c:
            h = kvio.register(c, SPEC, HeadMap.from_classes("toy", [[True, False]] * 2, sink=4, window=64))
            kvio.store_prefix(h, list(range(512)), torch.ones(2, 2, 2, 512, 32, dtype=torch.bfloat16))
            hashes = h.hashes(list(range(512)))
        kvctl = [sys.executable, "-m", "kvd.cli.kvctl", "--socket", d.socket]
        for args in (["pin", hashes[0]], ["unpin", hashes[0]], ["flush"], ["evict", "--tier", "host", "--dry-run"],
                     ["compact"], ["delete", hashes[1]]):
            subprocess.run([*kvctl, *args], check=True, capture_output=True, timeout=60)
    finally:
        assert d.stop() == 0
    lines = [x for x in d.log.read_text().splitlines() if " kvd.admin: " in x]
    me = f"uid {os.getuid()} gid {os.getgid()}"
    expected = [r"INFO kvd\.admin: admin: pin 1 entries \(namespace default, model \w{12}\) by pid \d+ " + me + ": 1 pinned",
                r"unpin 1 entries .*: 1 unpinned",
                r"flush 1 entries to ssd .*: 1 flushed",  # kvctl flushes the host-only entries by hash
                r"evict \(dry run\) from host \(every namespace\) by .*: 2 entries, \d+ bytes",
                r"compact ssd by .*: \d+ bytes reclaimed",
                r"delete 1 entries \(namespace default, model \w{12}\) by pid \d+ " + me + ": 1 deleted"]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected):
        assert re.search(pattern, line), (pattern, line)


def test_debug_level_logs_each_request(tmp_path):
    """DEBUG added nothing to INFO; now each control request leaves a line with its route, status and time."""
    d = DaemonProc(tmp_path, args=["--log-level", "DEBUG"]).start()
    try:
        with d.client() as c:
            c.health()
            c.stats()
    finally:
        assert d.stop() == 0
    log = d.log.read_text()
    assert re.search(r"DEBUG kvd\.daemon\.api: GET /v1/stats -> 200 in \d+\.\d+ ms", log), log[-2000:]
