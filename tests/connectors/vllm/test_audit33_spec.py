"""Audit 33: KV-cache specs the connector cannot key are refused at start-up (docs/vllm.md: "hybrid /
sliding-window-group models and MLA are refused at start-up").

Only the number of KV-cache groups was checked. A model whose every layer is sliding-window (one group of
``SlidingWindowSpec``; HMA stays off for kvd, and a uniform group is not promoted to full attention) has
vLLM's ``SlidingWindowManager`` put the null block in place of every block behind the window, so saves read
the null block as a chunk's KV (for instance the chunks vLLM's own prefix hit covers) and other engines
load it. MLA passed the equal-head-size check because its ``head_size_v`` is 0, read as "unset"."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    ChunkedLocalAttentionSpec,
    FullAttentionSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

from kvd.connectors.vllm.settings import ConnectorSettings, model_spec_from_vllm
from kvd.core.errors import ConfigError
from tests.core.test_identity import make_model

COMMON = dict(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)


def _spec(root, kv_spec):
    kv = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=kv_spec, layer_names=["l0", "l1"])])
    hf = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    mc = SimpleNamespace(model=str(root), revision=None, quantization=None, hf_config=hf, hf_overrides={},
                         get_total_num_kv_heads=lambda: 2)
    par = SimpleNamespace(pipeline_parallel_size=1, decode_context_parallel_size=1, tensor_parallel_size=1)
    return model_spec_from_vllm(SimpleNamespace(model_config=mc, parallel_config=par), kv, ConnectorSettings())


def test_full_attention_is_accepted_also_with_a_window_computed_over_full_allocation(tmp_path):
    root = make_model(tmp_path / "m")
    assert _spec(root, FullAttentionSpec(**COMMON)).num_kv_heads == 2
    # A hybrid model under HMA off: every block kept (vLLM computes the window, allocates in full).
    assert _spec(root, FullAttentionSpec(**COMMON, sliding_window=64)).num_kv_heads == 2


@pytest.mark.parametrize("kv_spec", [
    SlidingWindowSpec(**COMMON, sliding_window=256),
    ChunkedLocalAttentionSpec(**COMMON, attention_chunk_size=256),
    MLAAttentionSpec(block_size=128, num_kv_heads=1, head_size=576, dtype=torch.bfloat16),
    FullAttentionSpec(**COMMON, non_causal=True),
], ids=["sliding_window", "chunked_local", "mla", "non_causal"])
def test_specs_the_connector_cannot_key_are_refused(tmp_path, kv_spec):
    root = make_model(tmp_path / "m")
    with pytest.raises(ConfigError, match="KvdConnector"):
        _spec(root, kv_spec)
