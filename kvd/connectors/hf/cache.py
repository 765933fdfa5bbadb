"""The transformers adapter: kvd underneath ``model.generate`` for Llama-family models.

``attach(model, head_map=..., client=None)`` registers kvd's attention (``"kvd"``, see
``kvd.connectors.hf.attention``), switches the model to it (``attention_switch``), and returns a
``KvdCache`` to pass to ``generate`` (``past_key_values=cache``; transformers >= 5.24 also names it
``cache=``). Underneath:

- **KV lives in kvd's page pool** (``kvd.connectors.hf.pool``): per (layer, KV head) page lists, on
  the model's device. Attention reads them through SegPagedAttention (Triton on a GPU, the torch
  references on the CPU). Local heads keep only their sink and window pages (prefix KV compression);
  global heads keep everything. With an all-global map the model computes what plain transformers
  computes.
- **Prefix entries** (with ``client``): before the first forward of a request, the longest stored
  prefix of whole chunks is loaded from the daemon into the pool and only the rest of the prompt is
  computed (``generate`` then sees shorter logits, of which it uses the last); after a prefill, the
  prompt's new whole chunks are stored. Both are best-effort: a daemon fault logs a warning and the
  model computes as if nothing were cached. Stored entries hold every head's KV as computed (the
  daemon's placement decides what stays hot); one request per cache (batch 1) on this path.
- **The Lil guard** (``guard=GuardConfig()``, with a head map): watches the generated tokens and, when
  they start to loop, restores the local heads' full KV and decodes exact from there, or stops early
  (``kvd.connectors.hf.guard``); ``cache.guard.stats`` counts trips, restores and tokens per mode.
- **Chunk reuse** (issue 7): ``cache.reuse(segments, method="kvd")`` prefills a request given as
  segments, reusing the reusable ones' chunk entries at their new positions with head-level recovery
  (``kvd.connectors.hf.reuse``).

Lifecycle: one ``KvdCache`` serves one request (a batch of equal-length prompts without padding);
``cache.fresh()`` gives an empty cache with the same model, head map, daemon handle and chunk store.
``detach(model)`` removes the hooks and restores the previous attention implementation.

Example (more in docs/transformers.md and docs/chunk_reuse.md)::

    cache = attach(model, head_map=HeadMap.load("config/heads/smollm2-135m.json"), client=KvdClient())
    out = model.generate(ids, past_key_values=cache, max_new_tokens=32)
    res = cache.fresh().reuse([Segment(system), Segment(doc, reusable=True), Segment(question)])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvd.client import prefix as kvio
from kvd.connectors.hf import attention as hf_attention
from kvd.connectors.hf import attention_switch
from kvd.connectors.hf.guard import GuardConfig, LilGuard
from kvd.connectors.hf.pool import PagePool
from kvd.connectors.hf.restore import TrimStash, daemon_restores, restore_full_kv
from kvd.connectors.hf.reuse import ReuseResult, reuse_request
from kvd.connectors.hf.spec import check_supported, head_map_for, model_spec
from kvd.core.errors import KvdError
from kvd.core.headmap import HeadMap
from kvd.core.keys import EXACT, attention_tag
from kvd.reuse.chunks import ChunkStore, DaemonChunkStore, LocalChunkStore
from kvd.reuse.plan import ReuseConfig, Segment, SparseFfn

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Attachment:
    """What every cache of one ``attach`` shares."""

    model: Any
    head_map: HeadMap
    fingerprint: str
    namespace: str
    chunk_store: ChunkStore
    handle: Any = None  # kvd.client.prefix.ModelHandle when a daemon is configured
    page_tokens: int = 16
    guard: GuardConfig | None = None  # the Lil guard of head-aware decoding (kvd.connectors.hf.guard)
    exact: Attachment | None = None  # every head global, an exact reader: the guard's rerun (action="rerun")
    warned: set[str] = field(default_factory=set)

    def warn_once(self, what: str, msg: str, *args) -> None:
        if what not in self.warned:
            self.warned.add(what)
            logger.warning(msg, *args)


class KvdCacheLayer(CacheLayerMixin):
    """One layer's view of the cache's pool; ``update`` appends to it and tags the key for attention."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, cache: KvdCache, layer_idx: int) -> None:
        super().__init__()
        self._cache = cache
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hkv, q, D]`` (post-RoPE) at the end of this layer's rows; return them tagged."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, q, D = key_states.shape
        pool = self._cache.ensure_pool(batch_size=B, dtype=key_states.dtype, device=key_states.device)
        k = key_states.reshape(B * H, q, D)
        v = value_states.reshape(B * H, q, D)
        start = pool.append(self.layer_idx, k, v)
        if self._cache.stash is not None:
            self._cache.stash[self.layer_idx] = (start, k, v)
        key_states.kvd_view = (pool, self.layer_idx, start)
        return key_states, value_states

    def get_seq_length(self) -> int:
        pool = self._cache.pool
        return 0 if pool is None else pool.num_tokens[self.layer_idx]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self._cache.pool is not None:
            self._cache.pool.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("kvd's cache does not support beam search; use greedy or sampling")


class KvdCache(Cache):
    """A transformers ``Cache`` whose KV lives in kvd's page pool (see the module docstring)."""

    def __init__(self, attachment: Attachment) -> None:
        self.att = attachment
        num_layers = attachment.head_map.num_layers
        super().__init__(layers=[KvdCacheLayer(self, i) for i in range(num_layers)])
        self.pool: PagePool | None = None
        self.token_ids: list[int] = []  # tokens of request 0 in the cache (prefix-entry path)
        self.stored_chunks = 0  # leading whole chunks the daemon holds for this request
        self.stash: dict[int, tuple[int, torch.Tensor, torch.Tensor]] | None = None  # layer -> (start, k, v)
        # The Lil guard, when configured and the map has local heads: it watches generated tokens and may
        # restore the local heads' full KV from the daemon and the host stash of trimmed pages.
        on = attachment.guard is not None and not attachment.head_map.is_all_global
        self.guard = LilGuard(attachment.guard, self._restore_full_kv) if on else None
        self.trimmed = TrimStash() if on else None

    def fresh(self) -> KvdCache:
        """An empty cache sharing this one's model, head map, daemon handle and chunk store."""
        return KvdCache(self.att)

    def reset(self) -> None:  # transformers' Cache.reset: the pool, and the request's tokens, guard and stash
        self.__init__(self.att)  # the state of a new request, as fresh() gives it

    def exact(self) -> KvdCache:
        """An empty cache that keeps every head's full KV, with no guard: the Lil guard's rerun
        (``GuardConfig(action="rerun")``; an exact reader of the same daemon, so it loads and stores
        exact prefix entries, never this map's)."""
        if self.att.exact is None:
            raise ValueError("no exact attachment: attach with a head map and guard=GuardConfig(action='rerun')")
        return KvdCache(self.att.exact)

    def ensure_pool(self, *, batch_size: int = 1, dtype=None, device=None) -> PagePool:
        if self.pool is None:
            w = self.att.model.model.embed_tokens.weight
            cfg = self.att.model.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            self.pool = PagePool(self.att.head_map, head_dim=head_dim, dtype=dtype or w.dtype, device=device or w.device,
                                 batch_size=batch_size, page_tokens=self.att.page_tokens)
            if self.trimmed is not None:
                self.trimmed.attach(self.pool)
        elif self.pool.batch_size != batch_size:
            raise ValueError(f"this cache holds {self.pool.batch_size} requests, the input has {batch_size}; "
                             "use cache.fresh() for a new batch")
        return self.pool

    def kv_bytes(self) -> int:
        """Bytes of K and V the pool holds in pages (what prefix KV compression saves shows here)."""
        return 0 if self.pool is None else self.pool.kv_bytes()

    # ---- chunk reuse ---------------------------------------------------------------------------

    def reuse(self, segments: Sequence[Segment], *, method: str = "kvd", sparse_ffn: SparseFfn | None = None,
              leave_last: bool = False, **settings) -> ReuseResult:
        """Prefill a request given as ``segments`` into this (empty) cache, reusing chunk entries.

        ``method``: ``kvd`` (head-level recovery, the default), or a baseline (``recompute``, ``naive``,
        ``cacheblend``, ``epic``: for a cache attached with an all-global map, they attend with full KV
        only then); ``settings`` go to ``ReuseConfig``. Returns the assembled ``input_ids [1, S]`` and,
        unless ``leave_last`` (the final token is left for ``model.generate``), the next-token logits.
        """
        cfg = ReuseConfig(method=method, sparse_ffn=sparse_ffn, **settings)
        pool = self.ensure_pool()
        res = reuse_request(self.att.model, segments, cfg, pool, self.att.chunk_store,
                            namespace=self.att.namespace, fingerprint=self.att.fingerprint, leave_last=leave_last)
        self.stored_chunks = 1 << 30  # an assembled context is not a prefix to store
        self.token_ids = res.input_ids[0, : pool.num_tokens[0]].tolist()  # the guard starts at the next forward
        return res

    # ---- prefix entries (daemon) -------------------------------------------------------------

    def load_prefix(self, input_ids: torch.Tensor) -> int:
        """Load the longest stored prefix of ``input_ids [1, T]`` into the empty pool, up to all but
        its last token (which the model computes): the last stored chunk may load in part, so the same
        prompt again computes one token. Returns the tokens loaded (0 on a miss or a fault)."""
        h = self.att.handle
        if self.trimmed is not None and not daemon_restores(self.att.guard.keep_prompt, h.chunk_tokens,
                                                            self.att.page_tokens):
            h = replace(h, reader="exact")  # the stash keeps what the load trims: every row, not a map's reads
        ids = input_ids[0].tolist()
        limit = len(ids) - 1
        if len(ids) < h.chunk_tokens:  # no whole chunk: nothing can be stored for it
            return 0
        try:
            hits = min(kvio.lookup_prefix(h, ids, max_tokens=limit).num_prefix_hits, -(-limit // h.chunk_tokens))
            if hits == 0:
                return 0
            pool = self.ensure_pool()
            with kvio.load_prefix(h, ids, max_chunks=hits, max_tokens=limit) as loaded:
                n, chunks = loaded.num_tokens, loaded.num_chunks
                if n == 0:
                    return 0
                kv = loaded.to_tensor(device=pool.device)
        except KvdError as e:
            self.att.warn_once("load", "loading a prefix from kvd failed, computing it instead: %s", e)
            return 0
        positions = torch.arange(n, device=pool.device)
        for layer in range(pool.head_map.num_layers):
            pool.write(layer, kv[layer, 0], kv[layer, 1], positions)
            pool.trim(layer)
        self.token_ids = ids[:n]
        self.stored_chunks = chunks  # a chunk loaded in part is stored already
        self._daemon_holds(n)
        return n

    def store_prefix(self) -> int:
        """Store the whole chunks of this request's prompt that the last forward computed; returns the
        number of chunks newly stored (0 on a fault)."""
        h, stash, pool = self.att.handle, self.stash, self.pool
        self.stash = None
        if h is None or not stash or pool is None:
            return 0
        c = h.chunk_tokens
        n_full = len(self.token_ids) // c
        start = min(s for s, _, _ in stash.values())
        first = max(self.stored_chunks, -(-start // c))
        if first >= n_full:
            return 0
        end, s, dtype = n_full * c, h.spec, getattr(torch, h.spec.kv_dtype)
        if any(t.dtype != dtype for _, k, v in stash.values() for t in (k, v)):  # a cast after attach, autocast
            self.att.warn_once("dtype", "KV computed in %s is not stored under this model's %s fingerprint (cast "
                               "after attach? attach again)", next(iter(stash.values()))[1].dtype, dtype)
            return 0
        kv = torch.empty(s.num_layers, 2, s.num_kv_heads, end, s.head_dim, dtype=dtype)
        for layer, (st, k, v) in stash.items():
            lo = first * c
            kv[layer, 0, :, lo:end] = k[:, lo - st : end - st].cpu()
            kv[layer, 1, :, lo:end] = v[:, lo - st : end - st].cpu()
        try:
            res = kvio.store_prefix(h, self.token_ids[:end], kv, start_chunk=first)
        except KvdError as e:
            self.att.warn_once("store", "storing a prefix in kvd failed (it stays uncached): %s", e)
            return 0
        self.stored_chunks = n_full
        if res.no_space == 0:
            self._daemon_holds(end)
        return res.stored

    # ---- the Lil guard -----------------------------------------------------------------------------

    def _daemon_holds(self, tokens: int) -> None:
        """Prefix entries cover ``[0, tokens)``: the guard's stash need not keep the pages of their
        whole chunks (a restore leases those back; the last chunk of a load may be in part: not counted)."""
        c, n = self.att.handle.chunk_tokens, self.att.page_tokens
        if self.trimmed is not None and daemon_restores(self.att.guard.keep_prompt, c, n) and tokens >= c:
            self.trimmed.forget_below(tokens // c * c, n)

    def _restore_full_kv(self) -> str | None:
        res = restore_full_kv(self.pool, self.trimmed, handle=self.att.handle, token_ids=self.token_ids)
        if isinstance(res, str):
            return res
        self.pool.on_trim = None
        self.guard.stats.restored_from_daemon, self.guard.stats.restored_from_stash = res.from_daemon, res.from_stash
        return None


# ---- forward hooks: what makes generate() load and store prefixes ---------------------------------


def _pre_forward(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, KvdCache) or (cache.att.handle is None and cache.guard is None):
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None or ids.shape[0] != 1:
        if ids is not None:
            cache.att.warn_once("batch", "kvd prefix entries and the Lil guard work for batch size 1 only")
        return None
    first = cache.get_seq_length() == 0 and not cache.token_ids
    if first and cache.att.handle is not None:
        n = cache.load_prefix(ids)
        if n:
            kwargs = dict(kwargs)
            args = ()
            kwargs["input_ids"] = ids[:, n:]
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"][:, n:]
            ids = ids[:, n:]
    cache.token_ids.extend(ids[0].tolist())
    cache.stash = {} if ids.shape[1] > 1 and cache.att.handle is not None else None
    if cache.guard is not None:
        if first or cache.guard.prompt_tokens is None:  # (after cache.reuse the cache is not empty)
            cache.guard.start(len(cache.token_ids))
        else:
            cache.guard.see(cache.token_ids)  # may restore full KV before this forward runs
            cache.guard.count(ids.shape[1])
    return args, kwargs


def _post_forward(module, args, kwargs, output):
    cache = kwargs.get("past_key_values")
    if isinstance(cache, KvdCache) and cache.stash is not None:
        cache.store_prefix()
    return None


# ---- attach / detach ---------------------------------------------------------------------------------


def attach(model, head_map=None, client=None, *, namespace: str = "default", page_tokens: int = 16,
           chunk_store: ChunkStore | None = None, model_id: str | None = None,
           guard: GuardConfig | None = None) -> KvdCache:
    """Put kvd under ``model`` (a transformers Llama-family causal LM); return an empty ``KvdCache``.

    Args:
        head_map: a ``kvd.core.headmap.HeadMap`` for this model (None: every head global, plain offloading).
        client: a ``KvdClient``; registers the model with the daemon, enabling prefix entries and
            daemon-held chunk entries. None: no daemon; chunk entries are kept in this process.
        namespace: tenant / cache salt of every key. page_tokens: tokens per pool page.
        chunk_store: where chunk entries live (default: the daemon with a client, else in process).
        model_id: names the weights in the fingerprint; default: the content identity of the model's
            files (``kvd.connectors.hf.spec``), the one vLLM's and SGLang's connectors derive too.
        guard: the Lil guard of head-aware decoding (``GuardConfig()``: restore full KV when output
            starts to loop); None: off. Only with a head map that has local heads.
    Raises ``HeadMapError`` if the head map does not fit the model, ``ConfigError`` if its attention is
    not supported (``spec.check_supported``) or it cannot be identified without a ``model_id`` (PEFT).
    """
    check_supported(model)
    spec = model_spec(model, model_id=model_id)
    att = _attachment(model, spec, head_map, client, namespace, page_tokens, chunk_store, guard)
    if guard is not None and guard.action == "rerun" and not att.head_map.is_all_global:
        # The guard's rerun decodes again with every head global: an exact reader of the same daemon.
        att.exact = _attachment(model, spec, None, client, namespace, page_tokens, None, None, layout=att.head_map)
    previous = attention_switch.attach(model, hf_attention.ATTN_NAME, hf_attention.kvd_attention)
    if getattr(model, "_kvd_hooks", None) is None:  # attached again: keep what the first attach replaced
        model._kvd_hooks = (model.register_forward_pre_hook(_pre_forward, with_kwargs=True),
                            model.register_forward_hook(_post_forward, with_kwargs=True), previous)
    return KvdCache(att)


def _attachment(model, spec, head_map: HeadMap | None, client, namespace: str, page_tokens: int,
                chunk_store: ChunkStore | None, guard: GuardConfig | None, *,
                layout: HeadMap | None = None) -> Attachment:
    """``layout``: an exact cache's (``head_map`` None) registration keeps the daemon's map of the model."""
    cfg = model.config
    head_map = head_map_for(head_map, spec) if head_map is not None else None  # or HeadMapError
    pool_map = head_map or HeadMap.all_global(spec.model_id, cfg.num_hidden_layers, cfg.num_key_value_heads)
    pool_map.check_fits(cfg.num_hidden_layers, cfg.num_key_value_heads, model=spec.model_id)
    # KV computed under a head map is not exact KV from the second layer on: it is keyed (and offered)
    # only to readers of the same map, never to an exact reader such as vLLM on the same model.
    computed_under = EXACT if pool_map.is_all_global else attention_tag(pool_map.sinks, pool_map.windows)
    handle = None
    if client is not None:
        try:
            handle = kvio.register(client, spec, layout or head_map, namespace=namespace,
                                   computed_under=computed_under,
                                   reader="exact" if layout else "head_aware")  # loads move only what the map reads
        except KvdError as e:
            logger.warning("kvd daemon unavailable, running without it: %s", e)
    if chunk_store is None:
        chunk_store = DaemonChunkStore(handle) if handle is not None else LocalChunkStore()
    fingerprint = handle.fingerprint if handle is not None else spec.fingerprint()
    return Attachment(model, pool_map, fingerprint, namespace, chunk_store, handle, page_tokens, guard)


def detach(model) -> None:
    """Undo ``attach``: remove the hooks and restore the previous attention implementation."""
    hooks = getattr(model, "_kvd_hooks", None)
    if hooks is None:
        return
    pre, post, previous = hooks
    pre.remove()
    post.remove()
    attention_switch.detach(model, previous)
    del model._kvd_hooks


__all__ = ["Attachment", "GuardConfig", "KvdCache", "ReuseConfig", "Segment", "SparseFfn", "attach", "detach"]
