"""Ranks of a parallel SGLang server key only the KV they hold: a page stored by one shard is never
found by a shard that holds other heads or layers, whichever server it belongs to."""

from __future__ import annotations

import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

from kvd.connectors.sglang.storage import KvdHiCacheStorage
from tests.connectors.sglang.conftest import extra_config
from tests.connectors.sglang.sglang_env import fill_random, make_pool, page_keys

P = 64


@pytest.fixture
def backend(sglang_version, daemon):
    made = []

    def make(pool, **parallel) -> KvdHiCacheStorage:
        cfg = {"tp_rank": 0, "tp_size": 1, "pp_rank": 0, "pp_size": 1, "attn_cp_rank": 0, "attn_cp_size": 1,
               **parallel}
        b = KvdHiCacheStorage(HiCacheStorageConfig(**cfg, is_mla_model=False, enable_storage_metrics=False,
                                                   is_page_first_layout=pool.layout == "page_first",
                                                   model_name="smollm2", extra_config=extra_config(daemon.socket)))
        b.register_mem_pool_host(pool)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def test_pipeline_stages_of_other_layers_never_share_pages(backend):
    """SGLang splits layers by ``SGLANG_PP_LAYER_PARTITION`` (even by default): stage 1 of 3 of a
    30-layer model holds layers 10-19 on one server and 8-17 on one started with "8,10,12". Both hold
    10 layers, but not the same ones: the second must not load the first's pages as its own."""
    toks = torch.randint(3, 49000, (2 * P,), generator=torch.Generator().manual_seed(81)).tolist()
    keys = page_keys(toks, P)
    even = make_pool("page_first", num_pages=32, page_size=P, start_layer=10, layers=10)
    other = make_pool("page_first", num_pages=32, page_size=P, start_layer=8, layers=10)
    a, b = backend(even, pp_rank=1, pp_size=3), backend(other, pp_rank=1, pp_size=3)
    idx = even.alloc(2 * P)
    fill_random(even, idx, seed=81)
    assert a.batch_set_v1(keys, idx) == [True, True]
    assert a.batch_exists(keys) == 2
    assert b.batch_exists(keys) == 0
    assert b.batch_get_v1(keys, other.alloc(2 * P)) == [False, False]
    # the same stage of an equally split server shares them
    same = backend(make_pool("page_head", num_pages=32, page_size=P, start_layer=10, layers=10), pp_rank=1, pp_size=3)
    assert same.batch_exists(keys) == 2
