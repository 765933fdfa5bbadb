"""Pages of SGLang's host KV pool seen as kvd's canonical ``kv[L, 2, H, P, D]``.

SGLang's MHA host pool (``MHATokenToKVPoolHost``) keeps one tensor ``kv_buffer`` whose order depends
on ``--hicache-mem-layout`` (index 0 of the first dim = K, 1 = V; P = page size, L layers, H KV heads):

| layout              | ``kv_buffer``                  | one page                          |
| ------------------- | ------------------------------ | --------------------------------- |
| ``layer_first``     | ``[2, L, slots, H, D]``        | ``[:, :, s:s+P]``                 |
| ``page_first``      | ``[2, slots, L, H, D]``        | ``[:, s:s+P]``                    |
| ``page_first_direct`` | ``[2, pages, L, P, H, D]``   | ``[:, s//P]``                     |
| ``page_head``       | ``[2, pages, H, P, L, D]``     | ``[:, s//P]``                     |

``HostPages.kv(s)`` returns the page starting at token slot ``s`` as a strided view
``[L, 2, H, P, D]``, the order ``kvd.client.views.EntryView.read_into`` / ``write_from`` copy, so
each page moves straight between the pool and the per-head segments of a kvd entry in the arena (no
staging copy). ``flat_kv`` does the same for a flat page in the pool's own order (``get_data_page``),
which SGLang's older ``get`` / ``set`` API hands around. Any other layout, pool type or page format
is refused when the pool is registered, naming what was seen and what is supported.
"""

from __future__ import annotations

from typing import Any

import torch

from kvd.core.errors import ConfigError

# layout -> (kv_buffer rank, permutation of one page's view to [L, 2, H, P, D])
LAYOUTS: dict[str, tuple[int, tuple[int, ...]]] = {
    "layer_first": (5, (1, 0, 3, 2, 4)),  # page [2, L, P, H, D]
    "page_first": (5, (2, 0, 3, 1, 4)),  # page [2, P, L, H, D]
    "page_first_direct": (6, (1, 0, 3, 2, 4)),  # page [2, L, P, H, D] (page axis indexed away)
    "page_head": (6, (3, 0, 1, 2, 4)),  # page [2, H, P, L, D]
}
SUPPORTED = tuple(LAYOUTS)


class HostPages:
    """One registered SGLang MHA host pool: its geometry and page views. Checked once, at registration."""

    def __init__(self, pool: Any) -> None:
        layout = getattr(pool, "layout", None)
        if layout not in LAYOUTS:
            raise ConfigError(f"SGLang host pool layout {layout!r} is not supported by kvd; supported: "
                              f"{', '.join(SUPPORTED)} (--hicache-mem-layout)")
        kv = getattr(pool, "kv_buffer", None)
        rank, self._perm = LAYOUTS[layout]
        if not isinstance(kv, torch.Tensor) or kv.dim() != rank or kv.shape[0] != 2:
            raise ConfigError(f"SGLang host pool {type(pool).__name__} is not an MHA pool with K and V in one "
                              f"kv_buffer (got {None if kv is None else tuple(kv.shape)}); kvd supports "
                              "MHATokenToKVPoolHost only (no MLA, no asymmetric K/V heads)")
        self.layout = layout
        self.page_size = int(pool.page_size)
        self.num_layers = int(pool.layer_num)
        self.start_layer = int(getattr(pool, "start_layer", 0) or 0)  # the model's layer of layer 0 (pipeline stages)
        self.num_heads = int(pool.head_num)
        self.head_dim = int(pool.head_dim)
        self.dtype = pool.dtype
        v_dim = int(getattr(pool, "v_head_dim", self.head_dim) or self.head_dim)
        if v_dim != self.head_dim:
            raise ConfigError(f"K head dim {self.head_dim} != V head dim {v_dim}: kvd segments need equal sizes")
        if getattr(pool, "storage_format_tag", None) is not None or getattr(pool, "stores_page_envelope", False):
            raise ConfigError(f"SGLang host pool pages are in format {pool.storage_format_tag!r}, not plain "
                              f"{self.dtype} K/V; kvd stores plain KV only")
        if int(getattr(pool, "dcp_size", 1)) != 1:
            raise ConfigError("SGLang decode context parallelism (dcp_size > 1) is not supported by kvd")
        self.kv_buffer = kv
        want = self.kv(0).shape
        if tuple(want) != (self.num_layers, 2, self.num_heads, self.page_size, self.head_dim):
            raise ConfigError(f"kv_buffer {tuple(kv.shape)} does not match layout {layout} with L={self.num_layers}, "
                              f"H={self.num_heads}, P={self.page_size}, D={self.head_dim}")

    def page_starts(self, host_indices: torch.Tensor, num_pages: int) -> list[int]:
        """Token slot of each page's first token; ``ValueError`` unless there are ``num_pages`` whole,
        page-aligned pages (SGLang allocates host memory in whole pages)."""
        p = self.page_size
        if host_indices.numel() != num_pages * p:
            raise ValueError(f"{host_indices.numel()} host indices for {num_pages} pages of {p} tokens")
        starts = host_indices[::p].tolist()
        if any(s % p for s in starts):
            raise ValueError(f"host indices {starts[:4]}... are not page-aligned (page size {p})")
        return starts

    def kv(self, start: int) -> torch.Tensor:
        """The page at token slot ``start`` as a view ``[L, 2, H, P, D]`` of the pool."""
        p = self.page_size
        if self.layout == "layer_first":
            page = self.kv_buffer[:, :, start : start + p]
        elif self.layout == "page_first":
            page = self.kv_buffer[:, start : start + p]
        else:
            page = self.kv_buffer[:, start // p]
        return page.permute(*self._perm)

    def flat_kv(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat page in the pool's own order (``get_data_page(..., flat=True)``) as ``[L, 2, H, P, D]``."""
        L, H, P, D = self.num_layers, self.num_heads, self.page_size, self.head_dim
        if flat.numel() != 2 * L * H * P * D or flat.dtype != self.dtype:
            raise ValueError(f"flat page of {flat.numel()} x {flat.dtype}; expected {2 * L * H * P * D} x {self.dtype}")
        shape = {"layer_first": (2, L, P, H, D), "page_first": (2, P, L, H, D),
                 "page_first_direct": (2, L, P, H, D), "page_head": (2, H, P, L, D)}[self.layout]
        return flat.view(shape).permute(*self._perm)
