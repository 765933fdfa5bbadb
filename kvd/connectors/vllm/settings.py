"""The vLLM connector's settings, and the daemon session each engine role opens with them.

``ConnectorSettings`` is the ``kv_connector_extra_config`` dict, validated: unknown keys are errors, so a
typo never silently turns an option off. ``model_spec_from_vllm`` derives the model fingerprint from
what both roles see (the vLLM config, the KV-cache config and the model's files: its ``model_id`` is
the content identity of ``kvd.core.identity``, as every kvd connector has it), so the scheduler and the
workers compute the same keys without talking to each other, and so does any other engine on the same
weights. ``open_session`` builds the role's
``kvd.client.session.DaemonSession`` (registration, circuit breaker) from the settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvd.client.client import KvdClient
from kvd.client.session import DaemonSession
from kvd.core import dtypes
from kvd.core.errors import ConfigError, InvalidRequest
from kvd.core.headmap import HeadMap, load_for_rank
from kvd.core.identity import choose_model_id, overrides_tag
from kvd.core.keys import ModelSpec


class ConnectorSettings(BaseModel):
    """``kv_connector_extra_config`` of ``KvdConnector`` (docs/vllm.md lists every key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    socket: str | None = None  # the daemon's Unix socket; None: kvd's default path
    namespace: str = Field(default="default", pattern=r"^[A-Za-z0-9_.:@/-]{1,96}$")
    head_map: str | None = None  # path of a head map JSON (placement only; loads are exact either way)
    model_id: str | None = None  # overrides the model's content identity in the fingerprint (kvd.core.identity)
    timeout_s: float = Field(default=2.0, gt=0, le=60)  # one control call
    # How long a load waits for chunks that must first come back from SSD or the remote store into
    # the arena; what has not arrived by then is recomputed by vLLM.
    load_wait_s: float = Field(default=1.0, ge=0, le=60)
    # true: that wait happens before the request is scheduled (the scheduler asks vLLM to skip it
    # while the daemon promotes its chunks; the rest of the batch runs meanwhile); false: inside the
    # step's lease, which stalls every request of the batch (kvd.connectors.vllm.scheduler).
    wait_unscheduled: bool = True
    retry_interval_s: float = Field(default=1.0, gt=0, le=600)  # first back-off after a daemon failure
    max_retry_interval_s: float = Field(default=30.0, gt=0, le=3600)
    lookup_ttl_s: float = Field(default=1.0, ge=0, le=60)  # a request's cached lookup answer
    verify_checksums: bool = True  # check leased extents (xxh3) before vLLM's output can depend on them
    # Hash each layer's rows right after copying them, compare at the step's end (a mismatch: vLLM drops
    # the step's output for the request and recomputes; kvd.connectors.vllm.sums). Needs
    # kv_load_failure_policy "recompute"; false, or another policy: hash each lease before copying.
    verify_with_copy: bool = True
    # true: the worker maps every page of the arena at start (kvd.client.arena), so a fresh engine's first
    # loads do not fault pages in. Off by default: ~5 ms per fresh 4K load (docs/vllm.md) for ~0.1 s and
    # 2 MiB of page tables per GiB of arena, and pages stay mapped after their first use anyway.
    populate_arena: bool = False
    # Load extents kvd holds only in lossy form (codec.local_cold_codec = fp8/int8), flagged, instead of
    # recomputing them. Off by default: vLLM then gets exact KV or recomputes (docs/vllm.md: fidelity).
    accept_lossy: bool = False
    # Also store the full chunks that decode steps complete (prompt + generated tokens), so a
    # conversation's next turn loads the previous answer too, as vLLM's own prefix cache reuses generated
    # blocks (kvd.connectors.vllm.scheduler). LMCache's counterpart, save_decode_cache, is off by default.
    save_decode: bool = True

    @classmethod
    def parse(cls, extra: dict[str, Any] | None) -> ConnectorSettings:
        try:
            return cls.model_validate(extra or {})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise ConfigError(f"kv_connector_extra_config.{where}: {first['msg']}; the keys KvdConnector "
                              f"reads are {sorted(cls.model_fields)} (docs/vllm.md)") from None


Role = Literal["scheduler", "worker"]


def kv_dtype_name(dtype: Any) -> str:
    """vLLM's KV cache dtype by kvd's name; ``ConfigError`` (at start-up) for one kvd does not handle."""
    try:
        return dtypes.kv_dtype_name(dtype)
    except InvalidRequest as e:
        raise ConfigError(f"vLLM's KV cache: {e}; run vLLM with kv_cache_dtype='auto' or remove the kvd "
                          "connector") from None


def model_spec_from_vllm(vllm_config: Any, kv_cache_config: Any, settings: ConnectorSettings, *,
                         tp_rank: int | None = 0) -> ModelSpec:
    """The ``ModelSpec`` of tensor-parallel rank ``tp_rank``'s KV, derived from vLLM's configs by both
    roles (hence one fingerprint per rank); ``tp_rank=None``: the whole model's (every KV head, as a
    one-rank engine registers it), against which a head map is checked before it is split.

    Under tensor parallelism each rank holds its own KV heads (``kv_cache_spec.num_kv_heads`` is the
    rank's count): the rank goes into ``model_id`` (``[tp<rank>/<size>]``, as kvd's SGLang backend names
    a shard), so every rank registers a model of its own and ranks never read each other's KV.
    Refuses, with what to change, the set-ups whose KV this connector cannot key or place correctly:
    several KV-cache groups (hybrid or sliding-window models), pipeline parallelism, decode context
    parallelism.
    """
    groups = list(kv_cache_config.kv_cache_groups)
    if len(groups) != 1:
        raise ConfigError(f"KvdConnector supports models with one KV-cache group; this one has {len(groups)} "
                          "(hybrid / sliding-window layers); remove the kvd connector for this model")
    spec = groups[0].kv_cache_spec
    _require_full_attention(spec)
    head_v = getattr(spec, "head_size_v", None)  # None: unset (K's); MLA's 0 is no V at all
    if (spec.head_size if head_v is None else head_v) != spec.head_size or not hasattr(spec, "num_kv_heads"):
        raise ConfigError(f"KvdConnector needs attention KV with equal K and V head sizes; got {type(spec).__name__}")
    par = vllm_config.parallel_config
    if par.pipeline_parallel_size != 1:
        raise ConfigError(f"KvdConnector supports pipeline_parallel_size=1; got {par.pipeline_parallel_size} "
                          "(docs/vllm.md: what is left)")
    dcp = int(getattr(par, "decode_context_parallel_size", 1) or 1)
    if dcp != 1:  # a block spans block_size x dcp tokens, interleaved over the ranks: not the connector's map
        raise ConfigError(f"KvdConnector supports decode_context_parallel_size=1; got {dcp} (each rank's blocks "
                          "hold every dcp-th token); remove the kvd connector or decode context parallelism")
    tp = tp_size(vllm_config) if tp_rank is not None else 1
    mc = vllm_config.model_config
    hf = mc.hf_config
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": getattr(hf, "rope_theta", None),
                                                      "rope_scaling": getattr(hf, "rope_scaling", None)}
    # The model's content identity (kvd.core.identity): the transformers adapter and SGLang's backend
    # derive the same one from the same files, so KV is shared across engines without a model_id.
    model_id, revision = choose_model_id(str(mc.model), explicit=settings.model_id,
                                         revision=str(getattr(mc, "revision", None) or ""),
                                         variant=_load_changes(mc, settings, getattr(vllm_config, "load_config", None)))
    return ModelSpec(
        model_id=model_id + (f" [tp{tp_rank}/{tp}]" if tp > 1 else ""),
        revision=revision,
        num_layers=len(groups[0].layer_names),
        num_kv_heads=int(spec.num_kv_heads) if tp_rank is not None else int(mc.get_total_num_kv_heads()),
        head_dim=int(spec.head_size),
        kv_dtype=kv_dtype_name(spec.dtype),
        rope=dict(rope),
        # kvd stores canonical K[T, D] | V[T, D] segments: the worker converts vLLM's layout (and the
        # CPU ISA's packing) on every copy, so KV is portable across engines, layouts and ISAs.
        layout="canonical",
    )


def _require_full_attention(spec: Any) -> None:
    """Refuse a KV-cache group whose blocks do not all hold the KV of their tokens as a causal prefix
    computes it. One group of ``SlidingWindowSpec`` (a model whose every layer is sliding-window; vLLM
    promotes such layers to full allocation only beside full-attention ones) or ``ChunkedLocalAttentionSpec``
    gets the null block in place of the blocks behind its window, which saves would read as a chunk's
    KV; MLA holds one latent, not K and V; a non-causal (prefix-LM) layer's KV of a token depends on the
    tokens after it, so no prefix key names it. A ``FullAttentionSpec`` with a ``sliding_window`` (a
    hybrid model with HMA off) keeps every block and is accepted."""
    from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

    if isinstance(spec, AttentionSpec) and (type(spec) is not FullAttentionSpec or spec.non_causal):
        raise ConfigError(f"KvdConnector supports causal full-attention KV caches only; this model's is "
                          f"{type(spec).__name__}{' (non-causal)' if getattr(spec, 'non_causal', False) else ''} "
                          "(sliding-window, chunked-local, MLA or non-causal); remove the kvd connector for it")


def tp_size(vllm_config: Any) -> int:
    return int(vllm_config.parallel_config.tensor_parallel_size)


def _load_changes(mc: Any, settings: ConnectorSettings, load_config: Any = None) -> str | None:
    """What vLLM changes of the files' model on load, as ``choose_model_id``'s ``variant``: random
    weights (``load_format="dummy"``, for benchmarks: its KV is noise), weights quantized at load
    (``_quantized_on_load``) and ``hf_overrides`` (``cfg-<hash>``: any overridden config value may
    change the KV, and the content identity hashes the files' config.json). A callable override cannot
    be named: refused unless ``model_id`` names the model."""
    fmt = getattr(load_config, "load_format", None)  # a str, or vLLM's LoadFormats enum
    parts = ["dummy" if str(getattr(fmt, "value", fmt)) == "dummy" else None, _quantized_on_load(mc)]
    overrides = getattr(mc, "hf_overrides", None)
    if callable(overrides):
        if not settings.model_id:
            raise ConfigError("vLLM's hf_overrides is a function, whose changes to the model kvd cannot name; set "
                              "model_id in kv_connector_extra_config to name the model it makes")
    elif overrides:
        parts.append(overrides_tag(overrides))
    return "+".join(p for p in parts if p) or None


def _quantized_on_load(mc: Any) -> str | None:
    """vLLM's quantization method when it quantizes weights the files hold unquantized (``quantization=
    "fp8"`` on a bf16 checkpoint): such an engine's KV differs from one running the files as they are.
    A pre-quantized checkpoint declares it in its config.json, which the content identity covers."""
    method = getattr(mc, "quantization", None)
    if not method or getattr(mc.hf_config, "quantization_config", None):
        return None
    return str(method)


def load_head_map(settings: ConnectorSettings, spec: ModelSpec, *, whole: ModelSpec | None = None, rank: int = 0,
                  size: int = 1) -> HeadMap | None:
    """The ``head_map`` setting's map for ``spec``; under tensor parallelism (``size`` ranks) the rank's
    part of the whole model's map (``kvd.core.headmap.load_for_rank``)."""
    if settings.head_map is None:
        return None
    return load_for_rank(settings.head_map, spec, whole=whole, rank=rank, size=size)


def open_session(settings: ConnectorSettings, spec: ModelSpec, head_map: HeadMap | None, *, block_size: int,
                 role: Role, clock: Callable[[], float] = time.monotonic,
                 client: KvdClient | None = None) -> DaemonSession:
    """The role's session with the daemon (not registered yet: ``handle()`` registers on first use)."""
    client = client or KvdClient(settings.socket, timeout_s=settings.timeout_s,
                                 populate_arena=settings.populate_arena and role == "worker")
    return DaemonSession(client, spec, head_map,
                         namespace=settings.namespace, role=role, block_tokens=block_size,
                         retry_interval_s=settings.retry_interval_s,
                         max_retry_interval_s=settings.max_retry_interval_s, clock=clock)
