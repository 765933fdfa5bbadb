"""Recall refinement of a profiled head map at the length its bytes are bounded at (4K tokens).

Why: the KL-greedy profiler calibrates at 2K tokens, where a local window of 1024-1536 tokens covers
most of the context; such heads look nearly free of error there but cannot reach a needle 3K tokens
back. This pass keeps the byte bound at ``bound_tokens`` and trades bytes between heads using the
same linearized KL gains as the profiler (``kvd.calibrate.kl_probe.KlProbe``), now measured on passkey texts
of ``recall_tokens`` tokens (answer digits scored) and on the natural/multi-key calibration, each
objective weighted equally:

- upgrades (longer window, or global) are ranked by KL drop per byte at ``bound_tokens``,
- downgrades (shorter window) by KL rise per byte saved,
- an upgrade is taken while it gains more per byte than the downgrades that pay for it lose,
  at most ``max_moves`` head changes per round, re-linearized every round.

Every round's KLs are measured directly; the result is the visited state with the lowest passkey KL
among those whose natural/multi-key KL stays within ``natural_slack`` x the starting one (the start
itself included, so the pass never makes the calibration objective much worse).

Calibration seeds are < 1000, like the profiler's, so evaluation prompts stay held out.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from kvd.calibrate import tasks
from kvd.calibrate.kl_probe import CalibSeq, KlProbe, option_costs
from kvd.calibrate.profiler import ProfileConfig, calibration_set, map_from_choice, option_grid, phase_bar
from kvd.core.headmap import HeadMap


def passkey_seq(tok, seed: int, num_tokens: int) -> CalibSeq:
    rec = tasks.passkey(tok, seed, num_tokens)
    p_ids, a_ids = tok(rec.prompt)["input_ids"], tok(rec.answer)["input_ids"]
    pos = torch.arange(len(p_ids) - 1, len(p_ids) + len(a_ids) - 1)
    return CalibSeq(f"passkey{seed}", torch.tensor([p_ids + a_ids]), pos)


def _choice_of(head_map: HeadMap, cfg: ProfileConfig) -> list[list[int]]:
    n = len(cfg.windows)
    return [[n if s.is_global else cfg.windows.index(s.window) for s in row] for row in head_map.heads]


def _swap(choice, gains: torch.Tensor, costs: list[float], room: float, max_moves: int) -> int:
    """Budget-neutral exchange; ``room`` = head-cost units still free under the bound."""
    ups, downs = [], []
    for layer, row in enumerate(choice):
        for head, cur in enumerate(row):
            for k in range(len(costs)):
                g, dc = float(gains[layer, head, k]), costs[k] - costs[cur]
                if k > cur and g > 0:
                    ups.append((g / dc, g, dc, layer, head, k))
                elif k < cur:
                    downs.append((max(0.0, -g) / -dc, max(0.0, -g), -dc, layer, head, k))
    ups.sort(reverse=True)
    downs.sort()
    touched: set[tuple[int, int]] = set()
    moves, di = 0, 0
    for _, gain, dc, layer, head, k in ups:
        if moves >= max_moves:
            break
        if (layer, head) in touched:
            continue
        paid, loss, plan = room, 0.0, []
        while paid < dc and di < len(downs):
            _, lo, saved, dl, dh, dk = downs[di]
            di += 1
            if (dl, dh) in touched or (dl, dh) == (layer, head) or any(p[:2] == (dl, dh) for p in plan):
                continue
            plan.append((dl, dh, dk, saved))
            paid += saved
            loss += lo
        if paid < dc or loss >= gain or moves + 1 + len(plan) > max_moves:
            break  # nothing cheap enough left to pay for it, or more head changes than the round may make
        choice[layer][head] = k
        touched.add((layer, head))
        for dl, dh, dk, _ in plan:
            choice[dl][dh] = dk
            touched.add((dl, dh))
        room = paid - dc
        moves += 1 + len(plan)
    return moves


def refine(model, tok, head_map: HeadMap, *, recall_tokens: int | None = None, bound_tokens: int | None = None,
           num_passkey: int = 2, rounds: int = 4, max_moves: int = 12, natural_slack: float = 1.2,
           windows: tuple[int, ...] | None = None, calib_tokens: int | None = None,
           progress: bool | str = False) -> HeadMap:
    """A map with the same byte bound at ``bound_tokens`` and better recall there (see module doc).

    ``bound_tokens`` and ``recall_tokens`` default to the map's profile (``bound_tokens``, ``refine_tokens``)."""
    cal = head_map.calibration or {}
    conf = cal.get("config", {})
    cfg = ProfileConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in conf.items()})
    bound_tokens = bound_tokens or cfg.bound_tokens
    recall_tokens = recall_tokens or cfg.refine_tokens or bound_tokens
    if windows is not None:
        cfg = replace(cfg, windows=windows)
    options = option_grid(cfg)
    costs = option_costs(cfg.sink, options, bound_tokens)
    choice = _choice_of(head_map, cfg)
    model.requires_grad_(False)
    base = calibration_set(tok, replace(cfg, num_natural=1, num_recall=1,
                                        calib_tokens=calib_tokens or cfg.calib_tokens,
                                        kl_positions=min(cfg.kl_positions, (calib_tokens or cfg.calib_tokens) // 2)))
    recall = [passkey_seq(tok, 100 + i, recall_tokens) for i in range(num_passkey)]
    runners = [KlProbe(model, base, cfg.sink, options), KlProbe(model, recall, cfg.sink, options)]
    bound = cfg.max_fraction_4k * len(choice) * len(choice[0])
    log, states = [], []
    bar = phase_bar(progress, "recall refinement", rounds + 1, unit="round")
    for r in range(rounds + 1):
        gains = torch.zeros(len(choice), len(choice[0]), len(options), dtype=torch.float64)
        kls = []
        for runner in runners:
            k, g = runner.step(choice)
            kls.append(sum(k) / len(k))
            gains += g / len(runner.seqs)
        states.append((kls[0], kls[1], [list(row) for row in choice]))
        bar.update(1)
        if r == rounds:
            break  # the last state is measured, not moved
        room = bound - sum(costs[c] for row in choice for c in row)
        moves = _swap(choice, gains, costs, room, max_moves)
        log.append({"kl_natural_recall": kls[0], "kl_passkey": kls[1], "moves": moves})
        if moves == 0:
            break
    bar.close()
    start_nat = states[0][0]
    ok = [s for s in states if s[0] <= natural_slack * start_nat]
    best = min(ok, key=lambda s: s[1])
    choice = best[2]
    log.append({"kl_natural_recall": best[0], "kl_passkey": best[1], "chosen": states.index(best)})
    new_cal = json.loads(json.dumps({**cal, "refine": {"recall_tokens": recall_tokens, "bound_tokens": bound_tokens,
                                                       "num_passkey": num_passkey, "rounds": log}}))
    scores = dict(head_map.scores or {})
    scores["window"] = [[float(cfg.windows[c]) if c < len(cfg.windows) else 0.0 for c in row] for row in choice]
    return map_from_choice(head_map.model, choice, cfg, method="kl_greedy+recall_refine", scores=scores,
                           calibration=new_cal, fingerprint=head_map.fingerprint)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    from kvd.calibrate.model import load_causal_lm

    ap = argparse.ArgumentParser(prog="python -m kvd.calibrate.refine", description=__doc__.split("\n")[0])
    ap.add_argument("head_map")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-dir", required=True, help="a transformers model directory (the test model's: "
                    "python -m kvd.testing.models path)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--recall-tokens", type=int, default=None, help="default: the map's refine_tokens")
    ap.add_argument("--bound-tokens", type=int, default=None, help="default: the map's bound_tokens")
    ap.add_argument("--num-passkey", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    model, tok = load_causal_lm(a.model_dir)
    model.to(a.device)
    new = refine(model, tok, HeadMap.load(a.head_map), recall_tokens=a.recall_tokens,
                 bound_tokens=a.bound_tokens, num_passkey=a.num_passkey, rounds=a.rounds)
    new.save(a.out)
    bound = new.calibration["refine"]["bound_tokens"]
    print(json.dumps(new.calibration["refine"]), f"global={new.num_global}",
          f"kv_fraction({bound})={new.kv_fraction(bound):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
