"""The worker side of the vLLM connector: moves the planned chunks between the arena and vLLM's blocks.

Runs in each vLLM worker process, one step at a time, driven by the hooks vLLM calls:

    begin_step(plan)      bind_connector_metadata    remember the step's loads and saves
    start_loads()         start_load_kv              one lease per request (one RPC), extents mapped
    load_layer(name)      wait_for_layer_load        copy that layer of every leased chunk into vLLM
                                                     (and hash what it copied: kvd.connectors.vllm.sums)
    save_layer(name, kv)  save_kv_layer              first call: one reservation per request; then copy
                                                     that layer of every reserved chunk into the arena
    end_step()            wait_for_save              check and release the loads; commit reservations
                                                     whose every layer was written, abort the others
    take_load_errors()    get_block_ids_with_load_errors (checks the loads first when vLLM asks before
                                                     wait_for_save: speculative decoding defers it)

Everything is synchronous inside the step: a saved chunk's bytes are in the arena before the step
ends, so vLLM may free or reuse its blocks right after (``request_finished`` never delays a free).
Failures never raise into vLLM: a lease that fails or returns fewer chunks, or a chunk whose bytes
fail their checksum, reports the blocks it did not (correctly) fill (vLLM recomputes them under
``kv_load_failure_policy: "recompute"``); a store that fails is aborted and counted.

KV computed over blocks a load failed to fill (by the loading request, by another request sharing
those blocks, on another tensor-parallel rank) is never stored: ``kvd.connectors.vllm.failures``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from kvd.client.session import DaemonSession
from kvd.client.transfer import open_lease, reserve
from kvd.connectors.vllm.copy import KernelCopier, PermCopier, Piece, StridedCopier
from kvd.connectors.vllm.failures import LoadFailures
from kvd.connectors.vllm.plan import LoadSpec, SaveSpec, StepPlan, entry_sizes
from kvd.connectors.vllm.settings import ConnectorSettings
from kvd.connectors.vllm.step_state import StepLoad, StepSave, StepState
from kvd.connectors.vllm.sums import LoadSums
from kvd.core import protocol as P

logger = logging.getLogger(__name__)


class WorkerIO:
    """``kv_caches``: layer name -> vLLM's per-layer view, in layer order; ``block_size``: vLLM's
    (manager) block size, which may span several kernel blocks of ``kv_caches``. ``recompute_failures``:
    vLLM recomputes blocks reported as failed (``kv_load_failure_policy: "recompute"``); only then are
    checksums taken during the copy (``settings.verify_with_copy``), since a mismatch is found after the
    bytes are in vLLM's blocks; else each lease is hashed before anything is copied."""

    def __init__(self, session: DaemonSession, settings: ConnectorSettings, kv_caches: dict[str, torch.Tensor],
                 copier: StridedCopier | PermCopier | KernelCopier, *, block_size: int, num_blocks: int,
                 recompute_failures: bool = True,
                 merge_failures: Callable[[list[int]], list[int]] | None = None) -> None:
        self.session = session
        self.settings = settings
        self.recompute_failures = recompute_failures
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
        self.step: StepState | None = None
        self.load_errors: set[int] = set()
        self.failures = LoadFailures(merge_failures)  # which saves failed loads spoil (tensor parallel: all ranks')

    @property
    def sums_with_copy(self) -> bool:
        """Whether loads are hashed as they are copied (``kvd.connectors.vllm.sums``)."""
        return (self.settings.verify_checksums and self.settings.verify_with_copy and self.recompute_failures
                and isinstance(self.copier, StridedCopier)  # the copier that feeds Piece.sums, on the CPU
                and next(iter(self.kv_caches.values())).device.type == "cpu")

    @property
    def counters(self):
        return self.session.counters

    # ---- helpers ----------------------------------------------------------------------------------

    def _kernel_blocks(self, block_ids: Sequence[int], t0: int, t1: int) -> list[int]:
        """Kernel blocks of tokens ``[t0, t1)`` in token order (``t0`` on a kernel block; ``t1`` may end
        inside one: a load up to the prompt's last token fills its last block in part)."""
        n = self.kernel_tokens
        return [block_ids[k // self.ratio] * self.ratio + k % self.ratio for k in range(t0 // n, -(-t1 // n))]

    def _fail(self, spec: LoadSpec, from_token: int, why: str) -> None:
        lo = max(spec.start, from_token)
        if lo >= spec.end:
            return
        blocks = spec.block_ids[lo // self.block_size : -(-spec.end // self.block_size)]
        self.load_errors.update(blocks)
        self.counters["load_failed_tokens"] += spec.end - lo
        self.failures.failed(spec, lo)
        logger.warning("kvd: %d tokens of %s not loaded (%s); vLLM recomputes them", spec.end - lo, spec.req_id, why)

    # ---- step ------------------------------------------------------------------------------------

    def begin_step(self, plan: StepPlan) -> None:
        self.step = StepState(plan)
        self.failures.begin_step(plan)

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

    def _lease(self, spec: LoadSpec) -> StepLoad | None:
        """Lease the spec's entries and plan the copy of the usable leading ones; report the rest."""
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
        lease = self.session.call("lease", lambda h: open_lease(
            h, spec.hashes, namespace=spec.namespace, min_tokens=sizes, wait_s=self.settings.load_wait_s,
            verify=self.settings.verify_checksums and not self.sums_with_copy, accept_lossy=self.settings.accept_lossy))
        if lease is None:
            self._fail(spec, spec.start, "lease failed")
            return None
        self.counters["checksum_failures"] += lease.num_corrupt
        n = lease.num_leading  # entries holding fewer tokens than planned are never used ("short")
        if n < len(sizes):
            chunk = spec.first_chunk + n
            self._fail(spec, chunk * c, f"entry {chunk} is {lease.states[n]}")
        load = StepLoad(spec, lease, [])
        end = spec.end
        if end % self.kernel_tokens and not self.copier.partial_blocks:  # it can write whole blocks only
            end -= end % self.kernel_tokens
            self._fail(spec, end, f"{type(self.copier).__name__} cannot fill a block in part")
        for i in range(n):  # an entry may hold more tokens than planned (an alias): copy the leading ones
            chunk = spec.first_chunk + i
            t0, t1 = max(spec.start, chunk * c), min(end, chunk * c + sizes[i])
            if t1 > t0:
                load.pieces.append(Piece(self._kernel_blocks(spec.block_ids, t0, t1), t0 - chunk * c,
                                         t1 - chunk * c, list(lease.entry(i).extents)))
                load.starts.append(chunk * c)
        if not load.pieces:
            self._release(load)
            return None
        if self.sums_with_copy:
            load.sums = LoadSums(list(zip(load.starts, load.pieces)), len(self.layer_index))
        return load

    def load_layer(self, layer_name: str) -> None:
        st = self.step
        layer = None if st is None else self.layer_index.get(layer_name)
        if layer is None or layer in st.layers_loaded:
            return
        t0 = time.perf_counter()
        if st.loads:
            self._keep_loads_alive()  # (may fail them all)
        if st.loads:
            try:
                self.copier.load_layer(self.kv_caches[layer_name], layer, [p for ld in st.loads for p in ld.pieces])
                for ld in st.loads:
                    if ld.sums is not None:
                        ld.sums.layer_copied(layer)
            except Exception as e:  # a boundary: vLLM must recompute, never crash on a cache fault
                logger.exception("kvd: copying layer %s into vLLM failed", layer_name)
                self._abandon_loads(f"copy failed: {e}")
        st.layers_loaded.add(layer)  # also with nothing (left) to load into it: the same on every rank
        st.forward_started = True
        st.t_load_s += time.perf_counter() - t0

    def _keep_loads_alive(self) -> None:
        """Renew the step's leases when due (a forward on a slow CPU can outlast their TTL). A lease the
        daemon no longer holds fails its loads, every layer: its bytes may have been reused, so vLLM
        recomputes those blocks (``take_load_errors``)."""
        st = self.step
        assert st is not None, "loads belong to a step"
        for ld in list(st.loads):
            if not self._kept(ld.lease):
                st.loads.remove(ld)
                self._release(ld)  # a no-op if it lapsed (closed); else the daemon was unreachable
                self._fail(ld.spec, ld.spec.start, "its lease could not be kept")

    def _kept(self, hold) -> bool:
        """Whether a lease or reservation is still held, renewed if due (False: it lapsed, or the daemon
        could not be asked; either way nothing more may go through it)."""
        return self.session.call("renew", lambda h: hold.keep_alive() or True) is not None

    def _abandon_loads(self, why: str) -> None:
        st = self.step
        assert st is not None, "loads belong to a step"
        for ld in st.loads:
            self._release(ld)
            self._fail(ld.spec, ld.spec.start, why)
        st.loads = []

    def _release(self, ld: StepLoad, transfer_s: float = 0.0) -> bool:
        """False if the release failed or was skipped: the daemon that granted the lease may be gone."""
        return ld.lease.closed or self.session.call("release", lambda h: ld.lease.release(transfer_s)) is not None

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
        for sv in list(st.saves):  # renewed when due; one that lapsed would be refused at commit
            if not self._kept(sv.reservation):
                st.saves.remove(sv)
                self._abort(sv)  # a no-op if it lapsed (closed)
                self.counters["store_failed_chunks"] += sv.reservation.num_reserved
        if st.saves:
            try:
                self.copier.save_layer(kv_layer, layer, [p for s in st.saves for p in s.pieces])
                st.layers_saved.add(layer)
            except Exception:  # a boundary: a failed store is a future miss, never a failed request
                logger.exception("kvd: copying layer %s into the arena failed", layer_name)
                self._abort_saves()
        st.t_save_s += time.perf_counter() - t0

    def _reserve(self, spec: SaveSpec) -> StepSave | None:
        """Reserve the spec's entries (with their prefix aliases) and plan the copies into them."""
        if self.failures.spoils(spec, self.load_errors):
            self.counters["store_aborted_chunks"] += len(spec.hashes)
            return None  # computed over blocks that were not loaded: never store it
        h = self.session.handle()
        if h is None:
            return None
        c = h.chunk_tokens
        sizes = entry_sizes(spec.hashes, c, spec.last_tokens)
        entries = [P.ReserveEntry(hash=x, num_tokens=n, start_token=(spec.first_chunk + i) * c,
                                  end_token=spec.prompt_tokens,
                                  aliases=[P.PrefixAlias(hash=a, num_tokens=k) for a, k in spec.aliases[i]]
                                  if spec.aliases else [])
                   for i, (x, n) in enumerate(zip(spec.hashes, sizes))]
        res = self.session.call("reserve", lambda h: reserve(h, entries, namespace=spec.namespace))
        if res is None:
            return None
        self.counters["store_exists_chunks"] += res.num_exists
        self.counters["store_no_space_chunks"] += res.num_no_space
        if res.closed:
            return None
        save = StepSave(spec, res, [])
        try:
            for i, n in enumerate(sizes):
                if (view := res.entry(i)) is not None:
                    chunk = spec.first_chunk + i
                    blocks = self._kernel_blocks(spec.block_ids, chunk * c, chunk * c + n)
                    save.pieces.append(Piece(blocks, 0, n, list(view.extents)))
        except IndexError:
            logger.warning("kvd: cannot store %s: %d blocks do not hold its %d tokens", spec.req_id,
                           len(spec.block_ids), spec.first_chunk * c + sum(sizes))
            self._abort(save)
            return None
        return save

    def _abort_saves(self) -> None:
        st = self.step
        assert st is not None, "saves belong to a step"
        for s in st.saves or []:
            self.counters["store_aborted_chunks"] += s.reservation.num_reserved
            self._abort(s)
        st.saves = []

    def _abort(self, save: StepSave) -> None:
        self.session.call("abort", lambda h: save.reservation.abort())

    def _commit(self, save: StepSave, transfer_s: float) -> None:
        committed = self.session.call("commit", lambda h: save.reservation.commit(transfer_s))
        n = save.reservation.num_reserved
        self.counters["stored_chunks"] += len(committed or [])
        self.counters["store_failed_chunks"] += n - len(committed or [])

    # ---- end of step -----------------------------------------------------------------------------

    def end_step(self) -> None:
        st = self.step
        if st is None:
            return
        num_layers = len(self.layer_index)
        self._finish_loads()
        if st.saves:
            t0 = time.perf_counter()
            # Saves reserved before a failure they read was known (kvd.connectors.vllm.failures).
            bad = [s for s in st.saves if self.failures.spoils(s.spec, self.load_errors)]
            st.saves = [s for s in st.saves if s not in bad]
            for s in bad:
                self.counters["store_aborted_chunks"] += s.reservation.num_reserved
                self._abort(s)
            if len(st.layers_saved) != num_layers:
                self._abort_saves()
            for s in st.saves:
                self._commit(s, st.t_save_s)
            st.t_save_s += time.perf_counter() - t0
        self.counters["load_s"] += st.t_load_s
        self.counters["save_s"] += st.t_save_s
        self.step = None

    def _finish_loads(self) -> None:
        """Check the step's loads, learn what other ranks failed, release the leases: once a step, at
        ``end_step`` or, when vLLM takes the load errors first (it defers ``wait_for_save`` past the
        drafter under speculative decoding), at ``take_load_errors`` once every layer was loaded, so
        the errors reach vLLM with the step whose output read the blocks."""
        st = self.step
        if st is None or st.loads_finished:
            return
        st.loads_finished = True
        num_layers = len(self.layer_index)
        t0 = time.perf_counter()
        if st.loads:
            try:
                if len(st.layers_loaded) != num_layers:
                    self._abandon_loads(f"only {len(st.layers_loaded)} of {num_layers} layers were loaded")
                self._check_sums()
            except Exception as e:  # a boundary; and every tensor-parallel rank must reach the exchange
                logger.exception("kvd: checking the step's loads failed")
                self._abandon_loads(f"checking them failed: {e}")
        # Released before the exchange, so a failed release fails the load on every rank. A daemon that
        # restarted during the copy frees the dead one's arena pages (kvd.tiers.arena.release_pages), and
        # the rest of the copy read zeros: caught by checksums taken with the copy, not by those before it.
        checked_before = self.settings.verify_checksums and not self.sums_with_copy
        for ld in st.loads:  # the step's copy time, shared out, feeds the daemon's load MB/s
            if not self._release(ld, st.t_load_s / len(st.loads)) and checked_before:
                self._fail(ld.spec, ld.spec.start, "its lease's release failed (the daemon may have restarted "
                           "during the copy, whose bytes were checked before it)")
        if st.plan.loads:  # the same plan on every rank: each makes this call (a collective under TP)
            for spec, first in self.failures.from_other_ranks(st.plan.loads):
                self._fail(spec, first, "another tensor-parallel rank failed to load it")
        if st.loads:
            for ld in st.loads:
                cut = self.failures.first.get(ld.spec.req_id, ld.spec.end)  # failed from here: not loaded
                self.counters["loaded_tokens"] += sum(max(0, min(s + p.t1, cut) - (s + p.t0))
                                                      for s, p in zip(ld.starts, ld.pieces))
            st.loads = []
            st.t_load_s += time.perf_counter() - t0

    def _check_sums(self) -> None:
        """Compare the checksums taken during the copies (before any save of the step is committed): a
        chunk that fails is reported with every chunk after it, and its request stores nothing."""
        st = self.step
        assert st is not None, "loads belong to a step"
        for ld in st.loads:
            bad = ld.sums.failures() if ld.sums is not None else []
            if bad:
                self.counters["checksum_failures"] += len(bad)
                self._fail(ld.spec, bad[0], "an extent failed its checksum, found after the copy")

    def take_load_errors(self) -> set[int]:
        st = self.step
        if st is not None and len(st.layers_loaded) == len(self.layer_index):
            self._finish_loads()  # taken before wait_for_save (``_finish_loads``)
        out, self.load_errors = self.load_errors, set()
        self.failures.end_step(out)
        return out
