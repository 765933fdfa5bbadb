"""attach refuses models whose attention the adapter cannot compute, with a clear ``ConfigError``,
before it changes anything: a sliding-window layer (kvd's attention ignored the window: a Qwen2 whose
sliding layers come after layer 0 decoded other tokens than transformers, silently; a Mistral with a
window failed with a misleading "padded batches" error once the context passed it), multi-head latent
attention (a reshape traceback in the first forward) and models outside the Llama layout (an
``AttributeError``). Tiny random models; a Mistral without a window still runs and matches."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from kvd.connectors.hf import cache as hf
from kvd.core.errors import ConfigError

_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa", initializer_range=0.3)


def _model(cls, cfg_cls, **kw):
    torch.manual_seed(0)
    return cls(cfg_cls(**{**_BASE, **kw})).eval()


@pytest.mark.parametrize("make, why", [
    (lambda: _model(T.Qwen2ForCausalLM, T.Qwen2Config, use_sliding_window=True, sliding_window=8,
                    max_window_layers=1), "sliding"),
    (lambda: _model(T.MistralForCausalLM, T.MistralConfig, sliding_window=8), "sliding"),
    (lambda: _model(T.DeepseekV3ForCausalLM, T.DeepseekV3Config, kv_lora_rank=16, q_lora_rank=None,
                    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                    num_experts_per_tok=2, first_k_dense_replace=2, moe_intermediate_size=32, n_group=1,
                    topk_group=1), "k_proj"),
    (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)).eval(), "Llama"),
], ids=["qwen2-sliding-layer-1", "mistral-sliding", "deepseek-mla", "gpt2"])
def test_unsupported_attention_is_refused_at_attach(make, why):
    m = make()
    before = m.config._attn_implementation
    with pytest.raises(ConfigError, match=why):
        hf.attach(m, model_id="tiny")
    assert m.config._attn_implementation == before
    assert getattr(m, "_kvd_hooks", None) is None


def test_a_mistral_without_a_window_runs_as_transformers_does():
    m = _model(T.MistralForCausalLM, T.MistralConfig, sliding_window=None)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m.generate(ids, max_new_tokens=8, do_sample=False)
        out = m.generate(ids, past_key_values=hf.attach(m, model_id="tiny"), max_new_tokens=8, do_sample=False)
    hf.detach(m)
    assert out.tolist() == ref.tolist()
