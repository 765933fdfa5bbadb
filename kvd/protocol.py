"""The control API's request and response models, shared by the API handlers and the client.

One module for both sides, so they cannot drift apart. Every model forbids unknown fields: a typo in
a request is a 400 that names the field, not a silently ignored option. Routes are versioned
(``/v1/...``); ``API_VERSION`` changes when a model changes incompatibly.

Wire format: JSON bodies (pydantic parses them in Rust). Token ids may be sent, but clients normally
send the 128-bit prefix hashes they computed with ``kvd.keys`` (32 hex chars per 256-token chunk), which
keeps a 32K-token lookup under 5 KB.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvd.errors import InvalidRequest
from kvd.headmap import HeadMap
from kvd.keys import check_hash, check_namespace

API_VERSION = "v1"

EntryKind = Literal["prefix", "chunk"]
TierName = Literal["host", "ssd", "remote"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _hash(v: str) -> str:
    try:
        return check_hash(v)
    except InvalidRequest as e:
        raise ValueError(str(e)) from None


def _hashes(v: list[str] | None) -> list[str] | None:
    if v is not None:
        for h in v:
            _hash(h)
    return v


def _namespace(v: str) -> str:
    try:
        return check_namespace(v)
    except InvalidRequest as e:
        raise ValueError(str(e)) from None


class ErrorBody(_Model):
    error: str  # the KvdError code, e.g. "invalid_request"
    message: str


# ---- models -----------------------------------------------------------------------------------


class RegisterModelRequest(_Model):
    model_id: str = Field(min_length=1, max_length=512)
    revision: str = Field(default="", max_length=256)
    num_layers: int = Field(gt=0, le=4096)
    num_kv_heads: int = Field(gt=0, le=4096)
    head_dim: int = Field(gt=0, le=4096)
    kv_dtype: str = "bfloat16"
    rope: dict[str, Any] = Field(default_factory=dict)
    layout: str = Field(default="canonical", max_length=128)
    head_map: HeadMap | None = None
    # When given, must equal the fingerprint the daemon computes from the fields above.
    fingerprint: str | None = None


class ArenaInfo(_Model):
    path: str
    capacity_bytes: int
    slot_bytes: int
    arena_id: str


class RegisterModelResponse(_Model):
    fingerprint: str
    chunk_tokens: int
    arena: ArenaInfo
    head_map_method: str
    num_global_heads: int


class ModelInfo(_Model):
    fingerprint: str
    model_id: str
    revision: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str
    layout: str
    head_map_method: str
    num_global_heads: int
    num_entries: int
    bytes_by_tier: dict[str, int]


class ModelsResponse(_Model):
    models: list[ModelInfo]


# ---- entries ----------------------------------------------------------------------------------


class ExtentInfo(_Model):
    """One extent of an entry as the client sees it: where it lies in the arena and its checksum."""

    head_class: str
    offset: int  # byte offset in the arena
    nbytes: int  # bytes of KV in the extent (the slot run may be longer)
    checksum: str | None = None  # xxh3-64 hex of the extent's bytes, once committed


class ReserveEntry(_Model):
    hash: str
    kind: EntryKind = "prefix"
    num_tokens: int = Field(gt=0, le=1 << 20)
    # Position of the entry's first token in the sequence it came from, and that sequence's length
    # at store time: the placement policy uses them to tell which local-head tokens are in the window.
    start_token: int = Field(default=0, ge=0)
    end_token: int | None = Field(default=None, ge=0)

    @field_validator("hash")
    @classmethod
    def check_hash_field(cls, v: str) -> str:
        return _hash(v)


class ReserveRequest(_Model):
    fingerprint: str
    namespace: str = "default"
    entries: list[ReserveEntry]

    @field_validator("namespace")
    @classmethod
    def check_namespace_field(cls, v: str) -> str:
        return _namespace(v)


class ReservedEntry(_Model):
    hash: str
    # reserved: write the extents, then commit. exists: already stored (or being stored by another
    # client): skip it. no_space: the arena is full and nothing can be evicted right now.
    status: Literal["reserved", "exists", "no_space"]
    extents: list[ExtentInfo] = Field(default_factory=list)


class ReserveResponse(_Model):
    reservation_id: str | None
    expires_in_s: float
    arena_id: str
    entries: list[ReservedEntry]


class CommitRequest(_Model):
    reservation_id: str
    # Commit only these entries of the reservation (the rest are aborted); None: all of them.
    hashes: list[str] | None = None
    # Seconds the client spent copying the reservation's bytes in (for the bytes/seconds counters).
    transfer_s: float = Field(default=0.0, ge=0, le=3600)

    @field_validator("hashes")
    @classmethod
    def check_hashes_field(cls, v: list[str] | None) -> list[str] | None:
        return _hashes(v)


class CommitResponse(_Model):
    committed: list[str]


class AbortRequest(_Model):
    reservation_id: str


class LookupRequest(_Model):
    fingerprint: str
    namespace: str = "default"
    # Prefix entries: token ids (the daemon chunks and hashes them) or the client's own prefix hashes.
    token_ids: list[int] | None = None
    prefix_hashes: list[str] | None = None
    # Chunk entries (content hashes) to look up, in any order.
    chunk_hashes: list[str] | None = None
    # Start moving entries found only on slower tiers into the arena.
    prefetch: bool = True

    @field_validator("namespace")
    @classmethod
    def check_namespace_field(cls, v: str) -> str:
        return _namespace(v)
    @field_validator("prefix_hashes", "chunk_hashes")
    @classmethod
    def check_hashes_field(cls, v: list[str] | None) -> list[str] | None:
        return _hashes(v)


class EntryStatus(_Model):
    hash: str
    tier: TierName | None  # fastest tier holding it; None: not stored
    classes: list[str] = Field(default_factory=list)  # head classes available (all of them: complete)
    complete: bool = False
    num_tokens: int = 0


class LookupResponse(_Model):
    chunk_tokens: int
    # Leading prefix chunks stored *completely* (every head class): what an exact engine can load.
    num_prefix_hits: int
    prefix: list[EntryStatus]
    chunks: list[EntryStatus]


class LeaseRequest(_Model):
    fingerprint: str
    namespace: str = "default"
    hashes: list[str]
    # Only these head classes are needed (e.g. a head-aware reader that recomputes global heads).
    classes: list[str] | None = None
    # How long to wait for entries being prefetched from slower tiers; None: the daemon's default.
    wait_s: float | None = Field(default=None, ge=0, le=600)

    @field_validator("namespace")
    @classmethod
    def check_namespace_field(cls, v: str) -> str:
        return _namespace(v)
    @field_validator("hashes")
    @classmethod
    def check_hashes_field(cls, v: list[str] | None) -> list[str] | None:
        return _hashes(v)


class LeasedEntry(_Model):
    hash: str
    status: Literal["ok", "missing", "timeout", "corrupt"]
    num_tokens: int = 0
    extents: list[ExtentInfo] = Field(default_factory=list)


class LeaseResponse(_Model):
    lease_id: str | None
    expires_in_s: float
    arena_id: str
    entries: list[LeasedEntry]


class ReleaseRequest(_Model):
    lease_id: str
    transfer_s: float = Field(default=0.0, ge=0, le=3600)


class EntriesRequest(_Model):
    """Delete / pin / unpin: entries by hash within a namespace (and model, if given)."""

    namespace: str = "default"
    fingerprint: str | None = None
    hashes: list[str]

    @field_validator("namespace")
    @classmethod
    def check_namespace_field(cls, v: str) -> str:
        return _namespace(v)
    @field_validator("hashes")
    @classmethod
    def check_hashes_field(cls, v: list[str] | None) -> list[str] | None:
        return _hashes(v)


class CountResponse(_Model):
    count: int


class EntryInfo(_Model):
    hash: str
    namespace: str
    fingerprint: str
    kind: EntryKind
    num_tokens: int
    tiers: list[str]
    nbytes: int
    pinned: bool
    leases: int
    reuse_count: int
    age_s: float
    idle_s: float


class EntriesResponse(_Model):
    entries: list[EntryInfo]
    truncated: bool


class EvictRequest(_Model):
    tier: TierName = "host"
    namespace: str | None = None
    fingerprint: str | None = None
    # Evict at most this many bytes (None: everything evictable that matches).
    max_bytes: int | None = Field(default=None, ge=0)


class FlushRequest(_Model):
    namespace: str | None = None
    fingerprint: str | None = None
    hashes: list[str] | None = None  # only these entries (with namespace and fingerprint); None: all matching

    @field_validator("hashes")
    @classmethod
    def check_hashes_field(cls, v: list[str] | None) -> list[str] | None:
        return _hashes(v)


class TierStatsBody(_Model):
    name: str
    capacity_bytes: int
    used_bytes: int
    num_records: int


class StatsResponse(_Model):
    uptime_s: float
    tiers: list[TierStatsBody]
    num_entries: int
    num_models: int
    leases_held: int
    reservations_open: int
    lookup_tokens: int
    hit_tokens_by_tier: dict[str, int]
    counters: dict[str, float]


class HealthResponse(_Model):
    status: Literal["ok", "shutting_down"]
    version: str
    api: str
    uptime_s: float
    arena_id: str
