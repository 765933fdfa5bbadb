"""Head-aware attention for transformers models: a head map applied as per-KV-head masks, in fp32.

This is the **reference semantics** of a head map, the one the page-pool adapter
(``kvd.connectors.hf``) must reproduce: for a query at position ``i`` (absolute, 0-based) and a key
at position ``j ≤ i``,

- a *global* KV head sees every key: ``j ≤ i``;
- a *local* KV head with ``sink`` and ``window`` sees ``j < sink`` or ``i - window < j ≤ i``
  (example: sink 4, window 256, i = 1000 → keys 0..3 and 745..1000).

All query heads of a GQA group use their KV head's rule. The KV itself is kept whole (this module
only masks), so it measures what dropping the masked KV would do without implementing the dropping.

Use::

    with apply_head_map(model, head_map):       # sets the attention implementation and the masks
        logits = model(input_ids).logits        # or model.generate(...)

Lifecycle: ``apply_head_map`` writes each layer's grids (``HeadMap.sinks[layer]``,
``HeadMap.windows[layer]``; window 0 = global) onto its attention module (``module.kvd_heads``) and
switches ``model`` to the ``"kvd_headmap"`` implementation through
``kvd.connectors.hf.attention_switch``; on exit it restores the previous implementation and removes
the grids. Layers whose heads are all global run transformers' own sdpa function unchanged
(bit-identical to the plain model).

The switch also registers the name with ``AttentionMaskInterface``: without that, transformers hands
a custom attention function ``attention_mask=None`` and a second forward over an existing cache would
silently lose its causal offset (ENGINES.md §3.3). Positions are taken as
``kv_len - q_len + arange(q_len)``: the cache holds keys 0..kv_len-1 contiguously (DynamicCache).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from kvd.connectors.hf.attention_switch import attention_implementation
from kvd.core.headmap import HeadMap

ATTN_NAME = "kvd_headmap"
# Query rows per sdpa call: bounds the [heads, q, kv] mask and score memory at long contexts
# (8K tokens: 9 heads x 1024 x 8192 fp32 = 300 MB per chunk instead of 2.4 GB).
QUERY_CHUNK = 1024
# A global head is a local head whose window can never end: sink 0, window larger than any context.
_UNBOUNDED = 1 << 40


def visibility_mask(sink: Sequence[int], window: Sequence[int], q_pos: torch.Tensor, kv_len: int,
                    n_rep: int) -> torch.Tensor:
    """Bool mask ``[num_q_heads, q, kv_len]``: True where query head ``h`` at ``q_pos`` sees the key.

    ``sink``/``window`` have one entry per KV head (a row of ``HeadMap.sinks``/``windows``; window 0 =
    global); query head ``h`` uses KV head ``h // n_rep`` (the order of transformers' ``repeat_kv``).
    ``q_pos``: ``[q]`` absolute positions.
    """
    dev = q_pos.device
    sink_q = torch.tensor([s if w > 0 else 0 for s, w in zip(sink, window, strict=True) for _ in range(n_rep)],
                          device=dev)
    window_q = torch.tensor([w if w > 0 else _UNBOUNDED for w in window for _ in range(n_rep)], device=dev)
    k = torch.arange(kv_len, device=dev)
    qp = q_pos[:, None]
    causal = k[None, :] <= qp  # [q, kv]
    inside = (k[None, None, :] < sink_q[:, None, None]) | (k[None, None, :] > (qp[None] - window_q[:, None, None]))
    return causal[None] & inside


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, kv_heads, T, D]`` → ``[B, kv_heads * n_rep, T, D]`` (each KV head repeated in place)."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def masked_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sink: Sequence[int],
                window: Sequence[int], *, scaling: float | None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``query [B, Hq, q, D]`` over ``key``/``value [B, Hkv, kv, D]``, KV head h seeing
    ``[0, sink[h]) ∪ (i - window[h], i]`` (everything up to i where ``window[h] == 0``).

    Returns ``[B, q, Hq, D]``. ``attention_mask`` (bool ``[B, 1, q, kv]``, True = visible) is
    AND-ed in (padding). Computed per query chunk with torch's sdpa in the input dtype (fp32 here).
    """
    _, num_q_heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    n_rep = num_q_heads // key.shape[1]
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
    outs = []
    for start in range(0, q_len, QUERY_CHUNK):
        stop = min(q_len, start + QUERY_CHUNK)
        mask = visibility_mask(sink, window, q_pos[start:stop], kv_len, n_rep)[None]
        if attention_mask is not None:
            am = attention_mask[:, :, start:stop, -kv_len:]
            mask = mask & (am if am.dtype == torch.bool else am == 0)
        outs.append(F.scaled_dot_product_attention(query[:, :, start:stop], k, v, attn_mask=mask,
                                                   scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def structured_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sink: Sequence[int],
                    window: Sequence[int], *, scaling: float | None, block: int = QUERY_CHUNK) -> torch.Tensor:
    """``masked_sdpa`` of a whole sequence (``q_len == kv_len``, no padding) at the cost of what each
    head sees: global heads run causal sdpa without a mask (flash on the CPU too, upper triangle
    skipped); local heads run per block of ``block`` queries over their sink and the keys their window
    reaches, so a window of ``w`` costs ``T x (block + w)`` instead of ``T x T``. Same visibility as
    ``masked_sdpa``, so the same result up to fp32 summation order (tested); differentiable. The KL
    probe uses it: at 8K tokens it is what makes profiling fit a CPU (docs/headmaps.md).

    Returns ``[B, q, Hq, D]``."""
    _, num_q_heads, seq_len, _ = query.shape
    nkv = key.shape[1]
    n_rep = num_q_heads // nkv
    dev = query.device
    groups: dict[tuple[int, int], list[int]] = {}
    for h, (s, w) in enumerate(zip(sink, window, strict=True)):
        groups.setdefault((int(s) if w else 0, int(w)), []).append(h)
    parts: dict[int, torch.Tensor] = {}
    for (s, w), heads in groups.items():
        qh = query[:, [h * n_rep + i for h in heads for i in range(n_rep)]]
        kh, vh = _repeat_kv(key[:, heads], n_rep), _repeat_kv(value[:, heads], n_rep)
        if w == 0:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scaling)
        else:
            blocks = []
            for b0 in range(0, seq_len, block):
                b1 = min(seq_len, b0 + block)
                lo = max(s, b0 - w + 1)
                keys = torch.cat([torch.arange(min(s, b1), device=dev), torch.arange(lo, b1, device=dev)])
                qp = torch.arange(b0, b1, device=dev)[:, None]
                mask = (keys[None, :] <= qp) & ((keys[None, :] < s) | (keys[None, :] > qp - w))
                blocks.append(F.scaled_dot_product_attention(qh[:, :, b0:b1], kh[:, :, keys], vh[:, :, keys],
                                                             attn_mask=mask, scale=scaling))
            o = torch.cat(blocks, dim=2)
        for j, h in enumerate(heads):
            parts[h] = o[:, j * n_rep:(j + 1) * n_rep]
    return torch.cat([parts[h] for h in range(nkv)], dim=1).transpose(1, 2).contiguous()


def headmap_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The ``AttentionInterface`` function. Returns ``(out [B, q, Hq, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    heads = getattr(module, "kvd_heads", None)  # (sinks, windows) of this layer
    if heads is None or not any(heads[1]):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    sink, window = heads
    if attention_mask is None and query.shape[2] == key.shape[2]:  # a whole sequence, no padding
        return structured_sdpa(query, key, value, sink, window, scaling=scaling), None
    return masked_sdpa(query, key, value, sink, window, scaling=scaling, attention_mask=attention_mask), None


@contextlib.contextmanager
def apply_head_map(model: torch.nn.Module, head_map: HeadMap) -> Iterator[None]:
    """Run ``model`` with ``head_map`` applied as masks; raises ``HeadMapError`` if it does not fit."""
    cfg = model.config
    head_map.check_fits(cfg.num_hidden_layers, cfg.num_key_value_heads, model=head_map.model)
    grids = list(zip(head_map.sinks, head_map.windows, strict=True))
    with attention_implementation(model, ATTN_NAME, headmap_attention, layer_attr="kvd_heads", layer_values=grids):
        yield
