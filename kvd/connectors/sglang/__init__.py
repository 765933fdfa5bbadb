"""kvd as an SGLang HiCache L3 storage backend (SGLang 0.5.23): ``--hicache-storage-backend dynamic``
with ``"module_path": "kvd.connectors.sglang", "class_name": "KvdHiCacheStorage"`` in
``--hicache-storage-backend-extra-config`` (docs/sglang.md).

``KvdHiCacheStorage`` is imported lazily: the logic (``settings``, ``keys``, ``pages``, ``io``) is
importable and testable without importing SGLang itself.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "KvdHiCacheStorage":
        from kvd.connectors.sglang import storage

        return storage.KvdHiCacheStorage
    raise AttributeError(f"module 'kvd.connectors.sglang' has no attribute {name!r}")
