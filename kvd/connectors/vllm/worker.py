"""The worker side of the vLLM connector: moves the planned chunks between the arena and vLLM's blocks.

Runs in each vLLM worker process, one step at a time, driven by the hooks vLLM calls:

    begin_step(plan)      bind_connector_metadata    remember the step's loads and saves
    start_loads()         start_load_kv              one lease per request (one RPC), extents mapped
    load_layer(name)      wait_for_layer_load        copy that layer of every leased chunk into vLLM
    save_layer(name, kv)  save_kv_layer              first call: one reservation per request; then copy
                                                     that layer of every reserved chunk into the arena
    end_step()            wait_for_save              release leases; commit reservations whose every
                                                     layer was written, abort the others
    take_load_errors()    get_block_ids_with_load_errors

Everything is synchronous inside the step: a saved chunk's bytes are in the arena before the step
ends, so vLLM may free or reuse its blocks right after (``request_finished`` never delays a free).
Failures never raise into vLLM: a lease that fails or returns fewer chunks reports the blocks it did
not fill (vLLM recomputes them under ``kv_load_failure_policy: "recompute"``); a request whose load
failed stores nothing in that step (its KV was computed over unfilled blocks); a store that fails is
aborted and counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import xxhash

from kvd.client.prefix import ModelHandle
from kvd.connectors.vllm.copy import KernelCopier, PermCopier, Piece
from kvd.connectors.vllm.scheduler import LoadSpec, SaveSpec, StepPlan, entry_sizes
from kvd.connectors.vllm.session import DaemonSession
from kvd.core import protocol as P
from kvd.core.errors import KvdError

logger = logging.getLogger(__name__)


@dataclass
class _Load:
    spec: LoadSpec
    lease_id: str | None
    pieces: list[Piece]


@dataclass
class _Save:
    spec: SaveSpec
    reservation_id: str
    pieces: list[Piece]
    num_chunks: int


@dataclass
class _Step:
    plan: StepPlan
    loads: list[_Load] = field(default_factory=list)
    saves: list[_Save] | None = None  # None until the first save_layer of the step
    layers_loaded: set[int] = field(default_factory=set)
    layers_saved: set[int] = field(default_factory=set)
    forward_started: bool = False
    failed_reqs: set[str] = field(default_factory=set)
    t_load_s: float = 0.0
    t_save_s: float = 0.0


class WorkerIO:
    """``kv_caches``: layer name -> vLLM's per-layer view, in layer order; ``block_size``: vLLM's
    (manager) block size, which may span several kernel blocks of ``kv_caches``."""

    def __init__(self, session: DaemonSession, kv_caches: dict[str, torch.Tensor], copier: PermCopier | KernelCopier,
                 *, block_size: int, num_blocks: int) -> None:
        self.session = session
        self.kv_caches = kv_caches
        self.layer_index = {name: i for i, name in enumerate(kv_caches)}
        self.copier = copier
        self.block_size = block_size
        first = next(iter(kv_caches.values()))
        self.ratio = first.shape[0] // num_blocks  # kernel blocks per manager block
        if self.ratio < 1 or block_size % self.ratio or first.shape[2] * self.ratio != block_size:
            raise ValueError(f"KV layer of shape {tuple(first.shape)} does not tile {num_blocks} blocks of "
                             f"{block_size} tokens")
        self.kernel_tokens = block_size // self.ratio
        self.step: _Step | None = None
        self.load_errors: set[int] = set()

    @property
    def counters(self):
        return self.session.counters

    # ---- helpers ----------------------------------------------------------------------------------

    def _kernel_blocks(self, block_ids: Sequence[int], t0: int, t1: int) -> list[int]:
        """Kernel blocks of tokens ``[t0, t1)`` (multiples of the kernel block size), in token order."""
        n = self.kernel_tokens
        return [block_ids[k // self.ratio] * self.ratio + k % self.ratio for k in range(t0 // n, t1 // n)]

    def _fail(self, spec: LoadSpec, from_token: int, why: str) -> None:
        lo = max(spec.start, from_token)
        if lo >= spec.end:
            return
        blocks = spec.block_ids[lo // self.block_size : -(-spec.end // self.block_size)]
        self.load_errors.update(blocks)
        self.counters["load_failed_tokens"] += spec.end - lo
        if self.step is not None:
            self.step.failed_reqs.add(spec.req_id)
        logger.warning("kvd: %d tokens of %s not loaded (%s); vLLM recomputes them", spec.end - lo, spec.req_id, why)

    def _extent_views(self, h: ModelHandle, arena_id: str, extents: list[P.ExtentInfo], num_tokens: int):
        arena = h.client.arena(arena_id)
        plans = h.plans(num_tokens)
        return [(plans[x.head_class], arena.torch_extent(x, plans[x.head_class], h.spec.kv_dtype)) for x in extents]

    # ---- step ------------------------------------------------------------------------------------

    def begin_step(self, plan: StepPlan) -> None:
        self.step = _Step(plan)

    def start_loads(self) -> None:
        st = self.step
        if st is None or not st.plan.loads:
            return
        t0 = time.perf_counter()
        for spec in st.plan.loads:
            if st.forward_started:  # vLLM ran attention before loading: these blocks hold nothing
                self._fail(spec, spec.start, "load started after the forward")
                continue
            load = self._lease(spec)
            if load is not None:
                st.loads.append(load)
        st.t_load_s += time.perf_counter() - t0

    def _lease(self, spec: LoadSpec) -> _Load | None:
        h = self.session.handle()
        if h is None:
            self._fail(spec, spec.start, "kvd unavailable")
            return None
        c = h.chunk_tokens
        sizes = entry_sizes(spec.hashes, c, spec.last_tokens)
        if (spec.start % self.block_size or spec.start < spec.first_chunk * c
                or spec.end > spec.first_chunk * c + sum(sizes) or len(spec.block_ids) * self.block_size < spec.end):
            self._fail(spec, spec.start, "range not aligned to blocks and chunks")
            return None
        resp = self.session.call("lease", lambda h: h.client.lease(P.LeaseRequest(
            fingerprint=h.fingerprint, namespace=spec.namespace, hashes=list(spec.hashes),
            wait_s=self.session.settings.load_wait_s)))
        if resp is None:
            self._fail(spec, spec.start, "lease failed")
            return None
        load = _Load(spec, resp.lease_id, [])
        try:
            for i, e in enumerate(resp.entries):
                chunk = spec.first_chunk + i
                if e.status == "ok" and e.num_tokens != sizes[i]:  # never copy KV of another shape
                    self._fail(spec, chunk * c, f"entry {chunk} holds {e.num_tokens} tokens, expected {sizes[i]}")
                    break
                if e.status != "ok" or not self._verified(h, resp.arena_id, e):
                    self._fail(spec, chunk * c, f"chunk {chunk} is {e.status if e.status != 'ok' else 'corrupt'}")
                    break
                t0, t1 = max(spec.start, chunk * c), min(spec.end, chunk * c + sizes[i])
                if t1 > t0:
                    load.pieces.append(Piece(self._kernel_blocks(spec.block_ids, t0, t1), t0 - chunk * c, t1 - chunk * c,
                                             self._extent_views(h, resp.arena_id, e.extents, sizes[i])))
        except (KvdError, ValueError) as e:  # the arena could not be mapped or a view not built
            self._release(load)
            self._fail(spec, spec.start, f"arena: {e}")
            return None
        return load

    def _verified(self, h: ModelHandle, arena_id: str, e: P.LeasedEntry) -> bool:
        if not self.session.settings.verify_checksums:
            return True
        arena = h.client.arena(arena_id)
        for x in e.extents:
            if x.checksum is not None and xxhash.xxh3_64_hexdigest(arena.bytes_at(x.offset, x.nbytes)) != x.checksum:
                self.counters["checksum_failures"] += 1
                return False
        return True

    def load_layer(self, layer_name: str) -> None:
        st = self.step
        if st is None:
            return
        layer = self.layer_index.get(layer_name)
        if layer is None or layer in st.layers_loaded:
            return
        if not st.loads:
            st.forward_started = True
            return
        t0 = time.perf_counter()
        try:
            self.copier.load_layer(self.kv_caches[layer_name], layer, [p for ld in st.loads for p in ld.pieces])
        except Exception as e:  # a boundary: vLLM must recompute, never crash on a cache fault
            logger.exception("kvd: copying layer %s into vLLM failed", layer_name)
            self._abandon_loads(f"copy failed: {e}")
        st.layers_loaded.add(layer)
        st.forward_started = True
        st.t_load_s += time.perf_counter() - t0

    def _abandon_loads(self, why: str) -> None:
        st = self.step
        assert st is not None, "loads belong to a step"
        for ld in st.loads:
            self._release(ld)
            self._fail(ld.spec, ld.spec.start, why)
        st.loads = []

    def _release(self, ld: _Load, transfer_s: float = 0.0) -> None:
        if ld.lease_id is not None:
            lease_id, ld.lease_id = ld.lease_id, None
            self.session.call("release", lambda h: h.client.release(P.ReleaseRequest(
                lease_id=lease_id, transfer_s=min(transfer_s, 3600.0))))

    # ---- saves -----------------------------------------------------------------------------------

    def save_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        st = self.step
        if st is None:
            return
        st.forward_started = True
        layer = self.layer_index.get(layer_name)
        if layer is None or not st.plan.saves:
            return
        t0 = time.perf_counter()
        if st.saves is None:
            st.saves = [s for spec in st.plan.saves if (s := self._reserve(spec)) is not None]
        if st.saves:
            try:
                self.copier.save_layer(kv_layer, layer, [p for s in st.saves for p in s.pieces])
                st.layers_saved.add(layer)
            except Exception:  # a boundary: a failed store is a future miss, never a failed request
                logger.exception("kvd: copying layer %s into the arena failed", layer_name)
                self._abort_saves()
        st.t_save_s += time.perf_counter() - t0

    def _reserve(self, spec: SaveSpec) -> _Save | None:
        st = self.step
        if st is not None and spec.req_id in st.failed_reqs:
            return None  # computed over blocks that were not loaded: never store it
        h = self.session.handle()
        if h is None:
            return None
        c_tokens = h.chunk_tokens
        sizes = entry_sizes(spec.hashes, c_tokens, spec.last_tokens)
        resp = self.session.call("reserve", lambda h: h.client.reserve(P.ReserveRequest(
            fingerprint=h.fingerprint, namespace=spec.namespace,
            entries=[P.ReserveEntry(hash=x, num_tokens=n, start_token=(spec.first_chunk + i) * c_tokens,
                                    end_token=spec.prompt_tokens) for i, (x, n) in enumerate(zip(spec.hashes, sizes))])))
        if resp is None:
            return None
        status = [e.status for e in resp.entries]
        self.counters["store_exists_chunks"] += status.count("exists")
        self.counters["store_no_space_chunks"] += status.count("no_space")
        if resp.reservation_id is None:
            return None
        save = _Save(spec, resp.reservation_id, [], status.count("reserved"))
        try:
            for i, e in enumerate(resp.entries):
                if e.status == "reserved":
                    chunk, n = spec.first_chunk + i, sizes[i]
                    blocks = self._kernel_blocks(spec.block_ids, chunk * c_tokens, chunk * c_tokens + n)
                    save.pieces.append(Piece(blocks, 0, n, self._extent_views(h, resp.arena_id, e.extents, n)))
        except (KvdError, ValueError, IndexError) as e:
            logger.warning("kvd: cannot store %s (%s)", spec.req_id, e)
            self._abort(save.reservation_id)
            return None
        return save

    def _abort_saves(self) -> None:
        st = self.step
        assert st is not None, "saves belong to a step"
        for s in st.saves or []:
            self.counters["store_aborted_chunks"] += s.num_chunks
            self._abort(s.reservation_id)
        st.saves = []

    def _abort(self, reservation_id: str) -> None:
        self.session.call("abort", lambda h: h.client.abort(P.AbortRequest(reservation_id=reservation_id)))

    def _commit(self, reservation_id: str, transfer_s: float) -> bool:
        return self.session.call("commit", lambda h: h.client.commit(P.CommitRequest(
            reservation_id=reservation_id, transfer_s=transfer_s))) is not None

    # ---- end of step -----------------------------------------------------------------------------

    def end_step(self) -> None:
        st = self.step
        if st is None:
            return
        num_layers = len(self.layer_index)
        if st.loads:
            if len(st.layers_loaded) != num_layers:
                self._abandon_loads(f"only {len(st.layers_loaded)} of {num_layers} layers were loaded")
            t0 = time.perf_counter()
            for ld in st.loads:  # the step's copy time, shared out, feeds the daemon's load MB/s
                self._release(ld, st.t_load_s / len(st.loads))
                self.counters["loaded_tokens"] += ld.spec.end - ld.spec.start
            st.t_load_s += time.perf_counter() - t0
        if st.saves:
            t0 = time.perf_counter()
            if st.failed_reqs:
                # Saves reserved before a copy failure was known for that request are dropped too.
                bad = [s for s in st.saves if s.spec.req_id in st.failed_reqs]
                st.saves = [s for s in st.saves if s not in bad]
                for s in bad:
                    self._abort(s.reservation_id)
            if len(st.layers_saved) != num_layers:
                self._abort_saves()
            for s in st.saves:
                done = self._commit(s.reservation_id, st.t_save_s)
                self.counters["stored_chunks" if done else "store_failed_chunks"] += s.num_chunks
            st.t_save_s += time.perf_counter() - t0
        self.counters["load_s"] += st.t_load_s
        self.counters["save_s"] += st.t_save_s
        self.step = None

    def take_load_errors(self) -> set[int]:
        out, self.load_errors = self.load_errors, set()
        return out
