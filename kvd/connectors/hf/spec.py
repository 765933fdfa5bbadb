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


__all__ = ["head_map_for", "model_spec"]
