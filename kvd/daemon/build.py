"""The store's tiers, built from the settings: the GPU pool(s), the host arena(s), the SSD tier, the remote cluster.

Order is the pipeline's: gpu (if ``gpu.enabled`` and a GPU is present; one pool, or one per tenant
with ``gpu_bytes``) → host (one arena, or one per tenant: ``kvd.daemon.tenants``) → ssd (if
``ssd.enabled``) → remote (if ``remote.enabled``). Without a GPU the GPU tier is absent (logged) and
torch is never imported: the presence of a GPU is asked of NVML first (``kvd.tiers.gpu.gpu_present``). Before the arenas are made, arenas and sockets that
daemons killed with -9 left behind are removed (``kvd.tiers.arena.remove_stale``). A remote cluster
that cannot be reached or refuses the credentials at start stops the daemon when ``remote.required``;
otherwise the daemon starts without it and ``join_remote_later`` adds it when it answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

from kvd.core.config import Settings
from kvd.core.errors import ConfigError, TierUnavailable
from kvd.daemon.tenants import Tenants
from kvd.tiers.arena import remove_stale
from kvd.tiers.base import Tier
from kvd.tiers.gpu import GpuTier, cuda_ipc, gpu_present
from kvd.tiers.host import HostTier
from kvd.tiers.remote import RemoteTier, connect
from kvd.tiers.ssd import SsdTier

logger = logging.getLogger("kvd")

REMOTE_RETRY_S = 30


async def build_tiers(settings: Settings, tenants: Tenants, io: ThreadPoolExecutor, tiers: list[Tier],
                      gpu_ipc=None) -> Tier | None:
    """Append the tiers to ``tiers`` (so the caller can close what was built if a later one fails);
    returns the remote tier, or None when it is not there (disabled, or unreachable and not required).
    ``gpu_ipc``: how the GPU pool is shared; None: CUDA IPC on ``gpu.device`` (tests pass the
    in-process stand-in, ``kvd.core.gpu_ipc.InProcessIpc``)."""
    gpu = gpu_tier(settings, tenants, gpu_ipc)
    if gpu is not None:
        tiers.append(gpu)
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
        ssd = await asyncio.get_running_loop().run_in_executor(io, lambda: SsdTier(settings.ssd_path(), settings.ssd))
        tiers.append(ssd)
        check_disk_room(ssd)
        check_ssd_quotas(settings)
    remote = await remote_tier(settings, io) if settings.remote.enabled else None
    if remote is not None:
        tiers.append(remote)
    return remote


def check_ssd_quotas(settings: Settings) -> bool:
    """Warn when the tenants' SSD quotas add up to more than the SSD tier; True if they fit.

    A quota (``ssd_bytes``) is a cap, not a reservation, and a tenant makes room on SSD by evicting
    only its own entries: with the caps over the tier, one tenant within its cap can fill the shared
    SSD, and another's demotions then find no room, its arena entries dropped unwritten. Overcommit
    may be a choice (bursty tenants), so it is a warning, not an error (audit 40)."""
    quotas = {name: int(t.ssd_bytes) for name, t in settings.tenants.items()}
    total, capacity = sum(quotas.values()), int(settings.ssd.capacity_bytes)
    if not quotas or total <= capacity:
        return True
    logger.warning("the tenants' ssd_bytes add up to %d bytes (%s), more than ssd.capacity_bytes = %d: a tenant "
                   "within its quota can fill the SSD tier, and the others' demotions then fail (their arena "
                   "entries are dropped unwritten); lower the quotas to fit", total,
                   ", ".join(f"{k} {v}" for k, v in sorted(quotas.items())), capacity)
    return False


def check_disk_room(ssd: SsdTier) -> bool:
    """Warn when the disk under ``ssd.path`` cannot hold ``ssd.capacity_bytes``; True if it can.

    Not an error: the daemon serves on (a disk that fills makes LMDB's write fail, the records stay
    unwritten and are counted in ``kvd_tier_write_failures_total``; nothing written is lost), and
    disks are shared, so what is free now says little of later. But a capacity the disk cannot reach
    is a setting to fix, and the log at start is where an operator looks."""
    data = ssd.path / "data.mdb"
    kept = data.stat().st_blocks * 512 if data.exists() else 0  # what LMDB's file already holds on disk
    room = shutil.disk_usage(ssd.path).free + kept
    if room >= ssd.capacity_bytes:
        return True
    logger.warning("ssd.capacity_bytes = %d, but the disk under %s has room for %d bytes (%d free, %d in kvd's "
                   "file): the disk fills first, and then demotions to SSD fail (kvd_tier_write_failures_total); "
                   "lower ssd.capacity_bytes or free the disk", ssd.capacity_bytes, ssd.path, room, room - kept, kept)
    return False


def gpu_tier(settings: Settings, tenants: Tenants, ipc=None) -> GpuTier | None:
    """The GPU tier, or None: disabled, or (with real CUDA IPC) no GPU, torch or device here (logged)."""
    cfg = settings.gpu
    if not cfg.enabled:
        return None
    if cfg.capacity_bytes < cfg.slot_bytes:
        raise ConfigError(f"gpu.capacity_bytes = {int(cfg.capacity_bytes)} is smaller than one slot "
                          f"(gpu.slot_bytes = {int(cfg.slot_bytes)}); raise it or lower the slot size")
    if ipc is None:
        if not gpu_present():
            logger.warning("gpu.enabled = true, but this host has no NVIDIA GPU; serving without the GPU tier")
            return None
        ipc = cuda_ipc(cfg.device)
        if ipc is None:
            return None
    tier = GpuTier(ipc, int(cfg.capacity_bytes), int(cfg.slot_bytes),
                   partitions=tenants.gpu_pools(int(cfg.capacity_bytes)), partition_of=tenants.partition_of)
    for p, pool in tier.pools.items():
        logger.info("gpu pool%s on %s: %d MiB in %d slots of %d KiB, shared by %s",
                    f" (tenant {p})" if p else "", pool.info.device_uuid, pool.capacity_bytes >> 20, pool.num_slots,
                    pool.slot_bytes >> 10, pool.info.transport)
    return tier


async def remote_tier(settings: Settings, io: ThreadPoolExecutor) -> RemoteTier | None:
    """The remote tier, or None when the cluster is unreachable or refuses the credentials and is not
    required (logged)."""
    try:
        client = await asyncio.get_running_loop().run_in_executor(io, connect, settings.remote)
    except TierUnavailable as e:
        if settings.remote.required:
            raise ConfigError(f"{e} (remote.required = true)") from None
        logger.warning("%s; serving without the remote tier, retrying every %d s", e, REMOTE_RETRY_S)
        return None
    except ConfigError as e:  # the cluster answered but refused the credentials (or they cannot be read)
        if settings.remote.required:
            raise
        logger.error("%s; serving without the remote tier, retrying every %d s", e, REMOTE_RETRY_S)
        return None
    logger.info("remote tier: Redis cluster at %s", ", ".join(settings.remote.startup_nodes))
    return RemoteTier(client, settings.remote)


async def join_remote_later(settings: Settings, io: ThreadPoolExecutor, store) -> None:
    while True:
        await asyncio.sleep(REMOTE_RETRY_S)
        remote = await remote_tier(settings, io)  # not required: None (logged) until the cluster takes us
        if remote is not None:
            store.add_tier(remote)
            return
