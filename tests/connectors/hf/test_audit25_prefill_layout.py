"""Chunk reuse's prefill computes Llama layers by hand (projections, RoPE, norms): a model whose attention
has more (Qwen3's per-head ``q_norm``/``k_norm``) decoded through the adapter correctly but was
prefilled without them, silently (logits off by ~11 on a tiny random Qwen3); it is refused now with a
clear error. Tiny random models, CPU."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from kvd.connectors.hf import cache as hf
from kvd.core.errors import ConfigError
from kvd.reuse.plan import Segment

_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, head_dim=16)


def _model(cls, cfg_cls):
    torch.manual_seed(0)
    return cls(cfg_cls(**_BASE)).eval()


def test_reuse_refuses_attention_it_would_compute_without_its_norms():
    m = _model(T.Qwen3ForCausalLM, T.Qwen3Config)
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    try:
        cache = hf.attach(m, model_id="tiny")
        with pytest.raises(ConfigError, match="q_norm"):
            cache.reuse([Segment(ids)], method="recompute")
    finally:
        hf.detach(m)


def test_reuse_of_a_llama_layout_still_matches_the_model():
    m = _model(T.LlamaForCausalLM, T.LlamaConfig)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            ref = m(ids).logits[0, -1]
            res = hf.attach(m, model_id="tiny").reuse([Segment(ids)], method="recompute")
    finally:
        hf.detach(m)
    assert (res.logits - ref).abs().max() <= 1e-4
