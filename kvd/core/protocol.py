"""The control API's request and response models, shared by the API handlers and the client.

One module for both sides, so they cannot drift apart. Every model forbids unknown fields: a typo in
a request is a 400 that names the field, not a silently ignored option. Routes are versioned
(``/v1/...``); ``API_VERSION`` changes when a model changes incompatibly.

Wire format: JSON bodies (pydantic parses them in Rust). Token ids may be sent, but clients normally
send the 128-bit prefix hashes they computed with ``kvd.core.keys`` (32 hex chars per 256-token chunk), which
keeps a 32K-token lookup under 5 KB. The lookup, the call on every request's path, also speaks a
compact binary form (``kvd.core.lookup_wire``, ``Content-Type: application/x-kvd-lookup``): raw 16-byte
hashes in, fixed-size rows out, decoded into the same fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from kvd.core.errors import InvalidRequest
from kvd.core.headmap import HeadMap
from kvd.core.keys import EXACT, check_attention, check_namespace
from kvd.core.protocol_gpu import GpuPoolInfo

API_VERSION = "v1"

EntryKind = Literal["prefix", "chunk"]
# A 128-bit entry hash as 32 lowercase hex chars; checked by pydantic-core (in Rust), which keeps a
# 128-hash lookup cheap. The API rewrites the pattern error into words (``kvd.daemon.api._describe``).
HASH_PATTERN = r"^[0-9a-f]{32}$"
Hash = Annotated[str, StringConstraints(pattern=HASH_PATTERN)]
Xxh3Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]  # an xxh3-64 digest, as ExtentInfo gives it
TierName = Literal["gpu", "host", "ssd", "remote"]


def describe_validation_error(e: ValidationError, limit: int = 5) -> str:
    """One line naming each bad field and what was wrong, e.g. for a 400 answer or a kvctl usage error."""
    parts = []
    for err in e.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "(body)"
        msg = err["msg"]
        if err["type"] == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == HASH_PATTERN:
            msg = f"{err['input']!r} is not an entry hash (32 lowercase hex characters)"
        parts.append(f"{loc}: {msg}")
    more = f" (and {e.error_count() - limit} more)" if e.error_count() > limit else ""
    return f"{e.title}: " + "; ".join(parts) + more


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _checked(check):
    """A field validator from a ``kvd.core.keys`` check: its ``InvalidRequest`` becomes the field's error."""
    def validate(v: str) -> str:
        try:
            return check(v)
        except InvalidRequest as e:
            raise ValueError(str(e)) from None
    return validate


NamespaceStr = Annotated[str, AfterValidator(_checked(check_namespace))]  # tenant / cache salt, checked
# What the KV was (or the reader's KV will be) computed under: "exact" or a head map's tag
# (``kvd.core.keys.attention_tag``). An entry is served only to readers of the same tag.
AttentionStr = Annotated[str, AfterValidator(_checked(check_attention))]
MAX_POSITION = 1 << 40  # token positions beyond this are not a real sequence


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
    index_path: str | None = None  # the shared lookup index beside the arena (kvd.core.index_file), if published
    file_id: str | None = None  # "<st_dev>:<st_ino>" of its file: a client checks it opened that one at path


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
    """One extent of an entry as the client sees it: where it lies (the arena, or the GPU pool), its checksum."""

    head_class: str
    offset: int  # byte offset in the arena (tier "host") or in the GPU pool (tier "gpu")
    nbytes: int  # bytes of KV in the extent (the slot run may be longer)
    checksum: str | None = None  # xxh3-64 hex of the extent's bytes, once committed
    lossy: bool = False  # bytes from a lossy codec (fp8/int8): only ever sent to readers that accept them
    tier: Literal["host", "gpu"] = "host"  # the memory tier it lies in (kvd.tiers.gpu: the GPU pool)
    tokens: tuple[int, int] | None = None  # trimmed (capacity mode): only the entry's tokens [lo, hi)
    # its plan's ``ExtentPlan.layout`` (which heads, how): a client of another plan neither reads nor writes it
    layout: str | None = None


class PrefixAlias(_Model):
    """Another key for the first ``num_tokens`` tokens of a prefix entry (``kvd.core.keys.prefix_aliases``)."""

    hash: Hash
    num_tokens: int = Field(gt=0, le=1 << 20)


class ReserveEntry(_Model):
    hash: Hash
    kind: EntryKind = "prefix"
    num_tokens: int = Field(gt=0, le=1 << 20)
    # Where the entry starts in its sequence, and that sequence's length at store time (placement's window).
    start_token: int = Field(default=0, ge=0, le=MAX_POSITION)
    end_token: int | None = Field(default=None, ge=0, le=MAX_POSITION)
    # Keys of block-aligned proper prefixes (for readers of fewer tokens); registered at commit, or at once.
    aliases: list[PrefixAlias] = Field(default_factory=list, max_length=4096)


class ReserveRequest(_Model):
    fingerprint: str
    namespace: NamespaceStr = "default"
    computed_under: AttentionStr = EXACT
    entries: list[ReserveEntry]
    gpu: bool = False  # the writer maps the daemon's GPU pool: reserve there first (kvd.client.gpu_pool)


class ReservedEntry(_Model):
    hash: str
    # reserved: write, then commit. exists: stored (or being stored) already: skip it. no_space: none now.
    status: Literal["reserved", "exists", "no_space"]
    extents: list[ExtentInfo] = Field(default_factory=list)


class ReserveResponse(_Model):
    reservation_id: str | None
    expires_in_s: float
    arena_id: str
    entries: list[ReservedEntry]
    gpu_pool: GpuPoolInfo | None = None  # the pool the "gpu" extents lie in


class CommitRequest(_Model):
    reservation_id: str
    hashes: list[Hash] | None = None  # commit only these entries (the rest are aborted); None: all
    transfer_s: float = Field(default=0.0, ge=0, le=3600)  # seconds spent copying in (for the counters)
    # The writer's xxh3-64 of each extent (the reservation's order) per entry hash, taken right after its copy;
    # the daemon keeps them and hashes what is left out or null itself (docs/api.md, "Checksums at commit")
    checksums: dict[Hash, list[Xxh3Hex | None]] | None = None


class CommitResponse(_Model):
    committed: list[str]


class AbortRequest(_Model):
    reservation_id: str


class _Read(_Model):  # what a lookup and a lease share
    fingerprint: str
    namespace: NamespaceStr = "default"
    computed_under: AttentionStr = EXACT
    # Extents held only in lossy form (fp8/int8) count as available and are leased (flagged ``lossy``).
    accept_lossy: bool = False
    # Who reads (issue 12): "exact" (every head, every token: vLLM, SGLang) or "head_aware" (global
    # heads in full, each local window group only where its tokens overlap the group's sink or its
    # window before ``position``; ``kvd.core.extents.needed``). A head-aware reader names the head map
    # it attends under (``head_map``: its attention tag), which must be the registered model's.
    reader: Literal["exact", "head_aware"] = "exact"
    head_map: AttentionStr | None = None

    @model_validator(mode="after")
    def _names_its_map(self) -> _Read:
        if self.reader == "head_aware" and (self.head_map is None or self.head_map == EXACT):
            raise ValueError("a head_aware reader names its head map: head_map = its attention tag "
                             "(kvd.core.keys.attention_tag), not 'exact'")
        if self.reader == "exact" and self.head_map is not None:
            raise ValueError("head_map is for head_aware readers; an exact reader reads every head")
        return self


class LookupRequest(_Read):
    # Prefix entries: token ids (the daemon chunks and hashes them) or the client's own prefix hashes.
    token_ids: list[int] | None = None
    prefix_hashes: list[Hash] | None = None
    # Chunk entries (content hashes) to look up, any order, with their lengths (optional; hit-rate denominator).
    chunk_hashes: list[Hash] | None = None
    chunk_num_tokens: list[Annotated[int, Field(ge=0, le=1 << 20)]] | None = None
    prefetch: bool = True  # start moving entries found only on slower tiers into the arena
    # The most prefix tokens the reader can use (e.g. all but the last prompt token): hit-rate metrics
    # count at most this many; a head-aware reader's prefix hits stop there too.
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_POSITION)

    @model_validator(mode="after")
    def _lengths(self) -> LookupRequest:
        if self.chunk_num_tokens is not None and len(self.chunk_num_tokens) != len(self.chunk_hashes or []):
            raise ValueError("chunk_num_tokens must give one length per chunk hash")
        return self


class EntryStatus(_Model):
    index: int  # position of the hash in the request's list
    hash: str
    tier: TierName  # the slowest tier a load of it reads from
    classes: list[str]  # head classes available losslessly (all of them: complete)
    complete: bool
    num_tokens: int


class LookupResponse(_Model):
    """Found entries only: a miss costs nothing to encode, so a 128-chunk lookup stays small."""

    chunk_tokens: int
    # Leading prefix chunks stored *completely* (every head class): what an exact engine can load.
    num_prefix_hits: int
    prefix: list[EntryStatus]  # found prefix entries, in request order
    chunks: list[EntryStatus]  # found chunk entries, in request order


class LeaseRequest(_Read):
    hashes: list[Hash]
    # Only these head classes are needed (e.g. a reader that recomputes global heads): extent class
    # names, or a kind ("local" names every local window group).
    classes: list[str] | None = None
    # How long to wait for entries being prefetched from slower tiers; None: the daemon's default.
    wait_s: float | None = Field(default=None, ge=0, le=600)
    # head_aware: its next query position (loading N prefix tokens: N); None: every token of the classes.
    position: int | None = Field(default=None, ge=0, le=MAX_POSITION)
    gpu: bool = False  # the reader maps the daemon's GPU pool: extents may be served from there

    @model_validator(mode="after")
    def _position_is_head_aware(self) -> LeaseRequest:
        if self.position is not None and self.reader == "exact":
            raise ValueError("position is for head_aware readers; an exact reader reads every token")
        return self


class LeasedEntry(_Model):
    hash: str
    status: Literal["ok", "missing", "timeout", "corrupt"]
    num_tokens: int = 0  # tokens its extents hold (an alias key may name fewer: a reader uses the leading)
    start_token: int = 0  # first token in its sequence: which local groups a head-aware reader gets
    extents: list[ExtentInfo] = Field(default_factory=list)


class LeaseResponse(_Model):
    lease_id: str | None
    expires_in_s: float
    arena_id: str
    entries: list[LeasedEntry]
    gpu_pool: GpuPoolInfo | None = None  # the pool the "gpu" extents lie in


class ReleaseRequest(_Model):
    lease_id: str
    transfer_s: float = Field(default=0.0, ge=0, le=3600)


class RenewRequest(_Model):  # keep a live lease or reservation (by its id) for another TTL: a long step
    hold_id: str


class EntriesRequest(_Model):
    """Delete / pin / unpin: entries by hash within a namespace (and model, if given)."""

    namespace: NamespaceStr = "default"
    fingerprint: str | None = None
    hashes: list[Hash]


class CountResponse(_Model):
    count: int


class EntryInfo(_Model):
    hash: str
    namespace: str
    fingerprint: str
    kind: EntryKind
    num_tokens: int
    tiers: list[str]
    nbytes: int  # KV bytes it keeps (uncompressed; extents let go in capacity mode not counted)
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
    namespace: NamespaceStr | None = None
    fingerprint: str | None = None
    # in the tier's eviction-policy order until at least this many bytes are freed (None: all that match)
    max_bytes: int | None = Field(default=None, ge=0, le=1 << 62)
    dry_run: bool = False  # answer what would be evicted; change nothing


class EvictResponse(_Model):
    count: int  # entries evicted from the tier (or that would be, with dry_run)
    nbytes: int  # bytes freed in the tier
    dry_run: bool
    hashes: list[str]  # the first 1,000 of them, in eviction order


class FlushRequest(_Model):
    namespace: NamespaceStr | None = None
    fingerprint: str | None = None
    hashes: list[Hash] | None = None  # only these entries (with namespace and fingerprint); None: all matching

    @model_validator(mode="after")
    def _hashes_need_a_key(self) -> FlushRequest:
        if self.hashes is not None and (self.namespace is None or self.fingerprint is None):
            raise ValueError("flush by hashes needs namespace and fingerprint")
        return self


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
