"""kvd under transformers (Llama-family models): ``attach(model, ...)`` returns a ``KvdCache`` for
``generate``; ``detach(model)`` undoes it (docs/transformers.md)."""

from kvd.connectors.hf.cache import KvdCache, attach, detach

__all__ = ["KvdCache", "attach", "detach"]
