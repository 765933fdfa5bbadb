"""Tenants: who is calling (the Unix socket's peer credentials), what it may name, where its bytes live.

Without ``[tenants]`` in the settings every client of the socket is one trust domain, as before: any
namespace, one arena, no quotas, every admin action. With tenants:

- a caller is identified by ``SO_PEERCRED`` (pid, uid, gid): the first tenant listing its uid, or
  else its gid, is its tenant; callers matching ``[admin]`` (root by default) are admins;
- a request naming a namespace the caller's tenant does not list is refused (``Forbidden``, 403,
  naming the namespace and the tenant); admins may name any namespace;
- each tenant is a *partition* of the host tier: its own arena file, owned by its group and mode 0660,
  so a client can map only its own tenant's memory (another tenant's open fails with EACCES), sized
  by its ``arena_bytes``; likewise of the GPU tier (its own allocation of ``gpu_bytes``, whose IPC
  handle only its own leases and reservations carry); its SSD quota is ``ssd_bytes``;
- admin actions (flush, evict, compact, listing every namespace) need an admin.

Namespace patterns: an exact name, or a prefix ending in ``*`` (``team-a:*`` covers vLLM's salted
namespaces ``team-a:salt-…``). Patterns of two tenants may not overlap (checked at start).
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from kvd.core.config import Settings
from kvd.core.errors import ConfigError, Forbidden
from kvd.tiers.host import ArenaSpec


@dataclass(slots=True, frozen=True)
class Caller:
    """The process on the other end of a request (None fields: not a Unix-socket peer, e.g. a test over TCP)."""

    pid: int | None
    uid: int | None
    gid: int | None
    tenant: str | None  # None: no tenant (single trust domain, or an admin with no tenant)
    is_admin: bool


def peer_credentials(sock: socket.socket | None) -> tuple[int | None, int | None, int | None]:
    """``(pid, uid, gid)`` of a Unix-socket peer (``SO_PEERCRED``); Nones for anything else.
    ``Forbidden`` for a Unix socket whose peer cannot be read (closed): never a caller without credentials,
    which ``Tenants.caller`` trusts as an admin."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None, None, None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError as e:
        raise Forbidden(f"the peer's credentials cannot be read ({e.strerror}); nothing was done") from None
    return struct.unpack("3i", raw)


def _matches(pattern: str, namespace: str) -> bool:
    return namespace.startswith(pattern[:-1]) if pattern.endswith("*") else namespace == pattern


class Tenants:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tenants = settings.tenants
        self._check_overlaps()
        self._check_groups()

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    def _check_overlaps(self) -> None:
        seen: list[tuple[str, str]] = []
        for name, t in self.tenants.items():
            for pat in t.namespaces:
                for other, opat in seen:
                    probe = [pat[:-1] if pat.endswith("*") else pat, opat[:-1] if opat.endswith("*") else opat]
                    if other != name and (_matches(pat, probe[1]) or _matches(opat, probe[0])):
                        raise ConfigError(f"tenants.{name}.namespaces {pat!r} overlaps tenants.{other}'s {opat!r}: "
                                          "a namespace belongs to one tenant")
                seen.append((name, pat))

    def _check_groups(self) -> None:
        """A tenant's arena and lookup index are readable by their group (mode 0660): a group of the
        tenant's own, never another tenant's nor the daemon's (every client that reaches the socket is
        in that one), or a tenant would map another's KV."""
        seen: dict[int, str] = {}
        for name, t in self.tenants.items():
            gid = _arena_group(t)
            if gid is None or gid == os.getegid():
                what = "none" if gid is None else f"the daemon's group {gid}"
                raise ConfigError(f"tenants.{name}: its arena needs a group of its own (group = GID, or gids), not "
                                  f"{what}: the arena would be readable by every client of the daemon's socket")
            if gid in seen:
                raise ConfigError(f"tenants.{name} and tenants.{seen[gid]} both give their arena group {gid}: "
                                  "each could map the other's; give each tenant a group of its own")
            seen[gid] = name

    # ---- who ------------------------------------------------------------------------------------

    def caller(self, pid: int | None, uid: int | None, gid: int | None) -> Caller:
        if not self.enabled:
            return Caller(pid, uid, gid, None, True)
        adm = self.settings.admin
        is_admin = uid is None or uid in adm.uids or gid in adm.gids  # None: not over the socket (tests, TCP)
        tenant = next((n for n, t in self.tenants.items() if uid is not None and uid in t.uids), None)
        if tenant is None:
            tenant = next((n for n, t in self.tenants.items() if gid is not None and gid in t.gids), None)
        return Caller(pid, uid, gid, tenant, is_admin)

    # ---- what -----------------------------------------------------------------------------------

    def partition_of(self, namespace: str) -> str:
        """The tenant a namespace belongs to ("" for none: the single trust domain, or unlisted)."""
        for name, t in self.tenants.items():
            if any(_matches(p, namespace) for p in t.namespaces):
                return name
        return ""

    def check_namespace(self, caller: Caller, namespace: str | None) -> None:
        """``Forbidden`` unless ``caller`` may use ``namespace`` (None: a request across namespaces)."""
        if not self.enabled or caller.is_admin:
            return
        if namespace is None:
            raise Forbidden("a request across every namespace needs an admin ([admin] uids/gids)")
        if caller.tenant is None:
            raise Forbidden(f"uid {caller.uid} / gid {caller.gid} is no tenant of this daemon ([tenants.*] uids/gids); "
                            f"namespace {namespace!r} refused")
        if self.partition_of(namespace) != caller.tenant:
            raise Forbidden(f"namespace {namespace!r} is not one of tenant {caller.tenant!r}'s "
                            f"({', '.join(self.tenants[caller.tenant].namespaces)})")

    def check_admin(self, caller: Caller, what: str) -> None:
        if self.enabled and not caller.is_admin:
            raise Forbidden(f"{what} is an admin action; uid {caller.uid} / gid {caller.gid} is not in [admin]")

    def partition_for(self, caller: Caller) -> str:
        """The arena a caller maps: its tenant's ("" in a single trust domain, or for an admin)."""
        return caller.tenant or ""

    # ---- where ----------------------------------------------------------------------------------

    def arenas(self, base: Path, capacity_bytes: int) -> dict[str, ArenaSpec] | None:
        """One arena per tenant beside ``base`` (``<base stem>-<tenant>.arena``), plus the default one
        for admins and namespaces of no tenant; None without tenants (one arena at ``base``)."""
        if not self.enabled:
            return None
        out = {"": ArenaSpec(base, capacity_bytes)}
        for name, t in self.tenants.items():
            out[name] = ArenaSpec(base.with_name(f"{base.stem}-{name}{base.suffix}"), int(t.arena_bytes),
                                  _arena_group(t))
        return out

    def gpu_pools(self, capacity_bytes: int) -> dict[str, int] | None:
        """Bytes of each partition's GPU pool: the default one ``capacity_bytes``, a tenant its
        ``gpu_bytes`` (0: none); None without tenants (one pool)."""
        if not self.enabled:
            return None
        return {"": capacity_bytes, **{name: int(t.gpu_bytes) for name, t in self.tenants.items()}}

    def ssd_quota(self, partition: str) -> int | None:
        t = self.tenants.get(partition)
        return int(t.ssd_bytes) if t is not None else None


def _arena_group(t) -> int | None:
    """The gid owning a tenant's arena file: its ``group``, else its first gid."""
    return t.group if t.group is not None else (t.gids[0] if t.gids else None)
