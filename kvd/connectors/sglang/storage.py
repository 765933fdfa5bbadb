"""``KvdHiCacheStorage``: kvd as SGLang's HiCache L3 storage backend (``HiCacheStorage``). A facade only.

Use it with (docs/sglang.md)::

    --enable-hierarchical-cache --hicache-mem-layout page_head --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvd", "module_path": "kvd.connectors.sglang",
        "class_name": "KvdHiCacheStorage", "interface_v1": 1, "socket": "/run/kvd/kvd.sock", "namespace": "prod"}'

SGLang's backend factory builds it as ``cls(storage_config, kwargs)`` (no host pool yet); its HiCache
controller then calls ``register_mem_pool_host(pool)`` (``HostPages`` checks the layout there; the
model's fingerprint is derived and the daemon session opened) and, from its prefetch, I/O and backup
threads, the page operations below. Every hook delegates to ``PageIO`` (``io``): one lookup, lease or
reservation per batch through ``kvd.client.transfer``, pages copied straight between the pool and the
arena. Lifecycle: built → pool registered → calls → ``close()`` on detach. Before registration, and
while the daemon is unreachable, every lookup and load is a miss and every store a failure; nothing
raises into SGLang except ``ConfigError`` at registration for set-ups kvd cannot serve correctly.

| SGLang calls                        | when                                  | here                          |
| ----------------------------------- | ------------------------------------- | ----------------------------- |
| ``batch_exists(keys, extra_info)``  | hit query, ≤ 128 pages a batch        | ``PageIO.exists``             |
| ``batch_get_v1(keys, host_indices)``| load, with ``"interface_v1": 1``      | ``PageIO.load`` into the pool |
| ``batch_set_v1(keys, host_indices)``| backup, with ``"interface_v1": 1``    | ``PageIO.store`` from the pool|
| ``batch_get`` / ``batch_set``       | the same without ``interface_v1``     | flat pages in the pool's order|
| ``get`` / ``set`` / ``exists``      | one page (``exists`` by the default ``batch_exists``) | the same, one key |
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolName,
)

from kvd.connectors.sglang.io import PageIO
from kvd.connectors.sglang.pages import HostPages
from kvd.connectors.sglang.settings import (
    BackendSettings,
    describe,
    load_head_map,
    model_spec_from_sglang,
    open_session,
)
from kvd.core.errors import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_SGLANG = ("0.5.23",)  # the storage API and host layouts this module was written and tested against


def _server_args() -> Any:
    """SGLang's server arguments in this process (what it changes of the model on load goes into the
    fingerprint: ``settings._load_changes``); None, with a warning, where this SGLang does not say."""
    try:
        from sglang.srt.runtime_context import get_server_args

        return get_server_args()
    except Exception as e:  # noqa: BLE001 - another SGLang version, or no context published
        logger.warning("kvd: SGLang's server arguments are not readable here (%s); --quantization, "
                       "--json-model-override-args and --quantization-param-path are not in the fingerprint: "
                       "set \"model_id\" to tell such servers apart", e)
        return None


class KvdHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        self.storage_config = storage_config
        self.settings = BackendSettings.parse(storage_config.extra_config)
        self.pages: HostPages | None = None
        self.io: PageIO | None = None

    # ---- registration ------------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        pages = HostPages(mem_pool_host)
        args = _server_args()
        spec = model_spec_from_sglang(self.storage_config, pages, self.settings, server_args=args)
        session = open_session(self.settings, spec,
                               load_head_map(self.settings, spec, self.storage_config, pages, server_args=args))
        if self.io is not None:
            self.io.close()
        self.pages = pages
        self.io = PageIO(session, page_size=pages.page_size, load_wait_s=self.settings.load_wait_s,
                         verify=self.settings.verify_checksums,
                         log_transfers=bool(self.storage_config.enable_storage_metrics))
        session.require_compatible()
        logger.info("kvd HiCache backend ready: %s", describe(spec, pages))

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        """SGLang names each host pool here (hybrid controllers). A side pool (SWA, Mamba, indexer,
        draft sidecars) is served only through ``batch_*_v2``, which kvd does not implement: refused."""
        if host_pool_name != PoolName.KV:
            raise ConfigError(f"SGLang host pool {str(host_pool_name)!r} ({type(host_pool).__name__}) is not supported "
                              "by kvd: it stores the KV pool only, and models with side pools (SWA, Mamba, indexer, "
                              "draft sidecars) need SGLang's batch_*_v2 storage API (remove the kvd backend)")
        super().register_mem_host_pool_v2(host_pool, host_pool_name)

    def _page_views(self, keys: list[str], host_indices: torch.Tensor) -> list[torch.Tensor] | None:
        assert self.pages is not None, "pages are set with the I/O at registration"
        try:
            return [self.pages.kv(s) for s in self.pages.page_starts(host_indices, len(keys))]
        except ValueError as e:  # SGLang's input, checked: refuse the batch, never write elsewhere
            logger.warning("kvd: %s; batch of %d pages refused", e, len(keys))
            return None

    @staticmethod
    def _first_page(extra_info: HiCacheStorageExtraInfo | None) -> int | None:
        """Position of the batch's first page, known when SGLang passes prefix keys."""
        keys = getattr(extra_info, "prefix_keys", None)
        return None if keys is None else len(keys)

    # ---- v1: zero copy through host indices -----------------------------------------------------------

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        return 0 if self.io is None else self.io.exists(keys)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        views = None if self.io is None else self._page_views(keys, host_indices)
        return [False] * len(keys) if views is None else self.io.load(keys, views)

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        views = None if self.io is None else self._page_views(keys, host_indices)
        if views is None:
            return [False] * len(keys)
        return self.io.store(keys, views, first_page=self._first_page(extra_info))

    # ---- legacy: flat pages in the pool's own order ----------------------------------------------------

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
                  ) -> list[torch.Tensor | None]:
        if self.io is None or target_locations is None or len(target_locations) != len(keys):
            return [None] * len(keys)
        try:
            views = [self.pages.flat_kv(t) for t in target_locations]
        except ValueError as e:
            logger.warning("kvd: %s; batch of %d pages refused", e, len(keys))
            return [None] * len(keys)
        ok = self.io.load(keys, views)
        return [t if hit else None for t, hit in zip(target_locations, ok)]

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        if self.io is None or values is None or len(values) != len(keys):
            return False
        try:
            views = [self.pages.flat_kv(v.contiguous()) for v in values]
        except ValueError as e:
            logger.warning("kvd: %s; batch of %d pages refused", e, len(keys))
            return False
        return all(self.io.store(keys, views))

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return value is not None and self.batch_set([key], [value])

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # ---- housekeeping ----------------------------------------------------------------------------------

    def get_stats(self):
        """SGLang's ``StorageMetrics`` (pages and GB/s per prefetch and backup call) since the last call,
        when ``--enable-storage-metrics`` is on; kvd's own counters are in ``counters``."""
        if self.io is None or not self.storage_config.enable_storage_metrics:
            return None
        from sglang.srt.observability.metrics_collector import StorageMetrics

        log = self.io.log.take()
        return StorageMetrics(prefetch_pgs=log.prefetch_pgs, backup_pgs=log.backup_pgs,
                              prefetch_bandwidth=log.prefetch_bandwidth, backup_bandwidth=log.backup_bandwidth)

    @property
    def counters(self) -> dict[str, float]:
        return {} if self.io is None else dict(self.io.counters)

    def clear(self) -> None:
        """SGLang's "clear the storage": not done for a shared cache; other engines' KV stays (kvctl evict)."""
        logger.info("kvd: SGLang asked to clear L3 storage; kvd is shared, use `kvctl evict` to drop entries")

    def close(self) -> None:
        if self.io is not None:
            self.io.close()
            self.io = None
