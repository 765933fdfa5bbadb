"""The daemon inside the unit's sandbox: the system-call filter (SystemCallFilter=, computed from
systemd's own groups) and MemoryDenyWriteExecute=, applied with seccomp and prctl, no systemd needed.
A wrong filter shows in production as EPERM in the middle of a write-back; here every path runs:
start, store, load, flush (encode, LMDB writes), evict, promote (decode), compact, a scrape, a
reload, SIGTERM."""

from __future__ import annotations

import ctypes.util
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from kvd.client import prefix as kvio
from kvd.core import protocol as P
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec
from tests.daemon.sandbox import allowed_syscalls
from tests.daemon_proc import DaemonProc

UNIT = Path(__file__).resolve().parents[2] / "config" / "kvd.service"
ANALYZE = shutil.which("systemd-analyze")
SPEC = ModelSpec("toy", num_layers=2, num_kv_heads=2, head_dim=64, kv_dtype="bfloat16")

pytestmark = pytest.mark.skipif(ANALYZE is None or ctypes.util.find_library("seccomp") is None,
                                reason="needs systemd-analyze (Debian's systemd) and libseccomp")


def _unit_filters() -> list[str]:
    lines = [x.split("=", 1)[1] for x in UNIT.read_text().splitlines() if x.startswith("SystemCallFilter=")]
    assert lines, "the unit has no SystemCallFilter"
    return lines


class SandboxedDaemon(DaemonProc):
    def __init__(self, root: Path, allowed: Path, **kw) -> None:
        super().__init__(root, **kw)
        self.allowed = allowed

    def start(self, timeout: float = 60.0):
        real = sys.executable
        wrapper = self.root / "python-in-sandbox"
        wrapper.write_text(f"#!/bin/sh\nexec {real} -m tests.daemon.sandbox {self.allowed} -- {real} \"$@\"\n")
        wrapper.chmod(0o755)
        sys.executable = str(wrapper)  # DaemonProc starts `sys.executable -m kvd.daemon.service ...`
        try:
            return super().start(timeout)
        finally:
            sys.executable = real


def test_daemon_runs_every_path_under_the_units_syscall_filter_and_wx(tmp_path):
    allowed = allowed_syscalls(ANALYZE, _unit_filters())
    assert "openat" in allowed and "mount" not in allowed and "setrlimit" not in allowed  # @resources is out
    names = tmp_path / "allowed.txt"
    names.write_text("\n".join(sorted(allowed)))
    cfg = tmp_path / "kvd.toml"
    cfg.write_text('[daemon]\nlog_level = "INFO"\n')
    d = SandboxedDaemon(tmp_path, names, args=["--config", str(cfg)]).start()
    try:
        with d.client() as c:
            h = kvio.register(c, SPEC, HeadMap.from_classes("toy", [[True, False]] * 2, sink=4, window=64))
            tokens = list(range(768))
            kv = torch.randn(2, 2, 2, 768, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
            assert kvio.store_prefix(h, tokens, kv).stored == 3
            c.flush(P.FlushRequest())
            c.evict(P.EvictRequest(tier="host"))
            with kvio.load_prefix(h, tokens) as loaded:  # promoted back from the SSD tier: decode, verify
                assert loaded.to_tensor().view(torch.uint8).equal(kv.contiguous().view(torch.uint8))
            c.compact()
        assert b"kvd_build_info" in urllib.request.urlopen(f"http://127.0.0.1:{d.port}/metrics", timeout=10).read()
        cfg.write_text('[daemon]\nlog_level = "DEBUG"\n')
        d.signal(signal.SIGHUP)
        with d.client() as c:
            assert c.health().status == "ok"
    finally:
        code = d.stop()
    log = d.log.read_text()
    assert code == 0 and "Operation not permitted" not in log and "Traceback" not in log, log[-3000:]
    assert "SIGHUP: reloaded daemon.log_level" in log


def test_the_sandbox_refuses_what_the_unit_refuses(tmp_path):
    """The check above means something: outside the filter (setpriority, in @resources) and W+X
    memory fail inside the same sandbox."""
    names = tmp_path / "allowed.txt"
    names.write_text("\n".join(sorted(allowed_syscalls(ANALYZE, _unit_filters()))))
    probe = ("import mmap, os, sys\n"
             "try:\n    os.setpriority(os.PRIO_PROCESS, 0, 1)\nexcept PermissionError:\n    print('setpriority refused')\n"
             "try:\n    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
             "except OSError:\n    print('W+X refused')\n")
    r = subprocess.run([sys.executable, "-m", "tests.daemon.sandbox", str(names), "--", sys.executable, "-c", probe],
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert r.stdout.split("\n")[:2] == ["setpriority refused", "W+X refused"], (r.stdout, r.stderr)
