"""The transformers adapter's model spec (kvd.connectors.hf.spec): the model's content identity, the
fingerprint vLLM's and SGLang's connectors derive for the same files, and the cases it refuses or marks."""

from __future__ import annotations

import copy as copy_module
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvd.connectors.hf.spec import model_spec
from kvd.connectors.vllm.settings import ConnectorSettings, load_head_map, model_spec_from_vllm
from kvd.core.errors import ConfigError
from kvd.core.headmap import HeadMap
from kvd.core.identity import model_identity

pytestmark = pytest.mark.model
SHIPPED = Path(__file__).resolve().parents[3] / "kvd/data/heads/smollm2-135m.json"


def _vllm_configs(model_dir, hf_config, *, quantization=None, revision=None, tp=1, pp=1, dcp=1):
    """vLLM's configs as the connector reads them (the attributes it uses, nothing else; under tensor
    parallelism the KV-cache spec holds one rank's heads, as vLLM's does)."""
    spec = SimpleNamespace(num_kv_heads=3 // tp, head_size=64, head_size_v=64, dtype=torch.bfloat16)
    kv_cache_config = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec,
                                                                       layer_names=[f"l{i}" for i in range(30)])])
    vllm_config = SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                        decode_context_parallel_size=dcp),
        model_config=SimpleNamespace(model=str(model_dir), revision=revision, hf_config=hf_config,
                                     quantization=quantization, get_total_num_kv_heads=lambda: 3))
    return vllm_config, kv_cache_config


@pytest.fixture
def bf16_model(smollm2_fp32):
    """The session's fp32 model, seen as a bf16 one (only the embedding's dtype is read)."""
    model, _ = smollm2_fp32
    return SimpleNamespace(config=model.config,
                           model=SimpleNamespace(embed_tokens=SimpleNamespace(weight=torch.empty(1, dtype=torch.bfloat16))))


def test_adapter_and_vllm_derive_one_fingerprint_from_the_files(bf16_model, smollm2_dir):
    spec = model_spec(bf16_model)
    assert spec.model_id == model_identity(smollm2_dir).model_id and spec.revision == ""
    vllm = model_spec_from_vllm(*_vllm_configs(smollm2_dir, bf16_model.config), ConnectorSettings())
    assert vllm == spec and vllm.fingerprint() == spec.fingerprint()
    # the shipped head map was made for exactly these weights, served in bf16
    assert HeadMap.load(SHIPPED).fingerprint == spec.fingerprint()


def test_a_copy_of_the_model_elsewhere_is_the_same_model(bf16_model, smollm2_dir, tmp_path):
    copy = tmp_path / "renamed-copy"
    copy.mkdir()
    for f in smollm2_dir.iterdir():
        (copy / f.name).symlink_to(f)
    config = copy_module.deepcopy(bf16_model.config)
    config.name_or_path = str(copy)
    moved = SimpleNamespace(config=config, model=bf16_model.model)
    assert model_spec(moved).fingerprint() == model_spec(bf16_model).fingerprint()


def test_explicit_model_id_wins_in_both_engines(bf16_model, smollm2_dir):
    spec = model_spec(bf16_model, model_id="smollm2-prod")
    vllm = model_spec_from_vllm(*_vllm_configs(smollm2_dir, bf16_model.config), ConnectorSettings(model_id="smollm2-prod"))
    assert spec.model_id == vllm.model_id == "smollm2-prod" and spec.fingerprint() == vllm.fingerprint()


def test_weights_changed_on_load_are_marked_or_refused(bf16_model, smollm2_dir):
    quantized = model_spec_from_vllm(*_vllm_configs(smollm2_dir, bf16_model.config, quantization="fp8"),
                                     ConnectorSettings())
    assert quantized.model_id.endswith("+fp8") and quantized.fingerprint() != model_spec(bf16_model).fingerprint()
    peft = SimpleNamespace(config=bf16_model.config, model=bf16_model.model, peft_config={"default": object()})
    with pytest.raises(ConfigError, match="PEFT"):
        model_spec(peft)
    assert model_spec(peft, model_id="base+adapter-v3").model_id == "base+adapter-v3"


def test_tensor_parallel_ranks_are_models_of_their_own(bf16_model, smollm2_dir):
    """Each rank holds its own heads: the rank is in the model id, so ranks never share entries. The
    whole model's spec (``tp_rank=None``) is the one-rank engine's, the adapter's, against which the
    shipped head map is checked before each rank takes its head's column of it. Pipeline parallelism
    is refused with what to change."""
    configs = _vllm_configs(smollm2_dir, bf16_model.config, tp=3)
    ranks = [model_spec_from_vllm(*configs, ConnectorSettings(), tp_rank=r) for r in range(3)]
    whole = model_spec(bf16_model)
    assert [s.model_id for s in ranks] == [f"{whole.model_id} [tp{r}/3]" for r in range(3)]
    assert {s.num_kv_heads for s in ranks} == {1}
    assert len({s.fingerprint() for s in ranks} | {whole.fingerprint()}) == 4
    tp_whole = model_spec_from_vllm(*configs, ConnectorSettings(), tp_rank=None)
    assert tp_whole == whole and tp_whole.fingerprint() == HeadMap.load(SHIPPED).fingerprint
    settings = ConnectorSettings(head_map=str(SHIPPED))
    for r, spec in enumerate(ranks):
        part = load_head_map(settings, spec, whole=tp_whole, rank=r, size=3)
        assert part.fingerprint == spec.fingerprint()
        assert part.class_grid() == [[row[r]] for row in HeadMap.load(SHIPPED).class_grid()]
    with pytest.raises(ConfigError, match="pipeline_parallel_size"):
        model_spec_from_vllm(*_vllm_configs(smollm2_dir, bf16_model.config, pp=2), ConnectorSettings())


def test_decode_context_parallelism_is_refused(bf16_model, smollm2_dir):
    """Under DCP a vLLM block spans block_size x dcp tokens, each rank holding every dcp-th one
    (vllm/v1/core/single_type_kv_cache_manager.py: ``block_size * dcp_world_size``), while the connector
    maps token t to block t // block_size: it would store and load the wrong tokens' KV, under the same
    fingerprint as an engine of the same TP size without DCP (the rank's heads are the same)."""
    with pytest.raises(ConfigError, match="decode_context_parallel_size"):
        model_spec_from_vllm(*_vllm_configs(smollm2_dir, bf16_model.config, tp=2, dcp=2), ConnectorSettings(),
                             tp_rank=1)
