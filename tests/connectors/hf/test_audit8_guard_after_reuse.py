"""Eighth audit: the Lil guard watches a request prefilled by chunk reuse (real SmolLM2, fp32, CPU).

``cache.reuse(..., leave_last=True)`` fills the cache before ``generate`` runs, so the guard's "first
forward" never came and it never learnt where the prompt ends: it watched nothing, tripped never, and
a guarded request decoded as if unguarded. The length signal makes this cheap to see: with the
full-KV length set to 4 tokens and ``length_slack`` 1, the guard must stop the request after 5.
"""

from __future__ import annotations

import pytest
import torch

from kvd.connectors.hf import cache as hf
from kvd.connectors.hf.guard import GuardConfig
from kvd.core.headmap import HeadMap
from kvd.reuse.plan import Segment

pytestmark = pytest.mark.model
STOP_AFTER_4 = GuardConfig(action="stop", expected_tokens=4, length_slack=1.0)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(100, 20000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _map() -> HeadMap:
    g = torch.Generator().manual_seed(0)
    return HeadMap.from_classes("smollm2-test", (torch.rand(30, 3, generator=g) < 0.2).tolist(), sink=4, window=32)


def test_the_guard_watches_a_request_prefilled_by_chunk_reuse(model):
    segments = [Segment(_ids(8, 1)), Segment(_ids(40, 2), reusable=True), Segment(_ids(30, 3), reusable=True),
                Segment(_ids(10, 4))]
    with torch.no_grad():
        plain = hf.attach(model, head_map=_map(), guard=STOP_AFTER_4)
        ids = torch.tensor([[t for s in segments for t in s.token_ids]])
        ref = model.generate(ids, past_key_values=plain, max_new_tokens=12, do_sample=False,
                             stopping_criteria=[plain.guard])
        cache = plain.fresh()
        res = cache.reuse(segments, leave_last=True)
        out = model.generate(res.input_ids, past_key_values=cache, max_new_tokens=12, do_sample=False,
                             stopping_criteria=[cache.guard])
    assert plain.guard.stats.trips == 1 and ref.shape[1] == ids.shape[1] + 5
    assert cache.guard.stats.trips == 1, cache.guard.stats
    assert cache.guard.stats.trip_position == plain.guard.stats.trip_position
    assert out.shape[1] == ids.shape[1] + 5
