"""Putting the local heads' full KV back into a page pool (the Lil guard's restore).

Under a head map the pool keeps only each local head's sink and window pages; ``trim`` frees the
rest. To continue *exact* from some point, every position's local-head KV must come back, bit for
bit as it was computed. Two sources, chosen so that host memory holds only what nothing else holds:

- **the daemon**, for the prompt's leading whole chunks it holds as prefix entries (stored or loaded
  by this request: every head's KV as computed, ``KvdCache.store_prefix``). Restore leases only
  their ``local`` extents (``open_lease(..., classes=["local"], exact=True)``: every local window
  group, cold ones promoted back; the global heads' are in the
  pool already) and copies the local rows out.
- **a host stash** (``TrimStash``) of every page ``trim`` frees past those chunks: the prompt's tail
  and every generated token, copied once per page (device to host) as the pool drops it. With no
  daemon, or with ``keep_prompt``, the stash keeps the prompt's pages too.

Why not recompute: the KV to restore is the KV the head-aware decode computed (the hidden states
under the map), and a recompute (one prefill over prompt + generated tokens) would sum in another
order than the token-by-token decode and give other bits. Restoring the stored bytes makes "after
restore, the continuation equals a decode that kept full KV from that point" exact, not approximate.

A restore that cannot find every page (an entry evicted since it was stored, lossy bytes, a daemon
fault) changes nothing and returns a reason: the guard then stops instead (never a half-restored
pool, which would be silently wrong attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvd.connectors.hf.pool import PagePool
from kvd.core.headmap import HeadMap


@dataclass(slots=True)
class TrimStash:
    """Host copies of the pages ``PagePool.trim`` frees at positions ``>= keep_from``."""

    keep_from: int = 0  # positions before this are restorable from the daemon (whole chunks)
    pages: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    nbytes: int = 0

    def attach(self, pool: PagePool) -> None:
        def keep(layer: int, rows: torch.Tensor, cols: torch.Tensor, ids: torch.Tensor) -> None:
            sel = cols * pool.page_tokens >= self.keep_from
            if not bool(sel.any()):
                return
            rows, cols, ids = rows[sel], cols[sel], ids[sel]
            k, v = pool.k[ids].to("cpu", copy=True), pool.v[ids].to("cpu", copy=True)
            self.pages.setdefault(layer, []).append((rows.cpu(), cols.cpu(), k, v))
            self.nbytes += 2 * k.numel() * k.element_size()

        pool.on_trim = keep

    def forget_below(self, position: int, page_tokens: int) -> None:
        """Drop stashed pages before ``position`` (now held by the daemon) and keep none there again."""
        self.keep_from = max(self.keep_from, position)
        for layer, parts in self.pages.items():
            kept = []
            for rows, cols, k, v in parts:
                sel = cols * page_tokens >= self.keep_from
                if bool(sel.all()):
                    kept.append((rows, cols, k, v))
                elif bool(sel.any()):
                    kept.append((rows[sel], cols[sel], k[sel], v[sel]))
                self.nbytes -= 2 * (k.numel() - int(sel.sum()) * k[0].numel()) * k.element_size()
            self.pages[layer] = kept


def daemon_restores(keep_prompt: bool, chunk_tokens: int, page_tokens: int) -> bool:
    """Whether a restore leases the prompt's whole chunks back from the daemon (pages within chunks,
    ``keep_prompt`` off). Otherwise the stash keeps every page trimmed, the prompt's too, so a prefix
    load must bring every local row (an exact read): a head-aware lease copies only what the map reads
    from the load's end and leaves the other rows zero, which a restore would put back."""
    return not keep_prompt and chunk_tokens % page_tokens == 0


@dataclass(slots=True, frozen=True)
class Restored:
    from_daemon: int  # positions whose local-head KV came from daemon prefix entries
    from_stash: int  # pages put back from the host stash (all layers and heads)


def _daemon_part(handle, token_ids: list[int], tokens: int) -> torch.Tensor | str:
    """``kv [L, 2, H, tokens, D]`` whose local rows hold the daemon's bytes, or why not."""
    from kvd.client.transfer import open_lease
    from kvd.core.errors import KvdError

    c = handle.chunk_tokens
    n = tokens // c
    s = handle.spec
    try:
        hashes = handle.hashes(token_ids[:tokens])
        with open_lease(handle, hashes, classes=["local"], min_tokens=[c] * n, exact=True) as lease:
            if lease.num_leading < n:
                return f"the daemon holds {lease.num_leading} of the prompt's {n} chunks ({lease.states})"
            kv = torch.zeros(s.num_layers, 2, s.num_kv_heads, tokens, s.head_dim, dtype=getattr(torch, s.kv_dtype))
            for i in range(n):
                lease.entry(i).read_into(kv, i * c, c)
    except KvdError as e:
        return f"the daemon failed: {e}"
    return kv


def _missing(pool: PagePool, head_map: HeadMap, tokens: int, daemon_tokens: int,
             stash: TrimStash) -> str | None:
    """Why the restore would leave a hole, or None: every local page before ``tokens`` must be in the
    pool, in the daemon's range, or in the stash."""
    n_cols = -(-tokens // pool.page_tokens)
    for layer in range(head_map.num_layers):
        have = pool.tables[layer][:, :n_cols] >= 0
        have[:, : daemon_tokens // pool.page_tokens] = True
        for rows, cols, _, _ in stash.pages.get(layer, []):
            have[rows.to(have.device), cols.to(have.device)] = True
        if not bool(have.all()):
            row, col = (~have).nonzero()[0].tolist()
            return f"layer {layer}, KV head {row}: positions {col * pool.page_tokens}.. are in neither the " \
                   "daemon nor the host stash"
    return None


def restore_full_kv(pool: PagePool, stash: TrimStash, *, handle=None, token_ids: list[int] | None = None,
                    ) -> Restored | str:
    """Put every local head's trimmed pages back and widen the pool to every head global.

    Positions ``[0, stash.keep_from)`` come from the daemon's prefix entries of ``token_ids`` (through
    ``handle``), the rest from the stash. Returns what was restored, or a reason when something is
    missing; then the pool is left exactly as it was."""
    head_map = pool.head_map
    tokens = pool.num_tokens[0]
    daemon_tokens = stash.keep_from if tokens > stash.keep_from else 0
    if pool.batch_size != 1:
        return "restore needs a pool of one request"
    kv = None
    if daemon_tokens:
        if handle is None or token_ids is None:
            return "positions before the stash are in the daemon, but no daemon handle was given"
        kv = _daemon_part(handle, token_ids, daemon_tokens)
        if isinstance(kv, str):
            return kv
    hole = _missing(pool, head_map, tokens, daemon_tokens, stash)
    if hole is not None:
        return hole
    pages = 0
    for layer in range(head_map.num_layers):
        local = head_map.local_heads(layer)
        if kv is not None and local:
            rows = torch.tensor(local, dtype=torch.long)
            cols = torch.arange(daemon_tokens // pool.page_tokens)
            held = pool.tables[layer][rows.to(pool.device)][:, cols.to(pool.device)] >= 0
            r_idx, c_idx = (~held).nonzero(as_tuple=True)
            r, c = rows[r_idx.cpu()], cols[c_idx.cpu()]
            k = kv[layer, 0].unflatten(1, (-1, pool.page_tokens))[r, c]
            v = kv[layer, 1].unflatten(1, (-1, pool.page_tokens))[r, c]
            pool.put_pages(layer, r, c, k, v)
        for rows, cols, k, v in stash.pages.get(layer, []):
            pool.put_pages(layer, rows, cols, k, v)
            pages += rows.numel()
    pool.widen(HeadMap.all_global(head_map.model, head_map.num_layers, head_map.num_kv_heads))
    stash.pages.clear()
    stash.nbytes = 0
    return Restored(from_daemon=daemon_tokens, from_stash=pages)


__all__ = ["Restored", "TrimStash", "daemon_restores", "restore_full_kv"]
