"""``LayerLoader``: a step's loads copied into vLLM's CPU blocks on a thread of their own, layer by
layer ahead of the forward pass, so the copies overlap the model's work instead of adding to it.

Why: a kvd hit's copies are memory-bound work the forward pass does not need until each layer's
attention. Synchronously, ``wait_for_layer_load`` copied layer ``l`` and only then let the model run
it: a 4,096-token SmolLM2 hit on a 2-core VM paid ~65 ms of copies on top of the model's own ~110 ms
(``benchmarks/vllm_hit_profile.py``). Here ``start_load_kv`` starts one thread that copies layer 0, 1,
... in order, and ``wait_for_layer_load(l)`` only waits until layer ``l`` is done.

Where it runs: vLLM's CPU build reserves a core per NUMA node for KV transfer whenever a
``kv_transfer_config`` is set (its NIXL worker pins its transfer work to the last core of each node);
the loader's thread pins itself to those same cores, away from the OpenMP cores the model runs on. On a
machine where that is not possible the thread runs wherever the OS puts it.

What does not change: the lease (and its checksum pass) is taken before the thread starts, so only
verified bytes are copied; every layer is copied before the forward reads it; the thread is joined
before the step's leases are released (``finish``), so it never reads an arena slot the daemon may
reuse; saves keep their own copier on vLLM's thread (two staging buffers, never shared).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kvd.connectors.vllm.pieces import Piece

logger = logging.getLogger(__name__)


def transfer_cpus() -> set[int] | None:
    """The cores vLLM's CPU build keeps for KV transfer (the last core of each NUMA node, as its NIXL
    worker picks them), or None where they cannot be found."""
    try:
        from vllm.platforms import current_platform

        nodes = current_platform.discover_numa_topology()
        cpus = {max(node) for node in nodes if node}
    except Exception:  # noqa: BLE001 - any platform without the helper: no pinning
        return None
    return cpus or None


def _pin(cpus: set[int] | None) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cpus)  # this thread only (Linux: pid 0 is the calling thread)
        except OSError as e:  # outside this process's cpuset: run unpinned
            logger.info("kvd loader thread stays unpinned (%s)", e)


class LayerLoader:
    """``copier``: a copier of its own (its staging buffer is this thread's); ``kv_caches``: vLLM's
    per-layer views in layer order."""

    def __init__(self, copier, kv_caches: Sequence[torch.Tensor], cpus: set[int] | None = None) -> None:
        self.copier = copier
        self.kv_caches = list(kv_caches)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvd-load", initializer=_pin, initargs=(cpus,))
        self._done: list[threading.Event] = []
        self._error: tuple[int, BaseException] | None = None
        self._copied = -1  # the last layer copied in this run
        self._stop = threading.Event()
        self._future: Future | None = None
        self.copy_s = 0.0  # the thread's copy time in the last run

    @property
    def running(self) -> bool:
        return self._future is not None

    def start(self, pieces: list[Piece]) -> None:
        """Start copying every layer of ``pieces`` (the step's loads). One run at a time."""
        assert self._future is None, "finish the previous step's loads first"
        self._done = [threading.Event() for _ in self.kv_caches]
        self._error = None
        self._copied = -1
        self._stop.clear()
        self.copy_s = 0.0
        self._future = self._pool.submit(self._run, pieces)

    def _run(self, pieces: list[Piece]) -> None:
        t0 = time.perf_counter()
        try:
            for layer, kv in enumerate(self.kv_caches):
                if self._stop.is_set():
                    return
                try:
                    self.copier.load_layer(kv, layer, pieces)
                except BaseException as e:  # noqa: BLE001 - handed to the layer's waiter, never lost
                    self._error = (layer, e)
                    return
                self._copied = layer
                self._done[layer].set()
        finally:
            self.copy_s = time.perf_counter() - t0
            for ev in self._done:  # a waiter never hangs on a layer the run will not reach
                ev.set()

    def wait(self, layer: int) -> BaseException | None:
        """Block until ``layer`` is copied; the error that stopped the run at or before it, if any."""
        assert self._future is not None, "no loads running"
        self._done[layer].wait()
        err = self._error
        if err is not None and err[0] <= layer:
            return err[1]
        if layer > self._copied:
            return RuntimeError(f"loads stopped before layer {layer}")
        return None

    def finish(self) -> None:
        """Stop after the layer in progress and wait for the thread: nothing reads the arena after this."""
        if self._future is None:
            return
        self._stop.set()
        try:
            self._future.result()
        finally:
            self._future = None

    def close(self) -> None:
        self.finish()
        self._pool.shutdown(wait=True)
