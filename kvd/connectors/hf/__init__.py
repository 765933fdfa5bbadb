"""kvd under transformers (Llama-family models): ``attach(model, ...)`` returns a ``KvdCache`` for
``generate``; ``detach(model)`` undoes it; ``generate(model, ids, cache, ...)`` is ``model.generate``
under the cache's Lil guard, rerun included (docs/transformers.md).

The names are imported lazily: ``kvd.calibrate`` imports ``attention_switch`` from here and must not
pull in the cache (hence the client) with it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GuardConfig", "KvdCache", "attach", "detach", "generate"]


def __getattr__(name: str) -> Any:
    if name == "generate":
        from kvd.connectors.hf.guard import generate

        return generate
    if name in __all__:
        from kvd.connectors.hf import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'kvd.connectors.hf' has no attribute {name!r}")
