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
