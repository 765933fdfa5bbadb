"""Fixtures for the kernel tests: poisoned allocations and a closeness check that reports errors by name.

The kernels run through Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET).
"""

from __future__ import annotations

import pytest
import torch

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        if t.element_size() == 1:  # float8_e4m3fn: 0x7F is NaN
            t.view(torch.uint8).fill_(0x7F)
            return t
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t
    return t.fill_(-77 if t.dtype.is_signed else 0xAB)


@pytest.fixture
def poison(monkeypatch):
    """Every ``torch.empty``/``empty_like`` during the test comes back filled with NaN (or a marker),
    so an output element a kernel never writes shows up as a mismatch."""

    def empty(*args, **kwargs):
        return _poison(_real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(_real_empty_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                 max_rel_norm: float | None = None) -> None:
    """Elementwise |a - e| <= atol + rtol |e|, no NaN; optionally ||a - e|| / ||e|| <= max_rel_norm.
    The message gives max abs and relative error under ``name``."""
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{name}: {int(torch.isnan(a).sum())} NaN (unwritten?) elements"
    both_inf = torch.isinf(a) & torch.isinf(e) & (a == e)
    diff = torch.where(both_inf, 0.0, (a - e).abs())
    bound = atol + rtol * torch.where(both_inf, 0.0, e.abs())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    finite_e = e[~both_inf]
    rel = float(diff.max() / finite_e.abs().max().clamp_min(1e-30)) if finite_e.numel() else 0.0
    bad = int((diff > bound).sum())
    assert bad == 0, f"{name}: {bad} elements out of tolerance; max abs err {max_abs:.3g}, max rel err {rel:.3g}"
    if max_rel_norm is not None and e.numel():
        finite = ~both_inf
        rn = float((a - e)[finite].norm() / e[finite].norm().clamp_min(1e-30))
        assert rn <= max_rel_norm, f"{name}: ||a - e|| / ||e|| = {rn:.3g} > {max_rel_norm}"


@pytest.fixture
def close():
    return assert_close
