"""``cache.reset()`` (transformers' way to reuse a cache) emptied only the pool: the request's token ids,
stored-chunk count, Lil guard and host stash of trimmed pages stayed, so the next request's guard
watched the old request's tokens and restored the old request's pages (here: an IndexError in the
prefill forward), and a prefix store would key the new KV by old + new tokens. A reset cache now
decodes as ``cache.fresh()`` does. Tiny random Llama, CPU."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvd.connectors.hf import cache as hf
from kvd.connectors.hf.guard import GuardConfig
from kvd.core.headmap import HeadMap


def test_a_reset_cache_decodes_its_next_request_as_a_fresh_one():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     initializer_range=0.3)).eval()
    hm = HeadMap.from_classes("tiny", [[False, True], [False, False]], sink=2, window=[[4, 4], [4, 4]])
    a, b = (torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    try:
        with torch.no_grad():
            cache = hf.attach(m, head_map=hm, page_tokens=4, guard=GuardConfig(window=8, ratio=50.0),
                              model_id="tiny")
            m.generate(a, past_key_values=cache, max_new_tokens=12, do_sample=False)
            assert cache.trimmed.nbytes > 0 and cache.guard.stats.trips == 0
            cache.reset()
            assert cache.get_seq_length() == 0 and cache.token_ids == [] and cache.kv_bytes() == 0
            fresh = cache.fresh()
            for c in (cache, fresh):
                c.guard.expect(2)  # trips (and restores) once 4 tokens are generated
            out = m.generate(b, past_key_values=cache, max_new_tokens=12, do_sample=False)
            ref = m.generate(b, past_key_values=fresh, max_new_tokens=12, do_sample=False)
    finally:
        hf.detach(m)
    assert out.tolist() == ref.tolist()
    assert cache.guard.stats == fresh.guard.stats and cache.guard.stats.restores == 1
    assert cache.token_ids == fresh.token_ids
