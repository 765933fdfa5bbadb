"""The store's tiers, built from the settings: the host arena(s), the SSD tier, the remote cluster.

Order is the pipeline's: host (one arena, or one per tenant: ``kvd.daemon.tenants``) → ssd (if
``ssd.enabled``) → remote (if ``remote.enabled``). Before the arenas are made, arenas and sockets that
daemons killed with -9 left behind are removed (``kvd.tiers.arena.remove_stale``). A remote cluster
that cannot be reached at start stops the daemon when ``remote.required``; otherwise the daemon starts
without it and ``join_remote_later`` adds it when it answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from kvd.core.config import Settings
from kvd.core.errors import ConfigError, TierUnavailable
from kvd.daemon.tenants import Tenants
from kvd.tiers.arena import remove_stale
from kvd.tiers.base import Tier
from kvd.tiers.host import HostTier
from kvd.tiers.remote import RemoteTier, connect
from kvd.tiers.ssd import SsdTier

logger = logging.getLogger("kvd")

REMOTE_RETRY_S = 30


async def build_tiers(settings: Settings, tenants: Tenants, io: ThreadPoolExecutor, tiers: list[Tier]) -> Tier | None:
    """Append the tiers to ``tiers`` (so the caller can close what was built if a later one fails);
    returns the remote tier, or None when it is not there (disabled, or unreachable and not required)."""
    arena = settings.arena_path()
    remove_stale(arena.parent, f"kvd-{os.getuid()}-*.arena")
    host = HostTier(arena, int(settings.host.capacity_bytes), int(settings.host.slot_bytes),
                    file_mode=int(settings.daemon.socket_mode, 8),
                    partitions=tenants.arenas(arena, int(settings.host.capacity_bytes)),
                    partition_of=tenants.partition_of, socket_path=str(settings.socket_path()))
    tiers.append(host)
    for p, a in host.arenas.items():
        logger.info("host arena %s%s: %d MiB in %d slots of %d KiB", a.path, f" (tenant {p})" if p else "",
                    a.capacity_bytes >> 20, a.num_slots, a.slot_bytes >> 10)
    if settings.ssd.enabled:
        tiers.append(await asyncio.get_running_loop().run_in_executor(
            io, lambda: SsdTier(settings.ssd_path(), settings.ssd)))
    remote = await remote_tier(settings, io) if settings.remote.enabled else None
    if remote is not None:
        tiers.append(remote)
    return remote


async def remote_tier(settings: Settings, io: ThreadPoolExecutor) -> RemoteTier | None:
    """The remote tier, or None when the cluster is unreachable and not required (logged)."""
    try:
        client = await asyncio.get_running_loop().run_in_executor(io, connect, settings.remote)
    except TierUnavailable as e:
        if settings.remote.required:
            raise ConfigError(f"{e} (remote.required = true)") from None
        logger.warning("%s; serving without the remote tier, retrying every %d s", e, REMOTE_RETRY_S)
        return None
    logger.info("remote tier: Redis cluster at %s", ", ".join(settings.remote.startup_nodes))
    return RemoteTier(client, settings.remote)


async def join_remote_later(settings: Settings, io: ThreadPoolExecutor, store) -> None:
    while True:
        await asyncio.sleep(REMOTE_RETRY_S)
        try:
            remote = await remote_tier(settings, io)
        except ConfigError as e:  # the cluster answered but refused us: say so, keep trying
            logger.error("%s", e)
            continue
        if remote is not None:
            store.add_tier(remote)
            return
