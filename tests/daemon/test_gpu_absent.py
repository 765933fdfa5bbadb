"""``[gpu] enabled = true`` on a machine without a GPU: the tier is absent, torch is never loaded, and
everything works as without it — a client that asks for GPU extents gets arena extents."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvd.client.gpu_pool import GpuPools
from kvd.client.prefix import load_prefix, register, store_prefix
from kvd.core.keys import ModelSpec
from kvd.tiers.gpu import gpu_present
from tests.daemon_proc import DaemonProc

pytestmark = pytest.mark.skipif(gpu_present(), reason="checks a host without an NVIDIA GPU")

SPEC = ModelSpec("toy-nogpu", num_layers=2, num_kv_heads=2, head_dim=16, kv_dtype="bfloat16")


def test_gpu_enabled_without_a_gpu_serves_without_the_tier_and_without_torch(tmp_path):
    d = DaemonProc(tmp_path, env_extra={"KVD_GPU__ENABLED": "true"}).start()
    try:
        maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
        assert "libtorch" not in maps  # the daemon never loaded torch
        with d.client() as c:
            assert [t.name for t in c.stats().tiers] == ["host", "ssd"]
            # a handle that would map the GPU pool (its pools are never opened: the daemon has none)
            h = register(c, SPEC, namespace="nogpu", gpu=GpuPools())
            kv = torch.randn(2, 2, 2, 512, 16).bfloat16()
            assert store_prefix(h, list(range(512)), kv).stored == 2
            with load_prefix(h, list(range(512))) as got:
                assert got.num_tokens == 512 and torch.equal(got.to_tensor(), kv)
    finally:
        d.stop()
    log = d.log.read_text()
    assert "gpu.enabled = true, but this host has no NVIDIA GPU" in log
