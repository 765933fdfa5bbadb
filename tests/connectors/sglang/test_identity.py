"""SGLang's backend names the model by its files' content identity (kvd.core.identity), as vLLM's
connector and the transformers adapter do: one fingerprint for one set of weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvd.connectors.sglang.settings import BackendSettings, model_spec_from_sglang
from kvd.core.identity import model_identity

pytestmark = pytest.mark.model


def _storage(model_name: str, tp_size: int = 1):
    return SimpleNamespace(model_name=model_name, is_mla_model=False, tp_rank=0, tp_size=tp_size, pp_rank=0,
                           pp_size=1, attn_cp_rank=0, attn_cp_size=1)


PAGES = SimpleNamespace(num_layers=30, num_heads=3, head_dim=64, dtype=torch.bfloat16)


def test_backend_fingerprint_is_the_adapters(smollm2_dir, smollm2_fp32):
    from kvd.connectors.hf.spec import model_spec

    model = SimpleNamespace(config=smollm2_fp32[0].config,
                            model=SimpleNamespace(embed_tokens=SimpleNamespace(weight=torch.empty(1, dtype=torch.bfloat16))))
    spec = model_spec_from_sglang(_storage(str(smollm2_dir)), PAGES, BackendSettings())
    assert spec.model_id == model_identity(smollm2_dir).model_id
    assert spec.fingerprint() == model_spec(model).fingerprint()
    # a served name that is no directory: model_path names the files
    named = model_spec_from_sglang(_storage("smollm2"), PAGES, BackendSettings(model_path=str(smollm2_dir)))
    assert named.fingerprint() == spec.fingerprint()


def test_shards_and_explicit_ids_keep_their_meaning(smollm2_dir):
    tp = model_spec_from_sglang(_storage(str(smollm2_dir), tp_size=2), PAGES, BackendSettings())
    assert tp.model_id == model_identity(smollm2_dir).model_id + " [tp0/2]"
    mine = model_spec_from_sglang(_storage(str(smollm2_dir)), PAGES, BackendSettings(model_id="prod", revision="v2"))
    assert (mine.model_id, mine.revision) == ("prod", "v2")


def test_hub_name_reads_rope_from_the_hub_snapshot(smollm2_dir, tmp_path, monkeypatch):
    """SGLang given a hub name (``org/model``) loads the cached snapshot; its RoPE must be in the
    fingerprint, as vLLM's (read from the same snapshot's config) is, or the engines never share."""
    repo = tmp_path / "hub" / "models--org--smol"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "snapshots" / "abc123").symlink_to(smollm2_dir, target_is_directory=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    by_path = model_spec_from_sglang(_storage(str(smollm2_dir)), PAGES, BackendSettings())
    by_hub = model_spec_from_sglang(_storage("org/smol"), PAGES, BackendSettings())
    assert by_hub.rope and by_hub.rope == by_path.rope
    assert by_hub.fingerprint() == by_path.fingerprint()
