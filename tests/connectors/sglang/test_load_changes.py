"""What SGLang changes of the files' model when it loads them is part of the fingerprint: the content
identity names the files, and two SGLang servers on the same files, one quantizing the weights at load
(``--quantization fp8``), overriding the config (``--json-model-override-args``, e.g. YaRN RoPE) or
scaling its fp8 KV by a file's factors (``--quantization-param-path``), compute other KV. They used to
register one fingerprint and so share pages: the worst failure kvd can have, wrong KV served."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from kvd.connectors.sglang.settings import BackendSettings, model_spec_from_sglang
from kvd.core.identity import model_identity
from tests.core.test_identity import CONFIG, make_model

PAGES = SimpleNamespace(num_layers=2, num_heads=2, head_dim=32, dtype=torch.bfloat16)
FP8 = SimpleNamespace(num_layers=2, num_heads=2, head_dim=32, dtype=torch.float8_e4m3fn)


def _storage(path) -> SimpleNamespace:
    return SimpleNamespace(model_name=str(path), is_mla_model=False, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                           attn_cp_rank=0, attn_cp_size=1)


def _args(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"quantization": None, "json_model_override_args": "{}",
                              "quantization_param_path": None, "revision": None, "load_format": "auto", **kw})


def _fp(path, pages=PAGES, **kw) -> str:
    return model_spec_from_sglang(_storage(path), pages, BackendSettings(), server_args=_args(**kw)).fingerprint()


def test_quantized_on_load_is_another_model(tmp_path):
    root = make_model(tmp_path / "m")
    plain = model_spec_from_sglang(_storage(root), PAGES, BackendSettings())
    assert _fp(root) == plain.fingerprint()  # nothing changed on load: the files' fingerprint (vLLM's too)
    assert _fp(root, quantization="fp8") != plain.fingerprint()
    # a checkpoint quantized in its files says so in config.json, which the content identity covers
    pre = make_model(tmp_path / "pre", config={**CONFIG, "quantization_config": {"quant_method": "fp8"}})
    assert _fp(pre, quantization="fp8") == _fp(pre)


def test_config_overrides_are_another_model(tmp_path):
    root = make_model(tmp_path / "m")
    yarn = json.dumps({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})
    assert _fp(root, json_model_override_args=yarn) != _fp(root)
    assert _fp(root, json_model_override_args=yarn) == _fp(root, json_model_override_args=yarn)


def test_fp8_kv_scaling_factors_from_a_file_are_part_of_the_key(tmp_path):
    root = make_model(tmp_path / "m")
    scales = tmp_path / "kv_scales.json"
    scales.write_text(json.dumps({"kv_cache": {"scaling_factor": {"0": {"0": 0.5, "1": 0.25}}}}))
    assert _fp(root, FP8, quantization_param_path=str(scales)) != _fp(root, FP8)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"kv_cache": {"scaling_factor": {"0": {"0": 2.0, "1": 0.25}}}}))
    assert _fp(root, FP8, quantization_param_path=str(other)) != _fp(root, FP8, quantization_param_path=str(scales))
    # bf16 KV is not scaled: the file changes nothing there
    assert _fp(root, quantization_param_path=str(scales)) == _fp(root)


def test_a_hub_revision_is_the_weights_it_names(tmp_path, monkeypatch):
    """``--model-path Org/Tiny --revision c2`` loads snapshot c2's weights. The backend resolved the hub
    name at ``main`` (the revision setting empty), so a server on c2 and one on main registered one
    fingerprint and shared pages computed by other weights; without a local copy both were "Org/Tiny"."""
    hub = tmp_path / "hub"
    repo = hub / "models--Org--Tiny"
    main = make_model(repo / "snapshots" / "c1")
    c2 = make_model(repo / "snapshots" / "c2", seed=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c1\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))

    def spec(name, **kw):
        return model_spec_from_sglang(_storage(name), PAGES, BackendSettings(), server_args=_args(**kw))

    assert spec("Org/Tiny").model_id == model_identity(main).model_id
    assert spec("Org/Tiny", revision="c2").model_id == model_identity(c2).model_id
    assert spec("Org/Tiny", revision="c2").fingerprint() != spec("Org/Tiny").fingerprint()
    # no local copy: the name and the revision
    assert spec("Org/Gone", revision="v2").fingerprint() != spec("Org/Gone").fingerprint()


def test_dummy_weights_are_not_the_files(tmp_path):
    """``--load-format dummy`` (benchmarks, warm-up runs) fills the weights with random values instead
    of reading the files: its KV is noise, and it registered the files' fingerprint, so a real server
    of the same files loaded that noise as its own prefix (the daemon and namespace shared)."""
    root = make_model(tmp_path / "m")
    assert _fp(root, load_format="dummy") != _fp(root)
    assert _fp(root, load_format="safetensors") == _fp(root)
