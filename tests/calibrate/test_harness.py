"""Fidelity harness smoke run: a few prompts at ~1K tokens, full KV vs a local map."""

from __future__ import annotations

import json

import pytest

from kvd.calibrate import tasks
from kvd.calibrate.evaluate import main as eval_main
from kvd.calibrate.harness import Harness, make_prompts, summarize
from kvd.core.headmap import HeadMap

pytestmark = pytest.mark.model


def test_passkey_prompt_is_reproducible_and_sized(smollm2_fp32):
    _, tok = smollm2_fp32
    a, b = tasks.passkey(tok, 1001, 1024), tasks.passkey(tok, 1001, 1024)
    assert a == b and a.answer.strip().isdigit() and a.answer.strip() in a.prompt
    assert abs(len(tok(a.prompt)["input_ids"]) - 1024) < 32


def test_harness_full_vs_local_at_1k(smollm2_fp32, tmp_path):
    model, tok = smollm2_fp32
    h = Harness(model, tok, cache_dir=tmp_path, gen_tokens=3)
    prompts = make_prompts(tok, "passkey", 1024, 1) + make_prompts(tok, "natural", 1024, 1, kl_positions=256)
    local = HeadMap.from_classes("local64", [[False] * 3] * 30, sink=4, window=64)
    full = [h.evaluate(p, None) for p in prompts]
    loc = [h.evaluate(p, local) for p in prompts]
    assert list(tmp_path.glob("*.pt")), "references are cached on disk"
    for r in full:
        assert r.kl < 1e-6 and r.top1 == 1.0 and r.kv_fraction == 1.0
        assert r.correct == r.correct_full and r.greedy_match == 1.0 and r.length_ratio == 1.0
    nat = loc[-1]
    assert nat.kl > 0.01 and nat.top1 < 1.0 and nat.kv_fraction < 0.1
    assert nat.kv_bytes == 30 * 3 * 68 * 256  # 68 tokens per head, 256 B each (bf16 K+V)
    s = summarize(loc)
    assert set(s) == {"passkey@1024", "natural@1024"} and "acc_full" in s["passkey@1024"]


def test_cli_writes_json(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    eval_main(["--map", "full", "--map", "local:32", "--task", "multikey:256", "--prompts", "1",
               "--model-dir", str(smollm2_dir), "--out", str(out)])
    doc = json.loads(out.read_text())
    assert set(doc["summary"]) == {"full", "local:32"}
    assert "multikey@256" in capsys.readouterr().out


def test_reference_cache_is_not_shared_between_models(smollm2_fp32, tmp_path):
    """The on-disk full-KV references belong to one model: another model with the same tokenizer
    (same prompt ids) must not be scored against the first one's distributions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tok = smollm2_fp32
    prompt = make_prompts(tok, "natural", 96, 1, kl_positions=32)[0]
    Harness(model, tok, cache_dir=tmp_path).reference(prompt)
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         eos_token_id=model.config.eos_token_id)).eval()
    r = Harness(other, tok, cache_dir=tmp_path).evaluate(prompt, None)
    assert r.kl < 1e-6 and r.top1 == 1.0, "full KV against itself, not against the other model's cached reference"
