"""A model registered with the daemon, as an engine process holds it: what every transaction needs to
key entries (fingerprint, namespace, attention tag) and lay out their extents (spec, head map), and
which reader it is (exact, or head-aware under its head map; ``kvd.store.readers``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvd.core.extents import ExtentPlan, plan_extents
from kvd.core.headmap import HeadMap
from kvd.core.keys import EXACT, ModelSpec, attention_tag, prefix_hashes

if TYPE_CHECKING:
    from kvd.client.client import KvdClient
    from kvd.client.gpu_pool import GpuPools


@dataclass
class ModelHandle:
    """A model registered with the daemon (``kvd.client.prefix.register``): what every transaction
    needs to key entries and lay out their extents. ``computed_under`` is the attention the engine's
    KV is computed under (``kvd.core.keys.attention_tag``; ``exact`` for ordinary engines)."""

    client: KvdClient
    spec: ModelSpec
    head_map: HeadMap
    fingerprint: str
    chunk_tokens: int
    namespace: str = "default"
    computed_under: str = EXACT
    # "exact": every head, every token (engines). "head_aware": the global heads and, of each local
    # window group, only what the head map lets the reader see (``kvd.store.readers``).
    reader: str = "exact"
    # The daemon's GPU pools this process maps (``kvd.client.gpu_pool``); None: the arena only. With
    # them, reservations go to the GPU tier first and leases may be answered from it (device to device).
    gpu: GpuPools | None = None
    _plans: dict[int, dict[str, ExtentPlan]] = field(default_factory=dict, repr=False)

    @property
    def head_map_tag(self) -> str | None:
        """What a head-aware reader names in its requests: the attention tag of its head map."""
        return attention_tag(self.head_map.sinks, self.head_map.windows) if self.reader == "head_aware" else None

    def reader_fields(self, position: int | None = None) -> dict:
        """The reader fields of a lookup or lease request (``position``: leases only)."""
        if self.reader != "head_aware":
            return {}
        out: dict = {"reader": "head_aware", "head_map": self.head_map_tag}
        if position is not None:
            out["position"] = position
        return out

    def plans(self, num_tokens: int) -> dict[str, ExtentPlan]:
        """``head class -> ExtentPlan`` of an entry of ``num_tokens`` tokens (cached)."""
        p = self._plans.get(num_tokens)
        if p is None:
            p = self._plans[num_tokens] = plan_extents(self.spec, self.head_map, num_tokens)
        return p

    def hashes(self, token_ids, max_chunks: int | None = None) -> list[str]:
        """Prefix keys of the full chunks of ``token_ids`` in this handle's namespace."""
        return prefix_hashes(token_ids, chunk_tokens=self.chunk_tokens, namespace=self.namespace,
                             fingerprint=self.fingerprint, max_chunks=max_chunks,
                             computed_under=self.computed_under)
