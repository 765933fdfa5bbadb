"""The ``ModelSpec`` of a transformers model as the adapter registers it: the same fingerprint vLLM's and
SGLang's kvd connectors derive for the same files.

``model_id`` is the content identity of the directory the model was loaded from
(``kvd.core.identity``: config.json and sampled weight bytes), found from ``config.name_or_path`` (a
directory, or a hub name resolved in the local cache at ``config._commit_hash``). An explicit
``model_id`` overrides it. Weights changed in memory after loading are not what the files say:

- quantized at load time (``quantization_config`` on the model but not in the files' config.json):
  the method is appended (``+bitsandbytes``), so the KV is never shared with a plain run;
- PEFT adapters loaded into the model: refused without an explicit ``model_id``, since the adapter's
  weights are nowhere in the identity and its KV differs from the base model's.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from kvd.core.dtypes import DTYPE_BYTES
from kvd.core.errors import ConfigError, HeadMapError
from kvd.core.headmap import HeadMap
from kvd.core.identity import choose_model_id, resolve_model_dir
from kvd.core.keys import ModelSpec


def _file_config(name_or_path: str, revision: str | None) -> dict[str, Any]:
    root = resolve_model_dir(name_or_path, revision)
    if root is None or not (root / "config.json").is_file():
        return {}
    try:
        return json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _quantized_on_load(cfg: Any, name_or_path: str, revision: str | None) -> str | None:
    q = getattr(cfg, "quantization_config", None)
    if not q or "quantization_config" in _file_config(name_or_path, revision):
        return None
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(getattr(method, "value", method) or "quantized")


ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")  # a Llama-style attention's parts


def check_supported(model: Any) -> None:
    """``ConfigError`` unless ``model``'s attention is one the adapter computes: Llama-family layers
    (``model.model.layers[i].self_attn`` with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and one
    ``model.model.rotary_emb``) with full causal attention. kvd's attention applies no sliding window
    (it would attend past it, silently), and MLA or other layouts have no K/V of the pool's shape."""
    core = getattr(model, "model", None)
    name = type(model).__name__
    if core is None or not hasattr(core, "layers") or not hasattr(core, "embed_tokens"):
        raise ConfigError(f"{name} is not a Llama-family causal LM (model.model.layers); kvd's transformers "
                          "adapter supports those only")
    if getattr(core, "rotary_emb", None) is None:
        raise ConfigError(f"{name} has no rotary embedding (model.model.rotary_emb); kvd's transformers adapter "
                          "supports RoPE models only")
    for i, layer in enumerate(core.layers):
        attn = getattr(layer, "self_attn", None)
        missing = [p for p in ATTN_PROJECTIONS if not hasattr(attn, p)]
        if missing:
            raise ConfigError(f"{name} layer {i}: the attention has no {', '.join(missing)} (multi-head latent "
                              "attention or another layout); kvd's transformers adapter supports Llama-style "
                              "attention only")
        if getattr(attn, "sliding_window", None) is not None:
            raise ConfigError(f"{name} layer {i} uses a sliding window, which kvd's attention does not apply; "
                              "sliding-window models are not supported")
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    sliding = any(t != "full_attention" for t in types) if types else getattr(cfg, "sliding_window", None) is not None
    if sliding:
        raise ConfigError(f"{name} uses sliding-window attention (config.sliding_window="
                          f"{getattr(cfg, 'sliding_window', None)}, layer_types={types}), which kvd's attention does "
                          "not apply; sliding-window models are not supported")


def model_spec(model: Any, *, model_id: str | None = None) -> ModelSpec:
    """The spec (hence fingerprint) of ``model``'s KV: content identity, KV dtype = the model's dtype."""
    cfg = model.config
    if getattr(model, "peft_config", None) and not model_id:
        raise ConfigError("the model has PEFT adapters loaded, which kvd cannot identify from the files; "
                          "pass model_id= naming the base model and adapter (their KV is not the base model's)")
    name = str(getattr(cfg, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or "model")
    revision = getattr(cfg, "_commit_hash", None)
    mid, rev = choose_model_id(name, explicit=model_id, revision=revision or "",
                               variant=_quantized_on_load(cfg, name, revision))
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    return ModelSpec.from_hf_config(cfg, model_id=mid, kv_dtype=dtype, revision=rev)


def head_map_for(head_map: HeadMap, spec: ModelSpec) -> HeadMap:
    """``head_map`` as the adapter uses and registers it for the model of ``spec``, or ``HeadMapError``.

    A map fits the model's shape, and its ``fingerprint`` (when set) names these weights: it is the
    model's fingerprint under the KV dtype the map was taken in. Taken in another dtype than the one
    this model serves (the shipped map: bf16; the fp32 model on a CPU), it is the same weights' map and
    is registered without the fingerprint, which the daemon would otherwise hold against this dtype's."""
    head_map.check_fits(spec.num_layers, spec.num_kv_heads, model=spec.model_id)
    fp = head_map.fingerprint
    if fp is None or fp == spec.fingerprint():
        return head_map
    if any(fp == replace(spec, kv_dtype=d).fingerprint() for d in DTYPE_BYTES):
        return head_map.model_copy(update={"fingerprint": None})
    raise HeadMapError(f"head map for {head_map.model!r} was made for other weights (fingerprint {fp}); "
                       f"{spec.model_id} is not them: profile a head map for this model (kvctl profile)")


__all__ = ["check_supported", "head_map_for", "model_spec"]
