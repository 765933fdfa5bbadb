"""The page pool of the transformers adapter: K and V per (layer, KV head) in pages (kvd's GPU tier).

One pool per cache holds every layer: ``k``/``v`` of ``[num_pages, page_tokens, head_dim]`` (CPU tensors
when there is no GPU). Pages are position-aligned: page column ``j`` of a row holds positions
``[j * N, (j + 1) * N)``. Each layer keeps a table ``[rows, columns]`` of page ids, ``-1`` where a
row has no page (never written, or dropped); row ``r = b * num_kv_heads + h`` is (request b, KV head h),
the row order of the SegPagedAttention kernels.

Lifecycle of a page: allocated when a row first writes a position of its column → written (tokens
are appended at the end, or overwritten in place by chunk reuse) → freed by ``trim`` when no future
query can see it. A local head (sink ``s``, window ``w``) sees position ``p`` from a query at ``q`` iff
``p < s`` or ``q - w < p <= q``; queries only move forward, so once the next query is at ``t``, column
``j`` is dead iff ``j * N >= s`` and ``(j + 1) * N - 1 <= t - w``. Global heads never drop pages.
Worked example (N 16, sink 4, window 32, next query 100): columns 1..3 (positions 16..63) are dead,
column 4 (64..79) stays because 79 > 68; column 0 stays for the sink. The row lists 0, 4, 5, 6.

Growth: when the free list runs out, the pool tensors are reallocated at twice the size and copied;
page ids stay valid. Which heads are local, and their sinks and windows, come from the cache's
``kvd.core.headmap.HeadMap`` (its ``sinks``/``windows`` grids, window 0 = global).

No host syncs on the decode path: a decode step appends and trims once per layer, so both decide on
the host (``append`` allocates only new columns' pages; ``trim`` knows each head's dead columns from
its sink, window and how far it has trimmed), freed ids wait on the device until pages run short,
and a layer's listing is kept until a page is added or dropped. Measured on an H100 (SmolLM2 shape):
a step fell from 55-58 ms to 27-33 ms with the adapter's other decode cuts (docs/kernels.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from kvd.core.headmap import HeadMap


@dataclass(slots=True, frozen=True)
class Listing:
    """One layer's page lists in the SegPagedAttention kernels' form (int32, on the pool's device)."""

    page_table: torch.Tensor  # [rows, max_pages] page ids; entries past a row's pages are 0
    page_pos: torch.Tensor  # [rows, max_pages] position of each listed page's token 0
    seq_lens: torch.Tensor  # [rows] tokens listed (all listed pages full but the last)
    sink: torch.Tensor  # [num_kv_heads]
    window: torch.Tensor  # [num_kv_heads]; 0 = global


class PagePool:
    """K/V pages of every layer of one cache (see the module docstring for the lifecycle)."""

    def __init__(self, head_map: HeadMap, *, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 batch_size: int = 1, page_tokens: int = 16, initial_pages: int = 256) -> None:
        if page_tokens <= 0 or batch_size <= 0:
            raise ValueError(f"page_tokens={page_tokens} and batch_size={batch_size} must be positive")
        self.head_map = head_map
        self.head_dim = head_dim
        self.page_tokens = page_tokens
        self.batch_size = batch_size
        self.num_kv_heads = head_map.num_kv_heads
        self.rows = batch_size * head_map.num_kv_heads
        self.device = torch.device(device)
        self.dtype = dtype
        self.k = torch.empty(initial_pages, page_tokens, head_dim, dtype=dtype, device=self.device)
        self.v = torch.empty_like(self.k)
        self._free = torch.arange(initial_pages - 1, -1, -1, device="cpu")  # a stack: pop from the end
        self._num_free = initial_pages
        self._pending: list[torch.Tensor] = []  # freed page ids still on the device (see _release)
        self.tables = [torch.full((self.rows, 0), -1, dtype=torch.long, device=self.device)
                       for _ in range(head_map.num_layers)]
        self.num_tokens = [0] * head_map.num_layers  # positions [0, num_tokens) written per layer
        # per layer and KV head: the first column after the sink that trim has not freed yet
        self._low = [[0] * self.num_kv_heads for _ in range(head_map.num_layers)]
        # per layer: (num_tokens, Listing) of the last listing, until a page is added or dropped
        self._listed: list[tuple[int, Listing] | None] = [None] * head_map.num_layers
        self._ragged = [False] * head_map.num_layers  # written for some rows only (then append takes write's path)
        self._heads = [self._head_tensors(layer) for layer in range(head_map.num_layers)]
        # Called as on_trim(layer, rows, cols, page_ids) before trim frees those pages (their bytes are
        # still in k/v then): the Lil guard's host stash (kvd.connectors.hf.restore) keeps them.
        self.on_trim: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None

    def widen(self, head_map: HeadMap) -> None:
        """Attend under ``head_map`` from now on (the Lil guard's restore: every head global). Pages a
        narrower map trimmed must have been put back first (``put_pages``); trims follow the new map."""
        head_map.check_fits(len(self.tables), self.num_kv_heads)
        self.head_map = head_map
        self._heads = [self._head_tensors(layer) for layer in range(head_map.num_layers)]
        self._low = [[0] * self.num_kv_heads for _ in range(head_map.num_layers)]
        self._listed = [None] * head_map.num_layers

    def _head_tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        sink = torch.tensor(self.head_map.sinks[layer], dtype=torch.int32, device=self.device)
        window = torch.tensor(self.head_map.windows[layer], dtype=torch.int32, device=self.device)
        return sink, window

    # ---- pages ---------------------------------------------------------------------------------

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def pages_in_use(self) -> int:
        self._collect()
        return self.num_pages - self._num_free

    def kv_bytes(self) -> int:
        """Bytes of K and V held in pages in use."""
        return 2 * self.pages_in_use * self.page_tokens * self.head_dim * self.k.element_size()

    def _grow(self, need: int) -> None:
        old = self.num_pages
        new = max(2 * old, old + need)
        for name in ("k", "v"):
            t = getattr(self, name)
            bigger = torch.empty(new, *t.shape[1:], dtype=t.dtype, device=t.device)
            bigger[:old].copy_(t)
            setattr(self, name, bigger)
        # the new pages go below the old free ones, lowest id on top of the stack
        added = torch.arange(new - 1, old - 1, -1)
        self._free = torch.cat([added, self._free[: self._num_free]])
        self._num_free += new - old

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the pool's device without waiting for the GPU (pinned, non-blocking copy)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _allocate(self, n: int) -> torch.Tensor:
        if n > self._num_free:
            self._collect()
        if n > self._num_free:
            self._grow(n - self._num_free)
        ids = self._free[self._num_free - n : self._num_free].flip(0)
        self._num_free -= n
        return self._to_device(ids)

    def _release(self, ids: torch.Tensor) -> None:
        """Give pages back. On a GPU the ids stay there until pages are short (``_collect``): reading
        them now would wait for every queued kernel, once per layer per decode step. Ids < 0 (no
        page) are skipped."""
        if ids.numel() == 0:
            return
        if ids.device.type == "cuda":
            self._pending.append(ids)
            return
        self._push(ids)

    def _collect(self) -> None:
        if self._pending:
            ids, self._pending = torch.cat(self._pending), []
            self._push(ids.cpu())

    def _push(self, ids: torch.Tensor) -> None:
        ids = ids[ids >= 0].to("cpu")
        end = self._num_free + ids.numel()
        if end > self._free.numel():
            self._free = torch.cat([self._free, torch.empty(end - self._free.numel(), dtype=torch.long)])
        self._free[self._num_free : end] = ids
        self._num_free = end

    def reserve(self, num_tokens: int) -> None:
        """Make room for ``num_tokens`` more tokens in every row of every layer (one growth, not many)."""
        self._collect()
        per_layer = self.rows * (-(-num_tokens // self.page_tokens) + 1)
        need = per_layer * len(self.tables) - self._num_free
        if need > 0:
            self._grow(need)

    # ---- writes ------------------------------------------------------------------------------------

    def _ensure_columns(self, layer: int, end: int) -> torch.Tensor:
        table = self.tables[layer]
        cols = -(-end // self.page_tokens)
        if table.shape[1] < cols:
            pad = torch.full((self.rows, cols - table.shape[1]), -1, dtype=torch.long, device=self.device)
            table = self.tables[layer] = torch.cat([table, pad], dim=1)
        return table

    def slots(self, layer: int, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot ids ``[len(rows), len(positions)]`` into ``k.view(-1, D)``, allocating missing pages."""
        self._listed[layer] = None
        end = int(positions.max()) + 1
        table = self._ensure_columns(layer, end)
        cols = torch.unique(positions // self.page_tokens)
        sub = table[rows][:, cols]  # [R, C]
        missing = sub < 0
        n_missing = int(missing.sum())
        if n_missing:
            sub[missing] = self._allocate(n_missing)
            table[rows[:, None], cols[None, :]] = sub
        page = table[rows][:, positions // self.page_tokens]  # [R, A]
        return page * self.page_tokens + (positions % self.page_tokens)[None, :]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              rows: torch.Tensor | None = None) -> None:
        """Write ``k``/``v [R, A, D]`` of ``rows`` (default all) at ``positions [A]`` (long, any order).

        Pages are allocated as needed; existing tokens at those positions are overwritten.
        """
        if rows is not None and rows.numel() != self.rows:
            self._ragged[layer] = True  # some rows may lack a page others have: appends check the table
        rows = torch.arange(self.rows, device=self.device) if rows is None else rows.to(self.device)
        positions = positions.to(self.device)
        if positions.numel() == 0 or rows.numel() == 0:
            return
        flat = self.slots(layer, rows, positions).reshape(-1)
        d = self.head_dim
        self.k.view(-1, d).index_copy_(0, flat, k.reshape(-1, d).to(self.dtype))
        self.v.view(-1, d).index_copy_(0, flat, v.reshape(-1, d).to(self.dtype))
        self.num_tokens[layer] = max(self.num_tokens[layer], int(positions.max()) + 1)

    def put_pages(self, layer: int, rows: torch.Tensor, cols: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put whole pages back where ``trim`` took them from: ``k``/``v [M, page_tokens, D]`` at (``rows[i]``,
        ``cols[i]``), each of which must have no page now."""
        if rows.numel() == 0:
            return
        rows, cols = rows.to(self.device), cols.to(self.device)
        self._low[layer] = [0] * self.num_kv_heads  # trim looks at every column again
        self._listed[layer] = None
        table = self._ensure_columns(layer, (int(cols.max()) + 1) * self.page_tokens)
        if bool((table[rows, cols] >= 0).any()):
            raise ValueError(f"layer {layer}: put_pages over pages the pool still holds")
        ids = self._allocate(rows.numel())
        table[rows, cols] = ids
        self.k[ids] = k.to(device=self.device, dtype=self.dtype)
        self.v[ids] = v.to(device=self.device, dtype=self.dtype)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Append ``k``/``v [rows, T, D]`` at the end of the layer; returns the first new position.

        Without a host sync (a decode step appends once per layer): every write covers all rows and
        the column holding the newest position is never trimmed, so the only pages to allocate are
        those of new columns, known on the host. A layer whose columns run past its tokens (not made
        by appends) takes ``write``'s general path."""
        start, n, N = self.num_tokens[layer], k.shape[1], self.page_tokens
        table = self.tables[layer]
        if n == 0:
            return start
        if table.shape[1] != -(-start // N) or self._ragged[layer]:
            self.write(layer, k, v, torch.arange(start, start + n, device=self.device))
            return start
        new = -(-(start + n) // N) - table.shape[1]
        if new > 0:
            table = self.tables[layer] = torch.cat([table, self._allocate(self.rows * new).view(self.rows, new)], 1)
            self._listed[layer] = None
        if n == 1:  # a decode step: one column, known here
            flat = table[:, start // N] * N + start % N
        else:
            positions = torch.arange(start, start + n, device=self.device)
            flat = (table[:, positions // N] * N + positions % N).reshape(-1)
        d = self.head_dim
        self.k.view(-1, d).index_copy_(0, flat, k.reshape(-1, d).to(self.dtype))
        self.v.view(-1, d).index_copy_(0, flat, v.reshape(-1, d).to(self.dtype))
        self.num_tokens[layer] = start + n
        return start

    def trim(self, layer: int, next_pos: int | None = None) -> int:
        """Free the local heads' pages no query at ``>= next_pos`` (default: the end) can see; returns
        the number of (row, column) places dropped.

        Decided on the host: a local head's dead columns are those from its sink's end up to the
        window's start (module docstring), of which the ones below ``_low`` are gone already; so a step
        that crosses no page boundary costs nothing here, and one that does queues its work on the GPU
        without waiting for it."""
        nxt = self.num_tokens[layer] if next_pos is None else next_pos
        width, N, low = self.tables[layer].shape[1], self.page_tokens, self._low[layer]
        rows: list[int] = []
        cols: list[int] = []
        for h, (sink, window) in enumerate(zip(self.head_map.sinks[layer], self.head_map.windows[layer])):
            lo, hi = max(low[h], -(-sink // N)), min(width, (nxt - window + 1) // N)
            if window <= 0 or hi <= lo:
                continue
            low[h] = hi
            for b in range(self.batch_size):
                rows += [b * self.num_kv_heads + h] * (hi - lo)
                cols += range(lo, hi)
        if not rows:
            return 0
        table = self.tables[layer]
        r, c = self._to_device(torch.tensor(rows)), self._to_device(torch.tensor(cols))
        ids = table[r, c]
        if self.on_trim is not None:  # only real pages (a place put_pages left empty holds -1)
            held = ids >= 0
            self.on_trim(layer, r[held], c[held], ids[held])
        self._release(ids)
        table[r, c] = -1
        self._listed[layer] = None
        return len(rows)

    def clear(self) -> None:
        for layer, table in enumerate(self.tables):
            self._release(table[table >= 0])
            self.tables[layer] = table[:, :0]
            self.num_tokens[layer] = 0
            self._low[layer] = [0] * self.num_kv_heads
            self._listed[layer] = None
            self._ragged[layer] = False

    # ---- reads -------------------------------------------------------------------------------------

    def listing(self, layer: int) -> Listing:
        """The layer's page lists for the kernels: listed pages first, ascending by position. Until a
        page is added or dropped only the lengths change (every row's last page takes the new tokens):
        a decode step then costs one addition here instead of a sort."""
        n_tok = self.num_tokens[layer]
        last = self._listed[layer]
        if last is not None:
            return last[1] if last[0] == n_tok else replace(last[1], seq_lens=last[1].seq_lens + (n_tok - last[0]))
        lst = self._list(layer)
        self._listed[layer] = (n_tok, lst)
        return lst

    def _list(self, layer: int) -> Listing:
        table = self.tables[layer]
        sink, window = self._heads[layer]
        n_tok = self.num_tokens[layer]
        valid = table >= 0
        n_pages = valid.sum(1)
        if table.shape[1] == 0:
            empty = torch.zeros(self.rows, 1, dtype=torch.int32, device=self.device)
            return Listing(empty, empty, torch.zeros(self.rows, dtype=torch.int32, device=self.device), sink, window)
        # the last column holds the newest position and is never dropped, so each row's list ends
        # with the only partial page
        # every column stays in the list's width (rows list their pages first, the rest is never
        # read past seq_lens): cutting it to the longest row would read that length on the host
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
        page_table = table.gather(1, order).clamp_min(0).to(torch.int32)
        page_pos = (order * self.page_tokens).to(torch.int32)
        tail = n_tok - (table.shape[1] - 1) * self.page_tokens  # tokens in the last column
        seq_lens = ((n_pages - 1) * self.page_tokens + tail).clamp_min(0).to(torch.int32)
        return Listing(page_table.contiguous(), page_pos.contiguous(), seq_lens, sink, window)

    def read(self, layer: int, positions: torch.Tensor, rows: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``k, v [R, A, D]`` at ``positions`` (every page must be present)."""
        rows = torch.arange(self.rows, device=self.device) if rows is None else rows.to(self.device)
        positions = positions.to(self.device)
        table = self.tables[layer]
        page = table[rows][:, positions // self.page_tokens]
        if bool((page < 0).any()):
            raise ValueError(f"layer {layer}: some of the positions asked for are not held (dropped or never written)")
        flat = (page * self.page_tokens + (positions % self.page_tokens)[None, :]).reshape(-1)
        d = self.head_dim
        shape = (rows.numel(), positions.numel(), d)
        return self.k.view(-1, d)[flat].view(shape), self.v.view(-1, d)[flat].view(shape)

    def held_tokens(self, layer: int) -> torch.Tensor:
        """``[rows]`` tokens each row holds in pages (for accounting and tests)."""
        table = self.tables[layer]
        return (table >= 0).sum(1) * self.page_tokens


__all__ = ["Listing", "PagePool"]
