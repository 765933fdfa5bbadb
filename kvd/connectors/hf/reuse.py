"""Chunk reuse with head-level recovery for Llama-family transformers models (issue 7): one request.

``reuse_request`` serves a request given as segments (``kvd.reuse.plan``): it looks up the reusable
segments' chunk entries (``kvd.reuse.chunks``; a missing one is computed on its own at ``[0, n)``
and stored), copies them into one assembled context, RoPE-shifts their keys to their new positions
with kvd's kernel (``kvd.gpu_kernels.rope_shift``), and runs one forward over the context with the
method's rules (``kvd.connectors.hf.prefill.prefill``), leaving the KV in the cache's page pool, ready for decoding
through the adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvd.connectors.hf.attention import use_triton
from kvd.connectors.hf.pool import PagePool
from kvd.connectors.hf.prefill import model_inv_freq, prefill
from kvd.core.headmap import HeadMap
from kvd.reuse.chunks import ChunkStore
from kvd.reuse.plan import Assembly, ReuseConfig, Segment, assemble

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ReuseResult:
    input_ids: torch.Tensor  # [1, S] the assembled context
    logits: torch.Tensor | None  # [1, vocab] next-token logits after the last computed token
    num_cached_tokens: int  # tokens that came with chunk KV
    chunks_hit: int  # reusable segments found in the chunk store
    chunks_computed: int  # chunk entries computed now (and stored): once per distinct segment
    active_fraction: float  # hidden states computed / (tokens x layers)
    ffn_fraction: float  # FFN rows run / (tokens x layers)



# ---- cached KV ------------------------------------------------------------------------------------


def assemble_cached(asm: Assembly, chunk_kv: Sequence[torch.Tensor | None], inv_freq: torch.Tensor, *,
                    num_layers: int, num_kv_heads: int, head_dim: int, dtype, device) -> torch.Tensor:
    """``[2, L, Hkv, S, D]``: each reused segment's chunk KV at its place, keys rotated by its offset.

    ``chunk_kv[i]`` is segment i's entry ``[L, 2, Hkv, n, D]`` (None if not reused); positions of
    other segments stay zero. One RoPE-shift launch rotates every layer and head (per-token deltas).
    """
    S = asm.num_tokens
    out = torch.zeros(2, num_layers, num_kv_heads, S, head_dim, dtype=dtype, device=device)
    delta = torch.zeros(S, dtype=torch.int32, device=device)
    for off, n, kv in zip(asm.offsets, asm.lengths, chunk_kv):
        if kv is None:
            continue
        out[:, :, :, off : off + n].copy_(kv.transpose(0, 1), non_blocking=True)
        delta[off : off + n] = off
    if bool(asm.reused.any()):
        from kvd.gpu_kernels import rope_shift, rope_shift_ref

        keys = out[0].view(num_layers * num_kv_heads, S, head_dim).transpose(0, 1)  # [S, L*H, D]
        shift = rope_shift if use_triton(keys) else rope_shift_ref
        shift(keys, inv_freq.to(device), delta)
    return out


# ---- a whole request ----------------------------------------------------------------------------


def chunk_key(segment: Segment, *, namespace: str, fingerprint: str) -> str:
    from kvd.core.keys import content_hash

    return content_hash(list(segment.token_ids), namespace=namespace, fingerprint=fingerprint)


def compute_chunk(model, segment: Segment) -> torch.Tensor:
    """A segment's chunk entry: its KV computed on its own at ``[0, n)``, ``[L, 2, Hkv, n, D]``."""
    cfg = model.config
    head_map = HeadMap.all_global("chunk", cfg.num_hidden_layers, cfg.num_key_value_heads)
    asm = assemble([segment], [False])
    return prefill(model, asm, None, ReuseConfig("recompute"), head_map, None, compute_logits=False,
                   collect_kv=True).kv


def load_chunks(model, segments: Sequence[Segment], store: ChunkStore, *, namespace: str, fingerprint: str,
                classes: Sequence[str] | None = None) -> tuple[list[torch.Tensor | None], int, int]:
    """Chunk KV per segment (None for segments not reusable), computing and storing misses.

    Returns ``(kv per segment, hits, computed)``: hits count the segments whose entry the store had,
    computed the entries computed now (a segment repeated in the request is computed once). A miss is
    computed on its own and used as cached in this request too, so a request's result does not depend
    on what was cached before it.
    """
    device = model.model.embed_tokens.weight.device
    keys = {i: chunk_key(s, namespace=namespace, fingerprint=fingerprint) for i, s in enumerate(segments) if s.reusable}
    found = store.get(list(dict.fromkeys(keys.values())), classes=classes, device=device)
    stored = set(found)  # a segment repeated in the request is a hit only if the store had it
    out: list[torch.Tensor | None] = [None] * len(segments)
    hits = computed = 0
    for i, key in keys.items():
        kv = found.get(key)
        if kv is None:
            kv = compute_chunk(model, segments[i])
            store.put(key, kv)
            found[key] = kv
            computed += 1
        hits += key in stored
        out[i] = kv
    return out, hits, computed


def reuse_request(model, segments: Sequence[Segment], cfg: ReuseConfig, pool: PagePool, store: ChunkStore, *,
                  namespace: str, fingerprint: str, leave_last: bool = False, attention: str = "paged") -> ReuseResult:
    """Serve ``segments`` with ``cfg`` into ``pool`` (empty); see the module docstring.

    ``leave_last``: keep the final token out of the prefill, so that ``model.generate`` (which needs
    one uncached token) computes it and continues; then ``logits`` is None.
    """
    if not isinstance(segments, Sequence) or not all(isinstance(s, Segment) for s in segments):
        raise TypeError(f"a reuse request is a list of Segment (kvd.reuse.plan), not {type(segments).__name__}")
    vocab = model.model.embed_tokens.num_embeddings
    bad = next((t for s in segments for t in s.token_ids if not 0 <= t < vocab), None)
    if bad is not None:  # (a GPU embedding would assert on the device)
        raise ValueError(f"token id {bad} is outside the model's {vocab} embeddings")
    if not segments or segments[-1].reusable:
        raise ValueError("a reuse request must end with a segment that is not reusable (the question)")
    if any(n for n in pool.num_tokens):
        raise ValueError("reuse needs an empty cache; take a fresh one (cache.fresh())")
    segs = list(segments)
    if leave_last:
        last = segs[-1].token_ids
        if len(last) == 1 and len(segs) == 1:
            raise ValueError("nothing to prefill: the request is one token")
        segs = segs[:-1] + ([Segment(last[:-1])] if len(last) > 1 else [])
    head_map = pool.head_map
    chunk_kv, hits, computed = [None] * len(segs), 0, 0
    if cfg.reads_cache:
        classes = None if head_map.is_all_global else cfg.cache_classes
        chunk_kv, hits, computed = load_chunks(model, segs, store, namespace=namespace, fingerprint=fingerprint,
                                               classes=classes)
    asm = assemble(segs, [kv is not None for kv in chunk_kv])
    mc = model.config
    cached = None
    if cfg.reads_cache:
        cached = assemble_cached(asm, chunk_kv, model_inv_freq(model), num_layers=mc.num_hidden_layers,
                                 num_kv_heads=mc.num_key_value_heads, head_dim=pool.head_dim, dtype=pool.dtype,
                                 device=pool.device)
    res = prefill(model, asm, cached, cfg, head_map, pool, compute_logits=not leave_last, attention=attention)
    full = torch.tensor([t for s in segments for t in s.token_ids], dtype=torch.long, device=pool.device)[None]
    S, L = asm.num_tokens, mc.num_hidden_layers
    return ReuseResult(
        input_ids=full, logits=None if res.logits is None else res.logits[None],
        num_cached_tokens=int(asm.reused.sum()), chunks_hit=hits, chunks_computed=computed,
        active_fraction=sum(res.active_tokens) / (S * L), ffn_fraction=sum(res.ffn_tokens) / (S * L))


__all__ = ["ReuseResult", "assemble_cached", "chunk_key", "compute_chunk", "load_chunks", "reuse_request"]
