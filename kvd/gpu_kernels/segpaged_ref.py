"""Plain-torch references of the SegPagedAttention kernels: the definitions the kernels are tested against.

Each has its kernel's signature and result (fp32 math; the prefill reference also takes fp32 inputs,
which the transformers adapter's CPU path uses) and checks its arguments with the kernel's own checks.
They gather whole page lists, so memory grows with the longest list: for tests and the CPU, not speed.
"""

from __future__ import annotations

import torch

from kvd.gpu_kernels.segpaged_decode import check_decode_args, check_decode_positions
from kvd.gpu_kernels.segpaged_prefill import check_prefill_args


def visible(kpos, at, sink, window):
    """Which keys at positions ``kpos`` a query at ``at`` sees, for a head of ``sink`` and ``window``
    (window <= 0: global): ``kpos <= at`` and (global, or ``kpos < sink``, or ``at - window < kpos``). The
    kernels' rule, for broadcastable tensors or ints; ``kvd.calibrate.masked_attention`` keeps its
    own spelling of it, as the independent reference the calibration and the gates use."""
    return (kpos <= at) & ((window <= 0) | (kpos < sink) | (kpos > at - window))


def segpaged_decode_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    num_kv_heads: int,
    return_lse: bool = False,
    split_tokens: int | None = None,
    programs_per_sm: int = 3,
    config: dict | None = None,
    page_pos: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    sink_tokens: torch.Tensor | None = None,
    window_tokens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch SegPagedAttention decode (fp32 math), same signature and result as ``segpaged_decode``.

    Gathers every row's listed tokens into a padded ``[rows, max_tokens, D]`` view, so memory grows with
    the longest list; ``split_tokens``, ``programs_per_sm`` and ``config`` are accepted and ignored.
    """
    check_decode_args(q, k_pool, v_pool, page_table, seq_lens, num_kv_heads)
    pos = check_decode_positions(page_table, num_kv_heads, page_pos, q_pos, sink_tokens, window_tokens)
    B, Hq, D = q.shape
    page_tokens = k_pool.shape[1]
    group = Hq // num_kv_heads
    rows, max_pages = page_table.shape
    lens = seq_lens.long().clamp(0, max_pages * page_tokens)
    n_pages = (lens + page_tokens - 1) // page_tokens
    # entries past a row's pages may hold anything: point them at page 0 and mask their tokens
    listed = torch.arange(max_pages, device=q.device)[None, :] < n_pages[:, None]
    pages = torch.where(listed, page_table.long(), 0)
    k = k_pool[pages].reshape(rows, max_pages * page_tokens, D).float()  # [rows, T, D]
    v = v_pool[pages].reshape(rows, max_pages * page_tokens, D).float()
    valid = torch.arange(max_pages * page_tokens, device=q.device)[None, :] < lens[:, None]  # [rows, T]
    if pos is not None:  # the one-query case of segpaged_prefill_ref's rule
        page_pos, q_pos, sink_tokens, window_tokens = (t.long() for t in pos)
        kpos = (page_pos[:, :, None] + torch.arange(page_tokens, device=q.device)).reshape(rows, -1)
        at = q_pos.repeat_interleave(num_kv_heads)[:, None]
        sink, window = (t.repeat(B)[:, None] for t in (sink_tokens, window_tokens))
        valid &= visible(kpos, at, sink, window)
    qg = q.float().reshape(B * num_kv_heads, group, D)  # row r = b * Hkv + h holds heads h*G..h*G+G-1
    scores = torch.einsum("rgd,rtd->rgt", qg, k) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [rows, G]; -inf for an empty list
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("rgt,rtd->rgd", probs, v).reshape(B, Hq, D).to(q.dtype)
    return (out, lse.reshape(B, Hq)) if return_lse else out


def segpaged_prefill_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_table: torch.Tensor,
    page_pos: torch.Tensor,
    seq_lens: torch.Tensor,
    q_pos: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    sink_tokens: torch.Tensor,
    window_tokens: torch.Tensor,
    *,
    scale: float,
    num_kv_heads: int,
    max_seqlen_q: int | None = None,
    return_lse: bool = False,
    config: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch prefill (fp32 math, one request at a time), same signature and result as the kernel.

    ``max_seqlen_q`` and ``config`` are accepted and ignored. Unlike the kernel it also takes fp32.
    """
    # fp32 is accepted here (not by the kernel): the CPU fidelity path of the transformers adapter runs in fp32
    check_prefill_args(q, k_pool, v_pool, page_table, page_pos, seq_lens, q_pos, cu_seqlens_q, sink_tokens,
           window_tokens, num_kv_heads, dtypes=(torch.bfloat16, torch.float16, torch.float32))
    T, Hq, D = q.shape
    group = Hq // num_kv_heads
    page_tokens = k_pool.shape[1]
    out = torch.zeros((T, Hq, D), dtype=torch.float32, device=q.device)
    lse = torch.full((T, Hq), float("-inf"), dtype=torch.float32, device=q.device)
    cu = cu_seqlens_q.tolist()
    offs_in_page = torch.arange(page_tokens, device=q.device)
    for b in range(len(cu) - 1):
        s0, s1 = cu[b], cu[b + 1]
        if s1 == s0:
            continue
        qpos = q_pos[s0:s1].long()
        for h in range(num_kv_heads):
            r = b * num_kv_heads + h
            n = min(max(int(seq_lens[r]), 0), page_table.shape[1] * page_tokens)  # as the kernel cuts it
            n_pages = -(-n // page_tokens)
            pages = page_table[r, :n_pages].long()
            k = k_pool[pages].reshape(-1, D)[:n].float()
            v = v_pool[pages].reshape(-1, D)[:n].float()
            kpos = (page_pos[r, :n_pages].long()[:, None] + offs_in_page[None, :]).reshape(-1)[:n]
            seen = visible(kpos[None, :], qpos[:, None], int(sink_tokens[h]), int(window_tokens[h]))
            heads = slice(h * group, (h + 1) * group)
            scores = torch.einsum("tgd,kd->tgk", q[s0:s1, heads].float(), k) * scale
            scores = scores.masked_fill(~seen[:, None, :], float("-inf"))
            row_lse = torch.logsumexp(scores, dim=-1)  # [t, G]
            probs = torch.exp(scores - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None])
            out[s0:s1, heads] = torch.einsum("tgk,kd->tgd", probs, v)
            lse[s0:s1, heads] = row_lse
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


__all__ = ["segpaged_decode_ref", "segpaged_prefill_ref", "visible"]
