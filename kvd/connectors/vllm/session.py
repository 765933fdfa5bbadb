"""The vLLM connector's settings and its session with the daemon (both engine roles use one each).

``ConnectorSettings`` is the ``kv_connector_extra_config`` dict, validated: unknown keys are errors, so a
typo never silently turns an option off. ``model_spec_from_vllm`` derives the model fingerprint from
what both roles see (the vLLM config and the KV-cache config), so the scheduler and the workers compute
the same keys without talking to each other.

``DaemonSession`` owns one ``KvdClient`` and the model registration. Lifecycle: created unregistered →
``handle()`` registers on first use (and again after a failure) → every call goes through ``call()``,
which turns any daemon failure into ``None`` and opens a circuit breaker: for ``retry_interval_s``
(doubling up to ``max_retry_interval_s``) no further call is attempted, so a dead or hung daemon
costs one bounded timeout per interval, not one per request. A success closes the breaker. kvd is a
best-effort cache: nothing here raises to vLLM except configuration errors at start-up.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvd.client.client import KvdClient
from kvd.client.prefix import ModelHandle, register
from kvd.core.errors import ConfigError, DaemonUnavailable, KvdError
from kvd.core.headmap import HeadMap
from kvd.core.keys import KV_DTYPE_BYTES, ModelSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ConnectorSettings(BaseModel):
    """``kv_connector_extra_config`` of ``KvdConnector`` (docs/vllm.md lists every key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    socket: str | None = None  # the daemon's Unix socket; None: kvd's default path
    namespace: str = Field(default="default", pattern=r"^[A-Za-z0-9_.:@/-]{1,96}$")
    head_map: str | None = None  # path of a head map JSON (placement only; loads are exact either way)
    model_id: str | None = None  # overrides vLLM's model name/path in the fingerprint
    timeout_s: float = Field(default=2.0, gt=0, le=60)  # one control call
    load_wait_s: float = Field(default=1.0, ge=0, le=60)  # a lease waits this long for SSD -> arena
    retry_interval_s: float = Field(default=1.0, gt=0, le=600)  # first back-off after a daemon failure
    max_retry_interval_s: float = Field(default=30.0, gt=0, le=3600)
    lookup_ttl_s: float = Field(default=1.0, ge=0, le=60)  # a request's cached lookup answer
    verify_checksums: bool = True  # check leased extents (xxh3) before copying them into vLLM

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
    name = str(dtype).removeprefix("torch.")
    if name not in KV_DTYPE_BYTES:
        raise ConfigError(f"KV cache dtype {name} is not supported by kvd (supported: {sorted(KV_DTYPE_BYTES)}); "
                          "run vLLM with kv_cache_dtype='auto' or remove the kvd connector")
    return name


def model_spec_from_vllm(vllm_config: Any, kv_cache_config: Any, settings: ConnectorSettings) -> ModelSpec:
    """The ``ModelSpec`` both roles derive from vLLM's configs (hence one fingerprint).

    Refuses, with what to change, the set-ups whose KV this connector cannot key or place correctly:
    several KV-cache groups (hybrid or sliding-window models), tensor or pipeline parallelism.
    """
    groups = list(kv_cache_config.kv_cache_groups)
    if len(groups) != 1:
        raise ConfigError(f"KvdConnector supports models with one KV-cache group; this one has {len(groups)} "
                          "(hybrid / sliding-window layers); remove the kvd connector for this model")
    spec = groups[0].kv_cache_spec
    head_v = getattr(spec, "head_size_v", None) or spec.head_size
    if head_v != spec.head_size or not hasattr(spec, "num_kv_heads"):
        raise ConfigError(f"KvdConnector needs attention KV with equal K and V head sizes; got {type(spec).__name__}")
    par = vllm_config.parallel_config
    if par.tensor_parallel_size != 1 or par.pipeline_parallel_size != 1:
        raise ConfigError(f"KvdConnector supports tensor_parallel_size=1 and pipeline_parallel_size=1; got "
                          f"{par.tensor_parallel_size} and {par.pipeline_parallel_size} (docs/vllm.md: what is left)")
    mc = vllm_config.model_config
    hf = mc.hf_config
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": getattr(hf, "rope_theta", None),
                                                      "rope_scaling": getattr(hf, "rope_scaling", None)}
    return ModelSpec(
        model_id=settings.model_id or str(mc.model),
        revision=str(getattr(mc, "revision", None) or ""),
        num_layers=len(groups[0].layer_names),
        num_kv_heads=int(spec.num_kv_heads),
        head_dim=int(spec.head_size),
        kv_dtype=kv_dtype_name(spec.dtype),
        rope=dict(rope),
        # kvd stores canonical K[T, D] | V[T, D] segments: the worker converts vLLM's layout (and the
        # CPU ISA's packing) on every copy, so KV is portable across engines, layouts and ISAs.
        layout="canonical",
    )


def load_head_map(settings: ConnectorSettings, spec: ModelSpec) -> HeadMap | None:
    if settings.head_map is None:
        return None
    hm = HeadMap.load(Path(settings.head_map).expanduser())
    hm.check_fits(spec.num_layers, spec.num_kv_heads, model=spec.model_id)
    return hm


class DaemonSession:
    """One role's connection to the daemon: registration, circuit breaker and counters."""

    def __init__(self, settings: ConnectorSettings, spec: ModelSpec, head_map: HeadMap | None, *,
                 block_size: int, role: Role, clock: Callable[[], float] = time.monotonic,
                 client: KvdClient | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.head_map = head_map
        self.block_size = block_size
        self.role = role
        self.clock = clock
        self.client = client or KvdClient(settings.socket, timeout_s=settings.timeout_s)
        self.counters: Counter[str] = Counter()
        self._handle: ModelHandle | None = None
        self._closed_until = 0.0  # breaker: no call before this time
        self._backoff_s = settings.retry_interval_s
        self.disabled_reason: str | None = None

    # ---- breaker ----------------------------------------------------------------------------------

    def is_open(self) -> bool:
        return self.disabled_reason is not None or self.clock() < self._closed_until

    def _trip(self, what: str, e: Exception) -> None:
        self.counters["daemon_failures"] += 1
        level = logging.WARNING if self._backoff_s == self.settings.retry_interval_s else logging.DEBUG
        logger.log(level, "kvd %s failed (%s); serving without it, next try in %.1f s", what, e, self._backoff_s)
        self._closed_until = self.clock() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self.settings.max_retry_interval_s)

    def _ok(self) -> None:
        if self._backoff_s != self.settings.retry_interval_s:
            logger.info("kvd is reachable again (%s)", self.role)
        self._backoff_s = self.settings.retry_interval_s

    # ---- registration and calls ------------------------------------------------------------------

    def handle(self) -> ModelHandle | None:
        """The registered model, registering first if needed; ``None`` while the breaker is open."""
        if self._handle is not None:
            return self._handle
        if self.is_open():
            return None
        try:
            h = register(self.client, self.spec, self.head_map, namespace=self.settings.namespace)
        except KvdError as e:
            self._trip("registration", e)
            return None
        self._check_chunk(h.chunk_tokens)
        if self.disabled_reason is None:
            self._handle = h
            self._ok()
            logger.info("kvd %s registered %s (fingerprint %s, chunk %d tokens)", self.role, self.spec.model_id,
                        h.fingerprint, h.chunk_tokens)
        return self._handle

    def _check_chunk(self, chunk_tokens: int) -> None:
        if chunk_tokens % self.block_size:
            self.disabled_reason = (
                f"the daemon's chunk_tokens={chunk_tokens} is not a multiple of vLLM's block_size="
                f"{self.block_size}; set KVD_KEYS__CHUNK_TOKENS to a multiple (e.g. "
                f"{max(1, chunk_tokens // self.block_size) * self.block_size}) or change --block-size")

    def require_compatible(self) -> None:
        """At start-up: register if the daemon is up; raise ``ConfigError`` if it can never work."""
        self.handle()
        if self.disabled_reason is not None:
            raise ConfigError(self.disabled_reason)
        if self._handle is None:
            logger.warning("kvd is not reachable at %s; vLLM serves without it and retries",
                           self.client.socket_path)

    def call(self, what: str, fn: Callable[[ModelHandle], T]) -> T | None:
        """``fn(handle)``, or ``None`` if the daemon is unavailable or refuses (counted, logged)."""
        h = self.handle()
        if h is None or self.is_open():
            self.counters[f"{what}_skipped"] += 1
            return None
        try:
            out = fn(h)
        except DaemonUnavailable as e:
            self._trip(what, e)
            return None
        except KvdError as e:  # the daemon refused: bad state, not a programming error here
            self.counters[f"{what}_refused"] += 1
            logger.warning("kvd refused %s: %s", what, e)
            return None
        self._ok()
        return out

    def close(self) -> None:
        self.client.close()
