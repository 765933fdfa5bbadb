"""The SGLang backend's settings (the extra-config JSON), the model fingerprint, and the daemon session.

``BackendSettings`` validates ``--hicache-storage-backend-extra-config``: the keys SGLang itself reads
(``SGLANG_KEYS``) are let through, any other unknown key is an error, so a typo never silently turns an
option off. ``model_spec_from_sglang`` derives the ``ModelSpec`` (hence the fingerprint every key
carries) from what the backend sees: SGLang's storage config (model name, parallel ranks), the host
pool (layers, KV heads, head dim, dtype), RoPE from the model's Hugging Face config when it can be
read, and ``model_id`` = the content identity of the model's files (``kvd.core.identity``; the
``model_id`` setting overrides it). With ``tp_size == 1`` this is the fingerprint vLLM's kvd connector
and the transformers adapter derive for the same files, so the daemon sees one model whichever engine
registers it (``tests/connectors/sglang/test_cross_engine.py`` checks it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvd.client.client import KvdClient
from kvd.client.session import DaemonSession
from kvd.connectors.sglang.pages import HostPages
from kvd.core import dtypes
from kvd.core.errors import ConfigError, InvalidRequest
from kvd.core.headmap import HeadMap, load_for_rank
from kvd.core.identity import choose_model_id, overrides_tag, resolve_model_dir
from kvd.core.keys import ModelSpec

logger = logging.getLogger(__name__)

# Keys of the extra config that SGLang reads itself (factory, controller, radix cache): not kvd's.
SGLANG_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1", "prefetch_threshold",
                         "prefetch_timeout_base", "prefetch_timeout_per_ki_token", "hicache_storage_pass_prefix_keys",
                         "tp_lcm_size"})


class BackendSettings(BaseModel):
    """kvd's keys of the extra config (docs/sglang.md lists every key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    socket: str | None = None  # the daemon's Unix socket; None: kvd's default path
    namespace: str = Field(default="default", pattern=r"^[A-Za-z0-9_.:@/-]{1,96}$")
    model_id: str | None = None  # overrides the model's content identity in the fingerprint
    model_path: str | None = None  # HF model dir (RoPE, content identity); None: the model name, if it is a dir
    revision: str = Field(default="", max_length=256)  # with model_id, or a hub name found in no local copy
    head_map: str | None = None  # head map JSON (placement only; loads are exact either way)
    timeout_s: float = Field(default=2.0, gt=0, le=60)  # one control call
    load_wait_s: float = Field(default=1.0, ge=0, le=60)  # a lease waits this long for SSD -> arena
    retry_interval_s: float = Field(default=1.0, gt=0, le=600)  # first back-off after a daemon failure
    max_retry_interval_s: float = Field(default=30.0, gt=0, le=3600)
    verify_checksums: bool = True  # check leased extents (xxh3) before copying them into SGLang's pool
    populate_arena: bool = False  # map every arena page at start, not on first use (kvd.client.arena)

    @classmethod
    def parse(cls, extra: dict[str, Any] | None) -> BackendSettings:
        ours = {k: v for k, v in (extra or {}).items() if k not in SGLANG_KEYS}
        try:
            return cls.model_validate(ours)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise ConfigError(f"--hicache-storage-backend-extra-config: {where}: {first['msg']}; kvd reads "
                              f"{sorted(cls.model_fields)}, SGLang reads {sorted(SGLANG_KEYS)} (docs/sglang.md)") from None


def _rope_of(path: Path) -> dict[str, Any] | None:
    """RoPE parameters as vLLM sees them (transformers' normalised config), else None."""
    if not (path / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # a model config kvd cannot read only costs cross-engine sharing
        logger.warning("kvd: cannot read the model config at %s (%s); RoPE left out of the fingerprint", path, e)
        return None
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None),
                                                      "rope_scaling": getattr(cfg, "rope_scaling", None)}
    return dict(rope)


def _load_changes(server_args: Any, config_dir: Path | None, kv_dtype: str) -> str | None:
    """What SGLang changes of the files' model on load (``choose_model_id``'s ``variant``), from its
    server arguments: random weights (``--load-format dummy``), weights quantized at load
    (``--quantization`` on a checkpoint whose config.json has no ``quantization_config``), config
    overrides (``--json-model-override-args``, e.g. YaRN RoPE), and fp8 KV scaled by a file's factors (``--quantization-param-path``). Each computes other KV than
    the plain files, so it must never share the plain files' fingerprint."""
    if server_args is None:
        return None
    parts = []
    if str(getattr(server_args, "load_format", None) or "") == "dummy":  # random weights, not the files'
        parts.append("dummy")
    method = getattr(server_args, "quantization", None)
    if method and "quantization_config" not in _file_config(config_dir):
        parts.append(str(method))
    overrides = getattr(server_args, "json_model_override_args", None) or "{}"
    try:
        doc = json.loads(overrides) if isinstance(overrides, str) else overrides
    except ValueError:
        doc = overrides
    if doc:
        parts.append(overrides_tag(doc))
    scales = getattr(server_args, "quantization_param_path", None)
    if scales and kv_dtype.startswith("float8"):  # SGLang reads the factors only for fp8 KV
        try:
            raw = Path(scales).read_bytes()
        except OSError:
            raw = str(scales).encode()
        parts.append("kvscales-" + _digest(raw))
    return "+".join(parts) or None


def _digest(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def _file_config(config_dir: Path | None) -> dict[str, Any]:
    try:
        doc = json.loads((config_dir / "config.json").read_text()) if config_dir is not None else {}
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def model_spec_from_sglang(storage_config: Any, pages: HostPages, settings: BackendSettings, *,
                           whole_heads: int | None = None, server_args: Any = None) -> ModelSpec:
    """The ``ModelSpec`` of this rank's KV. Refuses (``ConfigError``) what kvd cannot key correctly.

    A rank that holds part of the model (tensor, pipeline or attention context parallelism) keys its
    own heads or layers: the shard goes into ``model_id``, so ranks never read each other's KV.
    ``whole_heads``: the whole model's spec instead (that many KV heads, no shard), as a one-rank engine
    registers it, against which a head map is checked before it is split (``load_head_map``).
    ``server_args``: SGLang's, for what it changes of the model on load (``_load_changes``)."""
    if getattr(storage_config, "is_mla_model", False):
        raise ConfigError("kvd's SGLang backend stores MHA KV per head; this model uses MLA (remove the kvd backend)")
    name = settings.model_id or storage_config.model_name or ""
    if not name:
        raise ConfigError("SGLang passed no model name; set \"model_id\" in the extra config")
    shard = [f"{what}{rank}/{size}" for what, rank, size in (
        ("tp", storage_config.tp_rank, storage_config.tp_size), ("pp", storage_config.pp_rank, storage_config.pp_size),
        ("cp", storage_config.attn_cp_rank, storage_config.attn_cp_size)) if size > 1 and whole_heads is None]
    if storage_config.pp_size > 1 and whole_heads is None:  # a stage's layers: SGLANG_PP_LAYER_PARTITION's
        shard.append(f"layers{pages.start_layer}-{pages.start_layer + pages.num_layers}")
    path = Path(settings.model_path or str(storage_config.model_name or "")).expanduser()
    # The content identity of the model's files (kvd.core.identity), as vLLM's connector and the
    # transformers adapter derive it: one model, one fingerprint, whichever engine registers it.
    source = path if str(path) else name
    # SGLang's --revision names the hub snapshot it loads (as vLLM's, which its connector passes)
    revision = settings.revision or str(getattr(server_args, "revision", None) or "")
    # A hub name (org/model) reads its config from the local hub snapshot, as vLLM's hf_config does:
    # looking only for a directory of that name left RoPE out, so the same model never shared KV
    # between the two engines.
    model_dir = resolve_model_dir(source, revision or None) if str(path) else None
    rope = _rope_of(model_dir) if model_dir is not None and model_dir.is_dir() else None
    if rope is None:
        logger.warning("kvd: no model config found for %r; the fingerprint has no RoPE parameters, so KV is "
                       "shared only with engines that also leave them out (set \"model_path\")", name)
    try:
        kv_dtype = dtypes.kv_dtype_name(pages.dtype)
    except InvalidRequest as e:
        raise ConfigError(f"SGLang's host KV pool: {e}") from None
    model_id, revision = choose_model_id(source, explicit=settings.model_id, revision=revision,
                                         variant=_load_changes(server_args, model_dir, kv_dtype))
    return ModelSpec(model_id=model_id + (f" [{' '.join(shard)}]" if shard else ""), revision=revision,
                     num_layers=pages.num_layers, num_kv_heads=whole_heads or pages.num_heads, head_dim=pages.head_dim,
                     kv_dtype=kv_dtype, rope=rope or {}, layout="canonical")


def load_head_map(settings: BackendSettings, spec: ModelSpec, storage_config: Any, pages: HostPages,
                  server_args: Any = None) -> HeadMap | None:
    """The ``head_map`` setting's map for this rank: under tensor parallelism, the rank's heads' part of
    the whole model's map (``kvd.core.headmap.load_for_rank``; the whole model's KV head count is read
    from its config.json). Pipeline or context parallelism with a head map is refused."""
    if settings.head_map is None:
        return None
    tp = int(storage_config.tp_size)
    if tp == 1:
        return load_for_rank(settings.head_map, spec)
    if storage_config.pp_size > 1 or storage_config.attn_cp_size > 1:
        raise ConfigError("kvd's SGLang backend takes a head_map under tensor parallelism only (not with "
                          "pipeline or attention context parallelism); remove \"head_map\" from the extra config")
    total = _total_kv_heads(Path(settings.model_path or str(storage_config.model_name or "")).expanduser())
    if total is None:
        raise ConfigError("a head_map under tensor parallelism needs the model's config.json (its KV head count "
                          "is split over the ranks); set \"model_path\" in the extra config")
    whole = model_spec_from_sglang(storage_config, pages, settings, whole_heads=total, server_args=server_args)
    return load_for_rank(settings.head_map, spec, whole=whole, rank=int(storage_config.tp_rank), size=tp)


def _total_kv_heads(path: Path) -> int | None:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    n = cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
    return n if isinstance(n, int) and n > 0 else None


def open_session(settings: BackendSettings, spec: ModelSpec, head_map: HeadMap | None, *,
                 clock: Callable[[], float] = time.monotonic) -> DaemonSession:
    """The backend's session with the daemon (registers on first use, circuit breaker)."""
    client = KvdClient(settings.socket, timeout_s=settings.timeout_s, populate_arena=settings.populate_arena)
    return DaemonSession(client, spec, head_map,
                         namespace=settings.namespace, role="sglang", block_tokens=1,
                         retry_interval_s=settings.retry_interval_s,
                         max_retry_interval_s=settings.max_retry_interval_s, clock=clock)


def describe(spec: ModelSpec, pages: HostPages) -> str:
    return json.dumps({"model_id": spec.model_id, "layout": pages.layout, "page_size": pages.page_size,
                       "fingerprint": spec.fingerprint()})
