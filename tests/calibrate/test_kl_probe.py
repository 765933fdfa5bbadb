"""The KL probe's fast path: ``structured_sdpa`` equals ``masked_sdpa`` (the reference semantics), and
checkpointed layers give the probe's KL and gains unchanged."""

from __future__ import annotations

import pytest
import torch

from kvd.calibrate import kl_probe
from kvd.calibrate.kl_probe import CalibSeq, KlProbe
from kvd.calibrate.masked_attention import masked_sdpa, structured_sdpa


@pytest.mark.parametrize("T,block", [(300, 64), (97, 1024), (130, 16)], ids=["T300-B64", "T97-B1024", "T130-B16"])
def test_structured_sdpa_equals_masked_sdpa(T, block):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(1, 6, T, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 3, T, 16, generator=g, requires_grad=True)
    v = torch.randn(1, 3, T, 16, generator=g, requires_grad=True)
    sink, window = (0, 4, 2), (0, 40, 7)  # global, local sink 4 window 40, local window 7 (sink overlaps it)
    ref = masked_sdpa(q, k, v, sink, window, scaling=0.25)
    got = structured_sdpa(q, k, v, sink, window, scaling=0.25, block=block)
    assert (got - ref).abs().max() < 1e-5
    (gq,) = torch.autograd.grad(got.square().sum(), q)
    (rq,) = torch.autograd.grad(ref.square().sum(), q)
    assert (gq - rq).abs().max() < 1e-4


@pytest.mark.model
def test_checkpointed_probe_gives_the_same_kl_and_gains(smollm2_fp32, monkeypatch):
    model, tok = smollm2_fp32
    ids = torch.randint(100, 20000, (1, 200), generator=torch.Generator().manual_seed(0))
    seqs = [CalibSeq("r", ids, torch.arange(150, 200))]
    choice = [[(layer + h) % 3 for h in range(3)] for layer in range(30)]
    fast = KlProbe(model, seqs, 4, (16, 64, 0)).step(choice)
    monkeypatch.setattr(kl_probe, "structured_sdpa", masked_sdpa)  # the reference, no checkpoints
    slow = KlProbe(model, seqs, 4, (16, 64, 0), checkpoint=False).step(choice)
    assert abs(fast[0][0] - slow[0][0]) < 1e-4 * max(1.0, slow[0][0])
    assert (fast[1] - slow[1]).abs().max() < 1e-3 * slow[1].abs().max()
