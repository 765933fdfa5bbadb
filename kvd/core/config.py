"""Settings: one pydantic model, loaded once from TOML plus ``KVD_<SECTION>__<KEY>`` overrides.

Every default lives in the models below and is documented, key by key, in ``kvd/defaults.toml``
(shipped as ``config/kvd.toml``); a test keeps the two equal. kvd runs with no file at all. Unknown
keys and bad values stop startup with a ``ConfigError`` that names the key, the value seen, what is
allowed and where the value came from (file or environment variable).

Modules receive the section they need; none reads the environment itself. Paths left empty are
resolved here, once, from systemd's directories or the XDG ones (see ``default_socket_path``).
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kvd.core.config_env import env_overrides
from kvd.core.errors import ConfigError
from kvd.core.units import check_listen_addr, parse_mode, parse_size

# Sizes: bytes, "16G"/"16GiB" (x1024), "16GB" (x1000); kvd.core.units has the table.
Size = Annotated[ByteSize, BeforeValidator(parse_size)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DaemonSettings(_Section):
    socket: str = ""  # empty: $RUNTIME_DIRECTORY/kvd.sock, $XDG_RUNTIME_DIR/kvd/kvd.sock, /run/kvd or /tmp
    socket_mode: str = "0660"
    metrics_addr: str = "127.0.0.1:9464"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_timeout_s: float = Field(default=10.0, ge=0, le=600)
    watchdog: bool = True
    max_request_bytes: Size = ByteSize(16 << 20)
    max_entries_per_request: int = Field(default=4096, gt=0, le=1 << 20)
    max_tokens_per_request: int = Field(default=1 << 21, gt=0)
    # A connection must complete each request's headers within idle_timeout_s of opening or of its
    # last answer (idle keep-alive connections close then too), and its body within body_timeout_s.
    idle_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    body_timeout_s: float = Field(default=10.0, gt=0, le=600)
    listen_backlog: int = Field(default=4096, gt=0, le=65535)
    # Models larger than this are refused at registration (their plans would hold the loop): layers ×
    # KV heads, and KV bytes per token (2 × layers × KV heads × head_dim × dtype bytes).
    max_model_heads: int = Field(default=16384, gt=0)
    max_model_kv_bytes_per_token: Size = ByteSize(8 << 20)
    # A model with no entries left and no registration or request for this long is forgotten (0: never).
    model_idle_s: float = Field(default=86400.0, ge=0)
    # The full pass of Python's garbage collector over everything, frozen objects included, every this
    # many seconds (0: never); between passes full collections scan only new objects (kvd.daemon.collector).
    gc_full_interval_s: float = Field(default=3600.0, ge=0, le=86400)

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _mode(cls, v: object) -> str:
        return parse_mode(v)

    @field_validator("metrics_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        return check_listen_addr(v)


class KeySettings(_Section):
    chunk_tokens: int = Field(default=256, gt=0, le=1 << 16)


class HostSettings(_Section):
    path: str = ""  # empty: /dev/shm/kvd-<uid>-<socket hash>.arena
    capacity_bytes: Size = ByteSize(1 << 30)
    slot_bytes: Size = ByteSize(256 << 10)
    high_watermark: float = Field(default=0.90, gt=0, le=1)
    low_watermark: float = Field(default=0.75, gt=0, le=1)
    lease_ttl_s: float = Field(default=30.0, gt=0, le=3600)
    reservation_ttl_s: float = Field(default=30.0, gt=0, le=3600)
    verify_on_commit: bool = True
    lookup_index: bool = True  # publish <arena>.index for lookups without a round trip (kvd.core.index_file)

    @model_validator(mode="after")
    def _sizes(self) -> HostSettings:
        if self.slot_bytes < 4096 or self.slot_bytes % 4096:
            raise ValueError(f"slot_bytes={int(self.slot_bytes)} must be a positive multiple of 4096")
        if self.capacity_bytes < self.slot_bytes:
            raise ValueError(f"capacity_bytes={int(self.capacity_bytes)} is smaller than one slot")
        if self.low_watermark > self.high_watermark:
            raise ValueError(
                f"low_watermark={self.low_watermark} is above high_watermark={self.high_watermark}"
            )
        return self


class GpuSettings(_Section):
    # The GPU tier (kvd.tiers.gpu, docs/gpu.md): built only if enabled AND a GPU is present, else absent.
    enabled: bool = False
    device: int = Field(default=0, ge=0, le=255)  # CUDA device index, in the daemon's numbering
    capacity_bytes: Size = Field(default=ByteSize(4 << 30), ge=4096)  # default partition's pool (tenants: gpu_bytes)
    slot_bytes: Size = Field(default=ByteSize(2 << 20), ge=4096, multiple_of=4096)


MIN_SSD_BYTES = 64 << 10


class SsdSettings(_Section):
    enabled: bool = True
    path: str = ""  # empty: $STATE_DIRECTORY, $XDG_DATA_HOME/kvd or ~/.local/share/kvd, then /ssd
    capacity_bytes: Size = ByteSize(64 << 30)
    map_size_bytes: Size = ByteSize(0)  # 0: capacity_bytes × 1.25 (LMDB needs headroom)
    admit_after: int = Field(default=2, ge=0, le=1000)
    write_batch: int = Field(default=64, gt=0, le=100000)
    io_threads: int = Field(default=2, gt=0, le=64)
    prefetch_deadline_s: float = Field(default=5.0, gt=0, le=600)
    # Longest a write-back / write-through batch waits while engines load (kvd.store.background).
    yield_to_loads_s: float = Field(default=1.0, ge=0, le=60)

    @model_validator(mode="after")
    def _sizes(self) -> SsdSettings:
        # LMDB cannot open a map under ~32 KiB (it failed as "not a kvd SSD store"), and a capacity of
        # 0 stored nothing while every write-down failed.
        if self.enabled and self.capacity_bytes < MIN_SSD_BYTES:
            raise ValueError(f"capacity_bytes={int(self.capacity_bytes)} is below 64 KiB; to run without the SSD "
                             "tier, set enabled = false")
        if 0 < self.map_size_bytes < MIN_SSD_BYTES:
            raise ValueError(f"map_size_bytes={int(self.map_size_bytes)} is below LMDB's smallest usable map "
                             "(64 KiB); 0 means capacity_bytes x 1.25")
        return self


class CodecSettings(_Section):
    hot_codec: Literal["raw", "lossless"] = "lossless"
    local_cold_codec: Literal["lossless", "fp8", "int8", "drop"] = "lossless"
    global_cold_codec: Literal["lossless", "fp8", "int8"] = "lossless"
    zstd_level: int = Field(default=1, ge=-7, le=22)
    threads: int = Field(default=0, ge=0, le=64)  # 0: one per core for extents ≥ 4 MiB


WritePolicy = Literal["write_through", "write_back", "off"]


class RemoteWritePolicy(_Section):
    """When each head class's extents go to the remote tier: ``write_through`` (at commit, so other
    hosts find them at once), ``write_back`` (when they leave this host's lower tiers), ``off``.
    Local-head extents placement keeps hot (the entry's tokens hold the local heads' sink or last
    window: what a head-aware reader at the sequence's end reads) follow ``local_hot``; the other
    (cold) local extents follow ``local``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              serialize_by_alias=True)

    global_: WritePolicy = Field(default="write_through", alias="global")
    local_hot: WritePolicy = "write_through"
    local: WritePolicy = "write_back"

    def for_class(self, head_class: str, hot: bool = False) -> str:
        if head_class == "global":
            return self.global_
        return self.local_hot if hot else self.local


class RemoteSettings(_Section):
    enabled: bool = False
    # true: the daemon does not start when the cluster cannot be reached or refuses the credentials;
    # false: it starts without the remote tier (logged) and tries again later.
    required: bool = False
    startup_nodes: list[str] = Field(default_factory=lambda: ["127.0.0.1:7000"], min_length=1)
    username: str = ""
    password: str = ""
    password_file: str = ""  # read at start; wins over password
    tls: bool = False
    tls_ca_file: str = ""
    timeout_s: float = Field(default=0.5, gt=0, le=60)  # one Redis command
    lookup_deadline_s: float = Field(default=0.05, gt=0, le=10)  # a lookup waits this long for the cluster
    max_connections: int = Field(default=64, gt=0, le=4096)
    ttl_s: float = Field(default=0.0, ge=0)  # 0: no TTL (the cluster's maxmemory-policy evicts)
    capacity_bytes: Size = ByteSize(1 << 40)  # for kvctl stats only: the cluster's maxmemory rules
    key_prefix: str = Field(default="kvd", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    replicate_global: bool = True  # global-head extents stored twice, on two slots (two masters)
    write_policy: RemoteWritePolicy = Field(default_factory=RemoteWritePolicy)
    scan_limit: int = Field(default=100_000, ge=0)  # entries of the cluster indexed at start
    exact_codec: Literal["lossless", "raw"] = "lossless"  # exact extents written from memory (defaults.toml)

    @field_validator("startup_nodes")
    @classmethod
    def _nodes(cls, v: list[str]) -> list[str]:
        for node in v:
            host, sep, port = node.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise ValueError(f"{node!r} is not HOST:PORT")
        return v


class TenantSettings(_Section):
    """One tenant: who it is (peer uid/gid on the Unix socket), what it may name, what it may hold."""

    uids: list[int] = Field(default_factory=list)
    gids: list[int] = Field(default_factory=list)
    # Namespaces the tenant may use: exact names, or prefixes ending in "*" ("team-a:*").
    namespaces: list[str] = Field(min_length=1)
    arena_bytes: Size = ByteSize(1 << 30)  # its own arena file: its share of the host tier
    ssd_bytes: Size = ByteSize(16 << 30)  # its quota of the SSD tier (encoded bytes)
    gpu_bytes: Size = ByteSize(0)  # its own GPU pool, with [gpu] enabled (0: its entries skip the GPU tier)
    group: int | None = None  # gid owning its arena file (mode 0660); default: its first gid

    @model_validator(mode="after")
    def _someone(self) -> TenantSettings:
        if not self.uids and not self.gids:
            raise ValueError("a tenant needs uids or gids: the peer credentials that identify it")
        for ns in self.namespaces:
            if not ns or "*" in ns[:-1]:
                raise ValueError(f"namespace pattern {ns!r}: an exact name, or a prefix ending in '*'")
        return self


class AdminSettings(_Section):
    """Who may run admin actions (flush, evict, compact, stats of every tenant) when tenants are set."""

    uids: list[int] = Field(default_factory=lambda: [0])
    gids: list[int] = Field(default_factory=list)


class PolicySettings(_Section):
    eviction: Literal["lru", "arc", "cost_aware"] = "cost_aware"
    recency_half_life_s: float = Field(default=300.0, gt=0)


class Settings(_Section):
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    keys: KeySettings = Field(default_factory=KeySettings)
    host: HostSettings = Field(default_factory=HostSettings)
    gpu: GpuSettings = Field(default_factory=GpuSettings)
    ssd: SsdSettings = Field(default_factory=SsdSettings)
    codec: CodecSettings = Field(default_factory=CodecSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    # Without tenants, every client of the socket is one trust domain (docs/security.md).
    tenants: dict[str, TenantSettings] = Field(default_factory=dict)
    admin: AdminSettings = Field(default_factory=AdminSettings)

    # ---- resolved paths (computed once, here, so modules never read the environment) ----------

    def socket_path(self) -> Path:
        return Path(self.daemon.socket) if self.daemon.socket else default_socket_path()

    def instance_tag(self) -> str:
        """8 hex chars naming this daemon instance by its socket: per-instance default paths."""
        return hashlib.blake2b(str(self.socket_path()).encode(), digest_size=4).hexdigest()

    def arena_path(self) -> Path:
        if self.host.path:
            return Path(self.host.path)
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
        return base / f"kvd-{os.getuid()}-{self.instance_tag()}.arena"

    def ssd_path(self) -> Path:
        """``ssd.path``, else a per-instance directory: ``ssd`` for the default socket (where earlier
        versions kept it), ``ssd-<instance tag>`` for any other, so two daemons with different sockets
        never share one SSD directory (the tier also locks it)."""
        if self.ssd.path:
            return Path(self.ssd.path)
        if self.socket_path() == default_socket_path():
            return default_data_dir() / "ssd"
        return default_data_dir() / f"ssd-{self.instance_tag()}"


def default_socket_path() -> Path:
    """systemd's RuntimeDirectory, then $XDG_RUNTIME_DIR/kvd, then /run/kvd (root) or /tmp/kvd-<uid>."""
    if d := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(d.split(":")[0]) / "kvd.sock"
    if d := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(d) / "kvd" / "kvd.sock"
    if os.getuid() == 0:
        return Path("/run/kvd/kvd.sock")
    return Path(f"/tmp/kvd-{os.getuid()}/kvd.sock")


def default_data_dir() -> Path:
    if d := os.environ.get("STATE_DIRECTORY"):
        return Path(d.split(":")[0])
    if d := os.environ.get("XDG_DATA_HOME"):
        return Path(d) / "kvd"
    return Path.home() / ".local" / "share" / "kvd"


def default_config_text() -> str:
    """The commented default configuration (``kvd --print-default-config``)."""
    return resources.files("kvd").joinpath("defaults.toml").read_text()


# ---- loading ------------------------------------------------------------------------------------


def _source(loc: tuple[str, ...], sources: dict[tuple[str, ...], str], default_source: str) -> str:
    """Where the value at ``loc`` came from; for a section-wide error (``loc`` a section), every
    environment variable or flag that set something in it, and the file."""
    for i in range(len(loc), 0, -1):  # the value itself, or the list or table it is an item of
        if loc[:i] in sources:
            return sources[loc[:i]]
    inside = sorted({src for path, src in sources.items() if path[: len(loc)] == loc})
    return ", ".join(inside + [default_source]) if inside else default_source


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _describe(e: ValidationError, sources: dict[tuple[str, ...], str], default_source: str) -> str:
    lines = []
    for err in e.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        source = _source(loc, sources, default_source)
        if err["type"] == "extra_forbidden":
            section = loc[:-1]
            allowed = _allowed_keys(section)
            lines.append(f"{key}: unknown setting (from {source}); allowed here: {', '.join(allowed)}")
        else:
            value = err.get("input")
            shown = value if not isinstance(value, dict) else "{…}"
            lines.append(f"{key} = {shown!r} (from {source}): {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _allowed_keys(section: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] = Settings
    for part in section:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return sorted(Settings.model_fields)
        model = field.annotation
    return sorted(model.model_fields)


def load_settings(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Defaults ← TOML file (if given) ← ``KVD_*`` environment ← explicit ``overrides`` (CLI flags)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist; pass an existing file or none") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}: {e.reason}); TOML files are "
                              "UTF-8") from None
    env_tree, sources = env_overrides(os.environ if environ is None else environ, Settings)
    data = _merge(data, env_tree)
    if overrides:
        data = _merge(data, overrides)
        for section, kv in overrides.items():
            for k in kv:
                sources[(section, k)] = "command line"
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, sources, source)) from None
