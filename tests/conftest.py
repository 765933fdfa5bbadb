"""Shared test setup.

Triton kernels run through the interpreter on machines without a GPU: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- real model fixtures (issue 5) ------------------------------------------------------------
# One conversion and one fp32 load per session, shared by every test marked ``model``. The model
# object is shared: treat it as read-only, and undo anything you change (``apply_head_map`` does).
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """Path of the converted SmolLM2-135M-Instruct safetensors dir (converted on first use, ~30 s)."""
    from kvd.testing.models import smollm2_dir as _smollm2_dir

    return _smollm2_dir()


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_dir):
    """``(model, tokenizer)``: SmolLM2 loaded once in fp32, eval mode."""
    from kvd.calibrate.model import load_causal_lm

    return load_causal_lm(smollm2_dir)


# ---- a real Redis Cluster (issue 14) -----------------------------------------------------------
# One 6-node cluster (3 masters + 3 replicas) on loopback for the session; tests that kill nodes make
# their own (``redis_cluster_factory``). Keys are prefixed per test, so tests never see each other's.


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    from tests.redis_cluster import RedisCluster

    cluster = RedisCluster(tmp_path_factory.mktemp("redis")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_factory(tmp_path):
    from tests.redis_cluster import RedisCluster

    made = []

    def make(**kw):
        c = RedisCluster(tmp_path / f"redis{len(made)}", **kw).start()
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
