"""A head map under SGLang's tensor parallelism: each rank's backend registers its own heads' part of
the whole model's map (checked against the whole model's fingerprint first), as vLLM's connector does.
SGLang's own ``HiCacheStorageConfig`` and host pool; SmolLM2's 3 KV heads over 3 ranks, one each."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvd.core.errors import ConfigError, HeadMapError
from kvd.core.headmap import HeadMap
from tests.connectors.sglang.conftest import extra_config
from tests.connectors.sglang.sglang_env import make_pool

pytestmark = pytest.mark.model
HEAD_MAP = Path(__file__).resolve().parents[3] / "kvd" / "data" / "heads" / "smollm2-135m.json"


def _backend(daemon, smollm2_dir, *, rank: int, size: int, pp_size: int = 1, head_map: Path = HEAD_MAP, **kw):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    from kvd.connectors.sglang import KvdHiCacheStorage

    cfg = HiCacheStorageConfig(tp_rank=rank, tp_size=size, pp_rank=0, pp_size=pp_size, attn_cp_rank=0,
                               attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                               is_page_first_layout=False, model_name=str(smollm2_dir),
                               extra_config=extra_config(daemon.socket, head_map=str(head_map), **kw))
    return KvdHiCacheStorage(cfg, {})


def test_each_rank_registers_its_heads_column(sglang_version, daemon, smollm2_dir):
    whole = HeadMap.load(HEAD_MAP)
    for rank in range(3):
        b = _backend(daemon, smollm2_dir, rank=rank, size=3)
        try:
            b.register_mem_pool_host(make_pool("page_head", num_pages=32, heads=1))
            b.io.session.handle()  # registers
        finally:
            b.close()
    with daemon.client() as c:
        models = {m.model_id[-7:]: m for m in c.models().models if m.model_id.endswith("/3]")}
    assert sorted(models) == ["[tp0/3]", "[tp1/3]", "[tp2/3]"]
    for r in range(3):
        m = models[f"[tp{r}/3]"]
        assert (m.num_kv_heads, m.head_map_method) == (1, whole.method)
        assert m.num_global_heads == sum(row[r] for row in whole.class_grid())


def test_a_map_that_does_not_fit_the_whole_model_or_pp_is_refused(sglang_version, daemon, smollm2_dir, tmp_path):
    other = HeadMap.load(HEAD_MAP).model_copy(update={"fingerprint": "0" * 32})
    other.save(tmp_path / "other.json")
    b = _backend(daemon, smollm2_dir, rank=0, size=3, head_map=tmp_path / "other.json")
    with pytest.raises(HeadMapError, match="profiled for the model with fingerprint"):
        b.register_mem_pool_host(make_pool("page_head", num_pages=32, heads=1))
    b = _backend(daemon, smollm2_dir, rank=0, size=3, pp_size=2)
    with pytest.raises(ConfigError, match="tensor parallelism only"):
        b.register_mem_pool_host(make_pool("page_head", num_pages=32, heads=1))
