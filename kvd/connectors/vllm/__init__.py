"""kvd as a vLLM KV connector. ``kv_connector_module_path: "kvd.connectors.vllm"`` with
``kv_connector: "KvdConnector"`` (docs/vllm.md).

``KvdConnector`` is imported lazily: the scheduler and worker logic (``scheduler``, ``worker``,
``copy``, ``layout``, ``settings``) is importable and testable without importing vLLM itself.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("KvdConnector", "KvdConnectorMetadata", "KvdConnectorStats"):
        from kvd.connectors.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module 'kvd.connectors.vllm' has no attribute {name!r}")
