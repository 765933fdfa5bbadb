"""vLLM's ``hf_overrides`` change the model vLLM computes with, not its files: they are part of the
fingerprint. The content identity hashes the files' config.json and the spec took only RoPE from vLLM's
(overridden) config, so an engine run with e.g. ``hf_overrides={"num_experts_per_tok": 4}`` or another
``rms_norm_eps`` registered the plain files' fingerprint and shared their KV: wrong KV."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvd.connectors.vllm.settings import ConnectorSettings, model_spec_from_vllm
from kvd.core.errors import ConfigError
from tests.core.test_identity import make_model


def _vllm(root, hf_overrides) -> tuple[SimpleNamespace, SimpleNamespace]:
    spec = SimpleNamespace(head_size=32, num_kv_heads=2, dtype=torch.bfloat16)
    kv = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=["l0", "l1"])])
    hf = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    mc = SimpleNamespace(model=str(root), revision=None, quantization=None, hf_config=hf, hf_overrides=hf_overrides,
                         get_total_num_kv_heads=lambda: 2)
    par = SimpleNamespace(pipeline_parallel_size=1, decode_context_parallel_size=1, tensor_parallel_size=1)
    return SimpleNamespace(model_config=mc, parallel_config=par), kv


def _fp(root, hf_overrides, settings: ConnectorSettings | None = None) -> str:
    cfg, kv = _vllm(root, hf_overrides)
    return model_spec_from_vllm(cfg, kv, settings or ConnectorSettings()).fingerprint()


def test_hf_overrides_are_another_model(tmp_path):
    root = make_model(tmp_path / "m")
    plain = _fp(root, {})
    assert _fp(root, {"rms_norm_eps": 1e-5}) != plain
    assert _fp(root, {"rms_norm_eps": 1e-5}) == _fp(root, {"rms_norm_eps": 1e-5})
    assert _fp(root, {"rms_norm_eps": 1e-5}) != _fp(root, {"rms_norm_eps": 1e-6})


def test_callable_hf_overrides_need_a_model_id(tmp_path):
    root = make_model(tmp_path / "m")
    with pytest.raises(ConfigError, match="hf_overrides"):
        _fp(root, lambda config: config)
    assert _fp(root, lambda config: config, ConnectorSettings(model_id="mine"))


def test_a_one_rank_engine_refuses_a_head_map_of_other_weights_at_start(tmp_path):
    """The head map is checked against the engine's model when it is loaded, as under tensor parallelism:
    a map profiled for the plain files, given to an engine run with ``hf_overrides`` (another model),
    used to pass, and the daemon then refused every registration (FingerprintMismatch) while vLLM
    served without kvd, logging 'not reachable' and retrying (docs/vllm.md: such a set-up must not start)."""
    from kvd.connectors.vllm.settings import load_head_map
    from kvd.core.errors import HeadMapError
    from kvd.core.headmap import HeadMap

    root = make_model(tmp_path / "m")
    plain = model_spec_from_vllm(*_vllm(root, {}), ConnectorSettings())
    hm = HeadMap.from_classes("m", [[True, False], [False, True]], sink=4, window=64,
                              fingerprint=plain.fingerprint())
    hm.save(tmp_path / "map.json")
    settings = ConnectorSettings(head_map=str(tmp_path / "map.json"))
    assert load_head_map(settings, plain) == hm
    other = model_spec_from_vllm(*_vllm(root, {"rms_norm_eps": 1e-5}), ConnectorSettings())
    with pytest.raises(HeadMapError, match="profiled for the model with fingerprint"):
        load_head_map(settings, other)


def test_dummy_weights_are_not_the_files(tmp_path):
    """vLLM's load_format="dummy" (random weights, for benchmarks) registered the files' fingerprint, so
    its noise KV was loaded by a real engine of the same files on the same daemon and namespace."""
    from vllm.config import LoadConfig

    root = make_model(tmp_path / "m")
    plain = _fp(root, {})

    def fp(load_format):
        cfg, kv = _vllm(root, {})
        cfg.load_config = LoadConfig(load_format=load_format)
        return model_spec_from_vllm(cfg, kv, ConnectorSettings()).fingerprint()
    assert fp("dummy") != plain
    assert fp("auto") == fp("safetensors") == plain
