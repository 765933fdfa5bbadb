"""Audit 30: a reuse request given in a wrong form is refused with a message, not a traceback from
inside the forward (on a GPU an out-of-range token id is a device-side assert that poisons the process)."""

from __future__ import annotations

import pytest
import torch

from kvd.connectors.hf import cache as hf
from kvd.reuse.plan import Segment


@pytest.fixture
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    yield model
    hf.detach(model)


@pytest.mark.parametrize("segments", [[[1, 2], [3]], Segment([1, 2]), torch.tensor([[1, 2, 3]])])
def test_segments_that_are_not_segments_are_refused(tiny, segments):
    cache = hf.attach(tiny, model_id="tiny")
    with pytest.raises(TypeError, match="list of Segment"):
        cache.reuse(segments)


@pytest.mark.parametrize("bad", [100, 5000, -1])
def test_token_ids_outside_the_vocabulary_are_refused(tiny, bad):
    cache = hf.attach(tiny, model_id="tiny")
    with pytest.raises(ValueError, match="outside the model's 100"):
        cache.reuse([Segment([1, 2, 3], reusable=True), Segment([4, bad])], method="naive")
    assert cache.fresh().reuse([Segment([1, 2, 3], reusable=True), Segment([4, 99])], method="naive").logits is not None
