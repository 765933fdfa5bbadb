"""The model registry: which models the daemon knows, with their fingerprint, shapes and head map.

A model must be registered before its KV is stored or looked up; the answer tells the client its
fingerprint, the chunk size and the arena to map. Registration is idempotent. Re-registering a model
with a different head map (other global heads, sinks or windows) is refused while entries stored
under the old map exist (their extents follow the old map's head classes and window groups). A head map profiled for another model (its ``fingerprint`` is
another's) is refused. Registrations are persisted beside the data of persistent tiers so the index
can be rebuilt at start (``kvd.store.recovery``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from kvd.core import protocol as P
from kvd.core.config import DaemonSettings
from kvd.core.dtypes import DTYPE_BYTES
from kvd.core.errors import Conflict, FingerprintMismatch, InvalidRequest, NotFound, RequestTooLarge
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec
from kvd.store.entries import ModelRecord

logger = logging.getLogger(__name__)


class ModelRegistry:
    def __init__(self, clock: Callable[[], float], limits: DaemonSettings | None = None) -> None:
        self.clock = clock
        self.limits = limits or DaemonSettings()  # max_model_heads, max_model_kv_bytes_per_token
        self.models: dict[str, ModelRecord] = {}  # fingerprint -> model

    def register(self, req: P.RegisterModelRequest, *, has_entries: Callable[[str], bool], tenant: str | None = None,
                 may_remap: bool = True) -> tuple[ModelRecord, bool]:
        """Validate and record the model. Returns (record, changed). ``tenant``: the caller's (None: no
        tenant, or one trust domain). ``may_remap``: whether the caller may change the head map of a
        model another tenant registered (admins, and every client without tenants)."""
        self._check_size(req)
        _check_finite(req)
        spec = ModelSpec(model_id=req.model_id, revision=req.revision, num_layers=req.num_layers,
                         num_kv_heads=req.num_kv_heads, head_dim=req.head_dim, kv_dtype=req.kv_dtype,
                         rope=req.rope, layout=req.layout)
        fp = spec.fingerprint()
        if req.fingerprint is not None and req.fingerprint != fp:
            raise FingerprintMismatch(
                f"fingerprint {req.fingerprint} does not match {fp}, computed from the model fields sent; "
                "the client and daemon disagree on the model layout — upgrade both to the same kvd")
        hm = req.head_map
        if hm is not None:
            if hm.fingerprint is not None and hm.fingerprint != fp:
                raise FingerprintMismatch(
                    f"head map for {hm.model!r} was made for the model with fingerprint {hm.fingerprint}; "
                    f"{spec.model_id} has {fp}: profile a head map for this model (kvctl profile)")
            hm.check_fits(spec.num_layers, spec.num_kv_heads, model=spec.model_id)
        else:
            hm = HeadMap.all_global(spec.model_id, spec.num_layers, spec.num_kv_heads)
        known = self.models.get(fp)
        # Extents are grouped and tagged by each head's sink and window, not only by its class: a map
        # of other windows lays out other extents even where the global heads are the same ones.
        remap = known is not None and (known.head_map.sinks, known.head_map.windows) != (hm.sinks, hm.windows)
        if remap and has_entries(fp):
            raise Conflict(
                f"model {spec.model_id} ({fp}) is registered with another head map and has stored entries, "
                "whose extents follow the old map; delete them (kvctl evict) or register a new revision")
        # Models are daemon-wide: a map change would re-map other tenants' model under them (their
        # head-aware reads refused until they registered again, and back). Which tenants registered a
        # model is kept for this run only; after a restart its entries hold the map in place.
        if remap and not may_remap and known.tenants - {tenant}:
            raise Conflict(
                f"model {spec.model_id} ({fp}) is registered by another tenant with another head map; tenants "
                "of one daemon share a model's head map: register the same map, another revision, or ask an admin")
        if known is not None and known.head_map == hm:
            known.tenants.update({tenant} - {None})
            known.last_used = self.clock()
            return known, False
        record = ModelRecord(fp, spec, hm, self.clock(), tenants=(known.tenants if known else set()) | ({tenant} - {None}),
                             last_used=self.clock())
        self.models[fp] = record
        logger.info("registered model %s (%s): %d layers × %d KV heads, %d global", spec.model_id, fp,
                    spec.num_layers, spec.num_kv_heads, hm.num_global)
        return record, True

    def _check_size(self, req: P.RegisterModelRequest) -> None:
        """Refuse shapes no real model has before building anything for them: a 4096 x 4096-head
        model's extent plans held the event loop for seconds and gigabytes."""
        heads = req.num_layers * req.num_kv_heads
        per_token = 2 * heads * req.head_dim * DTYPE_BYTES.get(req.kv_dtype, 2)
        if heads > self.limits.max_model_heads or per_token > self.limits.max_model_kv_bytes_per_token:
            raise RequestTooLarge(
                f"model {req.model_id[:80]!r}: {req.num_layers} layers x {req.num_kv_heads} KV heads x head_dim "
                f"{req.head_dim} = {heads} heads, {per_token} KV bytes per token; at most "
                f"{self.limits.max_model_heads} heads and {int(self.limits.max_model_kv_bytes_per_token)} bytes "
                "(daemon.max_model_heads, daemon.max_model_kv_bytes_per_token)")

    def get(self, fingerprint: str) -> ModelRecord:
        m = self.models.get(fingerprint)
        if m is None:
            raise NotFound(f"model {fingerprint!r} is not registered with this daemon; register it first "
                           "(POST /v1/models; clients do this on connect and after a daemon restart)")
        m.last_used = self.clock()
        return m

    def prune(self, idle_s: float, in_use: Callable[[str], bool]) -> list[str]:
        """Forget the models nothing has used for ``idle_s`` seconds (0: never) that hold no entry
        (``in_use``); returns their fingerprints. Every checkpoint or revision an engine ever registered
        was kept for the daemon's whole run (about 270 KB each with a profiled head map: its scores and
        registration document), where a restart keeps only models with records. A client that registered
        one is told "not registered" at its next call and registers it again (``kvd.client``); which
        tenants had registered it is forgotten with it (``register``'s head-map lock between tenants)."""
        if idle_s <= 0:
            return []
        now = self.clock()
        gone = [fp for fp, m in self.models.items() if now - m.last_used > idle_s and not in_use(fp)]
        for fp in gone:
            logger.info("model %s (%s) forgotten: no entries, unused for %.0f s (daemon.model_idle_s)",
                        self.models.pop(fp).spec.model_id, fp, idle_s)
        return gone


def _check_finite(req: P.RegisterModelRequest) -> None:
    """Refuse NaN and infinite numbers (JSON's ``NaN``, ``Infinity``, ``1e400``) in the free-form parts of a
    registration: they enter the fingerprint, but the persisted registration (``Admin.persist_model``)
    can only write them as null, so after a restart the model would not register under its fingerprint
    and every record of it would be dropped as an unknown model's."""
    parts: dict[str, Any] = {"rope": req.rope}
    if req.head_map is not None:
        parts.update({"head_map.scores": req.head_map.scores, "head_map.calibration": req.head_map.calibration})
    for where, value in parts.items():
        bad = _non_finite(where, value)
        if bad is not None:
            raise InvalidRequest(f"{bad[0]} = {bad[1]}: not a finite number; a registration may carry finite "
                                 "numbers only (they are part of the model's fingerprint, and kept as JSON)")


def _non_finite(where: str, value: Any) -> tuple[str, float] | None:
    """``(path, value)`` of the first non-finite float in ``value`` (nested dicts and lists), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        bad = _non_finite(f"{where}.{k}", v)
        if bad is not None:
            return bad
    return None
