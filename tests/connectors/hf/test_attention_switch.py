"""The one attention-implementation switch, on a tiny random Llama (no real model): it registers the
name with both interfaces (idempotently), switches, and restores the previous implementation and the
per-layer state on exit, also when the block raises; the adapter's attach/detach go through it."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvd.connectors.hf import attention_switch as switch

NAME = "kvd_test_switch"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def _counting_sdpa(calls: list[int]):
    def fn(module, query, key, value, attention_mask, **kwargs):
        calls.append(module.layer_idx)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return fn


def test_register_is_idempotent_and_registers_the_mask():
    first, second = _counting_sdpa([]), _counting_sdpa([])
    assert switch.register(NAME, first) == NAME
    assert switch.register(NAME, first) == NAME  # again: harmless
    assert ALL_ATTENTION_FUNCTIONS[NAME] is first and ALL_MASK_ATTENTION_FUNCTIONS[NAME] is sdpa_mask
    switch.register(NAME, second)  # the last registration wins
    assert ALL_ATTENTION_FUNCTIONS[NAME] is second


def test_block_runs_on_the_function_then_restores(model):
    calls: list[int] = []
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        with switch.attention_implementation(model, NAME, _counting_sdpa(calls), layer_attr="kvd_test",
                                             layer_values=["a", "b", "c"]) as mods:
            assert model.config._attn_implementation == NAME
            assert [m.kvd_test for m in mods] == ["a", "b", "c"]
            out = model(ids).logits
    assert calls == [0, 1, 2]
    assert torch.equal(out, ref)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "kvd_test") for m in switch.attention_modules(model))


def test_exception_in_the_block_still_restores(model):
    with pytest.raises(RuntimeError, match="boom"):
        with switch.attention_implementation(model, NAME, _counting_sdpa([]), layer_attr="kvd_test") as mods:
            mods[1].kvd_test = 1  # state the block set itself is removed too
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "kvd_test") for m in switch.attention_modules(model))


def test_nested_switches_unwind_in_order(model):
    with switch.attention_implementation(model, NAME, _counting_sdpa([])):
        with switch.attention_implementation(model, NAME + "_inner", _counting_sdpa([])):
            assert model.config._attn_implementation == NAME + "_inner"
        assert model.config._attn_implementation == NAME
    assert model.config._attn_implementation == "sdpa"


def test_layer_values_must_cover_every_layer(model):
    with pytest.raises(ValueError, match="3 layers"):
        with switch.attention_implementation(model, NAME, _counting_sdpa([]), layer_attr="x", layer_values=[1]):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_second_forward_over_a_cache_keeps_its_causal_offset(model):
    """Why the mask is registered too (ENGINES.md §3.3): a custom function over a cache must get the
    mask with the cached tokens' offset, or the second chunk attends as if it started at 0."""
    ids = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        with switch.attention_implementation(model, NAME, _counting_sdpa([])):
            cache = DynamicCache(config=model.config)
            a = model(ids[:, :13], past_key_values=cache, use_cache=True).logits
            b = model(ids[:, 13:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([a, b], 1), ref, atol=1e-5, rtol=1e-5)


def test_attach_detach_return_and_restore_the_previous_implementation(model):
    previous = switch.attach(model, NAME, _counting_sdpa([]))
    assert previous == "sdpa" and model.config._attn_implementation == NAME
    switch.detach(model, previous)
    assert model.config._attn_implementation == "sdpa"


def test_adapter_attach_twice_then_detach_restores_the_original(model):
    from kvd.connectors.hf import cache as hf

    hf.attach(model)
    hf.attach(model)  # the second attach must not record "kvd" as the implementation to restore
    assert model.config._attn_implementation == "kvd"
    hf.detach(model)
    assert model.config._attn_implementation == "sdpa"
    hf.detach(model)  # detaching again is a no-op
    assert model.config._attn_implementation == "sdpa"
