"""Audit 30: assembly and selection of chunk reuse (kvd.reuse.plan, kvd.reuse.select)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvd.reuse.plan import Segment


def test_a_batch_of_prompts_is_not_one_segment():
    """``Segment(tok(...).input_ids)`` takes a ``[1, n]`` row; a ``[2, n]`` batch was flattened into one
    segment of 2n tokens (two prompts concatenated, silently)."""
    assert Segment(torch.tensor([[1, 2, 3]])).token_ids == (1, 2, 3)
    assert Segment(np.array([[1, 2, 3]])).token_ids == (1, 2, 3)
    with pytest.raises(ValueError, match="one sequence"):
        Segment(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="one sequence"):
        Segment(np.array([[1, 2], [3, 4]]))
