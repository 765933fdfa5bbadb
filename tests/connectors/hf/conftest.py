"""Fixtures of the transformers adapter's tests."""

from __future__ import annotations

import pytest

from kvd.connectors.hf import cache as hf


@pytest.fixture
def model(smollm2_fp32):
    """The session's fp32 SmolLM2, detached from kvd after each test (a test may attach it)."""
    m, _ = smollm2_fp32
    yield m
    hf.detach(m)
