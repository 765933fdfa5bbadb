"""Token selection of the reuse methods: which tokens run the FFN, which are recomputed.

All functions are pure torch on any device and return sorted int64 indices or bool masks.
"""

from __future__ import annotations

import torch

from kvd.reuse.plan import SparseFfn


def sparse_ffn_tokens(importance: torch.Tensor, positions: torch.Tensor, end: int, cfg: SparseFfn,
                      force: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (into ``importance``, ascending) of the tokens that run the FFN.

    ``importance [A]``: per-token attention-output L2 norm; ``positions [A]``: the tokens' positions;
    ``end``: the context length (the last ``cfg.recent_tokens`` positions before it always run);
    ``force [A]`` bool: tokens that always run; the mass and the budget count only the others.
    Selection: the fewest tokens, largest first, whose importance sums to ``cfg.mass`` of the total
    (ties broken by sort order), ∪ recent tokens, ∪ at least ``cfg.min_keep`` tokens. A row whose
    importance is all zero runs densely.

    Example: importance [4, 1, 3, 2], mass 0.7, no recent tokens → 4 + 3 = 7 = 0.7 of 10 → [0, 2].
    With ``cfg.keep_fraction`` the largest ``round(keep_fraction * A)`` are kept instead of a mass.
    """
    n = importance.numel()
    if cfg.is_dense or n == 0:
        return torch.arange(n, device=importance.device)
    imp = importance.float()
    if force is not None:  # forced tokens run anyway: rank (and count the budget over) the others
        imp = imp.masked_fill(force, float("-inf"))
    vals, order = torch.sort(imp, descending=True)
    if cfg.keep_fraction is not None:
        n_free = n if force is None else n - int(force.sum())
        budget = max(cfg.min_keep, int(round(cfg.keep_fraction * n_free)))
        keep_sorted = torch.arange(n, device=imp.device) < min(budget, n_free)
    else:
        imp = imp.clamp_min(0.0) if force is None else imp.masked_fill(force, 0.0)
        vals, order = torch.sort(imp, descending=True)
        total = imp.sum()
        if not bool(total > 0):
            return torch.arange(n, device=importance.device)
        before = torch.cumsum(vals, 0) - vals  # mass of the tokens ranked above each token
        keep_sorted = before < cfg.mass * total  # kept while the mass so far is short of the goal
        keep_sorted[: cfg.min_keep] = True
    keep = torch.zeros(n, dtype=torch.bool, device=importance.device)
    keep[order[keep_sorted]] = True
    if cfg.recent_tokens > 0:
        keep |= positions >= end - cfg.recent_tokens
    if force is not None:
        keep |= force
    return torch.nonzero(keep).reshape(-1)


def received_attention(q_recent: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """``[S]`` attention each key position receives from ``q_recent [R, Hq', D]`` (at ``q_pos [R]``)
    over ``k [Hkv', S, D]`` with causal visibility, summed over queries and heads (each row sums to 1)."""
    group = q_recent.shape[1] // k.shape[0]
    kk = k.repeat_interleave(group, dim=0) if group > 1 else k  # [Hq', S, D]
    scores = torch.einsum("rhd,hsd->hrs", q_recent.float(), kk.float()) * scale
    visible = torch.arange(k.shape[1], device=k.device)[None, :] <= q_pos[:, None]  # [R, S]
    probs = torch.softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1)
    return probs.sum((0, 1))


def cacheblend_tokens(deviation: torch.Tensor, reused: torch.Tensor, ratio: float) -> torch.Tensor:
    """``[S]`` bool: the ``ratio`` share of reused tokens with the largest KV deviation, plus every
    token that has no cached KV (CacheBlend's HKVD tokens)."""
    keep = ~reused.clone()
    n_reused = int(reused.sum())
    k = int(round(ratio * n_reused))
    if k > 0:
        dev = torch.where(reused, deviation.float(), torch.full_like(deviation, float("-inf"), dtype=torch.float32))
        keep[torch.topk(dev, k).indices] = True
    return keep


def epic_tokens(first_tokens: torch.Tensor, reused: torch.Tensor) -> torch.Tensor:
    """``[S]`` bool: the first tokens of each reused segment (given) plus every uncached token."""
    return first_tokens | ~reused


__all__ = ["cacheblend_tokens", "epic_tokens", "received_attention", "sparse_ffn_tokens"]
