"""Recall refinement on SmolLM2 at a tiny length: the map's own byte bound holds."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from kvd.calibrate.profiler import ProfileConfig, map_from_choice
from kvd.calibrate.refine import refine

pytestmark = pytest.mark.model


def test_refine_keeps_the_byte_bound_the_map_was_profiled_for(smollm2_fp32):
    """A map profiled with ``bound_tokens=256`` is refined under the bound at 256 tokens, not at 4096
    (where a global head costs nothing next to a 32-token window and the bound would be crossed)."""
    model, tok = smollm2_fp32
    cfg = ProfileConfig(calib_tokens=160, kl_positions=48, windows=(16, 32), max_fraction_4k=0.5,
                        bound_tokens=256, num_natural=1, num_recall=1, refine_tokens=160)
    choice = [[2 if layer * 3 + head < 37 else 1 for head in range(3)] for layer in range(30)]
    hm = map_from_choice("m", choice, cfg, method="kl_greedy", calibration={"config": asdict(cfg)})
    assert hm.kv_fraction(256) <= 0.5
    new = refine(model, tok, hm, num_passkey=1, rounds=1)
    assert new.calibration["refine"]["bound_tokens"] == 256
    assert new.calibration["refine"]["recall_tokens"] == 160
    assert new.kv_fraction(256) <= 0.5 + 1e-9


def test_swap_changes_at_most_max_moves_heads():
    """A round changes at most ``max_moves`` heads, downgrades that pay for an upgrade included: an
    upgrade needing more downgrades than are left is not taken."""
    import torch

    from kvd.calibrate.refine import _swap

    costs = [0.1, 0.2, 1.0]  # window, bigger window, global
    choice = [[1] * 10]
    gains = torch.zeros(1, 10, 3, dtype=torch.float64)
    gains[0, 0, 2] = 0.9  # head 0 gains from going global (+0.8 bytes): eight downgrades (0.1 each) pay
    before = [list(r) for r in choice]
    moves = _swap(choice, gains, costs, room=0.0, max_moves=4)
    changed = sum(a != b for ra, rb in zip(before, choice, strict=True) for a, b in zip(ra, rb, strict=True))
    assert moves <= 4 and changed <= 4, (moves, choice)
