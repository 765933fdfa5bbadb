"""benchmarks/pi_reuse_speed.py's gate before timing: the engine's full recompute must give the model's
own logits, else nothing is timed (it was recorded and never checked)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("pi_reuse_speed", ROOT / "benchmarks" / "pi_reuse_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recompute_gate_rule(bench):
    assert bench.recompute_gate({"recompute_vs_model_cos": 1.0, "recompute_vs_model_top1": True}) is None
    assert bench.recompute_gate({"recompute_vs_model_cos": 0.9, "recompute_vs_model_top1": True})
    assert bench.recompute_gate({"recompute_vs_model_cos": 1.0, "recompute_vs_model_top1": False})
    assert bench.recompute_gate({"recompute_vs_model_cos": float("nan"), "recompute_vs_model_top1": True})
    assert bench.recompute_gate({})


def smoke_request(bench):
    torch.manual_seed(0)
    model = bench.build_model(bench.SMOKE, "cpu", torch.float32)
    head_map = bench.stretched_map(bench.SMOKE["num_hidden_layers"], bench.SMOKE["num_key_value_heads"])
    docs, segs = bench.make_request(bench.SMOKE, 3, 64, 16, seed=1)
    store = bench.LocalChunkStore()
    with torch.no_grad():
        for d in docs:
            seg = bench.Segment(d, reusable=True)
            key = bench.chunk_key(seg, namespace=bench.NAMESPACE, fingerprint=bench.FINGERPRINT)
            store.put(key, bench.compute_chunk(model, seg))
    return model, segs, store, head_map


def test_gate_passes_on_the_real_engine_and_fails_on_wrong_logits(bench, monkeypatch):
    model, segs, store, head_map = smoke_request(bench)
    res: dict = {}
    with torch.no_grad():
        assert bench.run_checks(model, segs, store, head_map, "cpu", torch.float32, res) in ("paged", "dense")
    assert res["gate_passed"] is True

    real = bench.reuse_request

    def wrong(*a, **kw):  # the engine answering with other logits (e.g. read from zeroed or shuffled KV)
        r = real(*a, **kw)
        return dataclasses.replace(r, logits=torch.roll(r.logits, 1, dims=-1))

    monkeypatch.setattr(bench, "reuse_request", wrong)
    res = {}
    with torch.no_grad(), pytest.raises(bench.GateFailed):
        bench.run_checks(model, segs, store, head_map, "cpu", torch.float32, res)
    assert res["gate_passed"] is False and "differs" in res["gate_failure"]
