"""Attention-statistics scores of every (layer, KV head): the RedKnot-style signals.

- **edge mass**: share of a head's attention that falls outside ``sink ∪ recent window``, averaged
  over the query positions where that region is not the whole context (``i ≥ sink + window``);
- **prefix shift**: ``1 − cosine`` of the head's attention rows over one chunk, the chunk placed
  behind two different prefixes of equal token length (rows restricted to the chunk's own keys,
  cosine per query row, averaged over rows).

Query-head values are reduced to their KV head by ``max`` (a KV head must serve its most demanding
query head). Both are computed with an explicit-softmax ("eager") probe attention, run under
``torch.no_grad`` in the model's dtype, one query chunk at a time to bound memory.

Lifecycle: the probe state lives on each attention module (``module.kvd_probe``) only inside
``_probing(model, ...)``, which switches the model's attention implementation through
``kvd.connectors.hf.attention_switch`` and restores it on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from kvd.connectors.hf.attention_switch import attention_implementation, attention_modules

PROBE_NAME = "kvd_probe"
_CHUNK = 512


@dataclass(slots=True)
class _ProbeState:
    sink: int
    window: int
    capture: tuple[int, int] | None = None  # [start, stop) of the query/key block to keep
    edge_sum: torch.Tensor | None = None  # [Hq] summed edge mass
    edge_count: int = 0
    rows: torch.Tensor | None = None  # [Hq, c, c] captured attention rows
    extra: dict = field(default_factory=dict)


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    st: _ProbeState = module.kvd_probe
    _, hq, q_len, _ = query.shape
    kv_len = key.shape[2]
    n_rep = hq // key.shape[1]
    k = key.repeat_interleave(n_rep, dim=1)
    v = value.repeat_interleave(n_rep, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    dev = query.device
    kpos = torch.arange(kv_len, device=dev)
    outs, rows = [], []
    edge = torch.zeros(hq, dtype=torch.float64, device=dev)
    count = 0
    for s in range(0, q_len, _CHUNK):
        qpos = torch.arange(kv_len - q_len + s, kv_len - q_len + min(q_len, s + _CHUNK), device=dev)
        scores = torch.matmul(query[:, :, s:s + len(qpos)], k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)  # [B, Hq, c, kv]
        outs.append(torch.matmul(probs, v))
        # Edge mass: keys neither in the sink nor in (i - window, i].
        far = (kpos[None, :] >= st.sink) & (kpos[None, :] <= qpos[:, None] - st.window)
        valid = qpos >= st.sink + st.window
        if valid.any():
            mass = (probs[0] * far[None]).sum(-1)[:, valid]  # [Hq, n_valid]
            edge += mass.double().sum(-1)
            count += int(valid.sum())
        if st.capture is not None:
            c0, c1 = st.capture
            sel = (qpos >= c0) & (qpos < c1)
            if sel.any():
                rows.append(probs[0][:, sel][:, :, c0:c1].clone())
    st.edge_sum = edge if st.edge_sum is None else st.edge_sum + edge
    st.edge_count += count
    if rows:
        st.rows = torch.cat(rows, dim=1)
    out = torch.cat(outs, dim=2).transpose(1, 2).contiguous()
    return out, None


@contextlib.contextmanager
def _probing(model, sink: int, window: int, capture: tuple[int, int] | None = None
             ) -> Iterator[list[_ProbeState]]:
    states = [_ProbeState(sink, window, capture) for _ in attention_modules(model)]
    with attention_implementation(model, PROBE_NAME, _probe_attention, layer_attr="kvd_probe", layer_values=states):
        yield states


def _to_kv_heads(per_q: torch.Tensor, num_kv_heads: int) -> list[float]:
    """``[Hq]`` → ``[Hkv]`` by max over each GQA group."""
    return per_q.view(num_kv_heads, -1).max(dim=1).values.tolist()


@torch.no_grad()
def edge_mass(model, sequences: list[torch.Tensor], *, sink: int, window: int) -> list[list[float]]:
    """``[layer][kv_head]`` edge mass over ``sequences`` (each ``[1, T]`` token ids)."""
    nkv = model.config.num_key_value_heads
    with _probing(model, sink, window) as states:
        for ids in sequences:
            model.model(input_ids=ids, use_cache=False)
    grid = []
    for st in states:
        per_q = (st.edge_sum / max(1, st.edge_count)).float().cpu()
        grid.append(_to_kv_heads(per_q, nkv))
    return grid


@torch.no_grad()
def prefix_shift(model, chunk: list[int], prefixes: tuple[list[int], list[int]]) -> list[list[float]]:
    """``[layer][kv_head]`` prefix shift of ``chunk`` behind two prefixes of equal length."""
    p1, p2 = prefixes
    if len(p1) != len(p2):
        raise ValueError(f"prefixes must have equal token length, got {len(p1)} and {len(p2)}")
    span = (len(p1), len(p1) + len(chunk))
    captured = []
    for prefix in (p1, p2):
        ids = torch.tensor([prefix + chunk], device=model.device)
        with _probing(model, 0, 1, capture=span) as states:
            model.model(input_ids=ids, use_cache=False)
        captured.append([st.rows for st in states])
    nkv = model.config.num_key_value_heads
    grid = []
    for a, b in zip(*captured, strict=True):  # per layer: [Hq, c, c]
        cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)  # [Hq, c]
        grid.append(_to_kv_heads((1.0 - cos.mean(dim=-1)).clamp(min=0.0).cpu(), nkv))
    return grid
