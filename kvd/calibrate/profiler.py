"""Head profiler: measure which KV heads of a model can be local, and write its head map.

Entry points (``kvctl profile MODEL_DIR --out FILE`` calls ``main(["MODEL_DIR", "--out", FILE])``, or
``profile(model_dir, out)`` directly):

1. **Scores** (``kvd.calibrate.scores``): edge mass (sink 4, window 256) and prefix shift per
   (layer, KV head), query heads reduced by max. ``redknot_map`` turns them into the paper's
   selection (top ``global_ratio`` by ``max(edge, shift)`` plus absolute thresholds) — the baseline.
2. **KL-greedy selection** (kvd's method, the one shipped). Attention mass does not say how much
   the *output* suffers when a head goes local, so this measures it. Every head starts local with
   the smallest window. Each round runs the calibration sequences once forward (a direct
   measurement of ``KL(p_full ‖ p_map)``, in nats, on the scored positions) and once backward, and
   linearizes: for head ``h`` and a bigger option ``k`` (a longer window, or global) the KL change is
   ``Σ_t ⟨∂KL/∂o_h(t), o_h^k(t) − o_h(t)⟩``, where ``o_h`` is the head's attention output (all its
   query heads). The round then buys the upgrades with the best KL drop per KV byte until it has
   spent ``round_fraction`` of full KV, and re-linearizes. Each head may so end with its own window.
   The trajectory (bytes, measured KL, map) is kept; the shipped map is the cheapest state whose
   calibration KL ≤ ``kl_target`` and whose ``kv_fraction(4096) ≤ max_fraction_4k``.

The forward/backward measurement of step 2 is ``kvd.calibrate.kl_probe`` (shared with the recall
refinement, ``kvd.calibrate.refine``).

Calibration data (``kvd.calibrate.tasks``; disjoint from the evaluation data by the hold-out rule there):
standard-library docstrings (KL on the last ``kl_positions`` positions) and a multi-key recall text
(8 facts at random depths, each asked at the end; KL on the answer digits only), weighted equally.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from kvd.calibrate import scores as head_scores
from kvd.calibrate import tasks
from kvd.calibrate.kl_probe import CalibSeq, KlProbe, choice_map, option_costs
from kvd.calibrate.model import load_causal_lm
from kvd.core.headmap import HeadMap
from kvd.core.identity import choose_model_id
from kvd.core.keys import ModelSpec

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class ProfileConfig:
    sink: int = 4
    window: int = 256  # edge-mass window and the window of the RedKnot-style baseline map
    global_ratio: float = 0.15
    edge_threshold: float | None = None
    shift_threshold: float | None = None
    windows: tuple[int, ...] = (64, 128, 256, 512, 1024, 1536)  # per-head window options of the KL selection
    calib_tokens: int = 2048
    kl_positions: int = 1024
    round_fraction: float = 0.02  # KV bytes (fraction of full at calib_tokens) bought per round
    # Fractions the trajectory must pass through exactly (a round never crosses one), so that a map
    # exists at each budget the benchmark sweeps.
    checkpoints: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    max_fraction: float = 0.8
    # Shipped state: None = the lowest calibration KL among states within ``max_fraction_4k`` (spend
    # the byte bound on fidelity); a number = the cheapest state whose calibration KL ≤ it.
    kl_target: float | None = None
    max_fraction_4k: float = 0.5  # the byte bound: kv_fraction(bound_tokens) ≤ this (named for its default length)
    bound_tokens: int = 4096  # the context length the byte bound holds at (8192 for a map profiled for 8K)
    num_natural: int = 4  # calibration sequences of natural text (stdlib docstrings)
    num_recall: int = 2  # calibration sequences of multi-key recall
    # After selection: the recall refinement (``kvd.calibrate.refine``) at this many tokens with
    # this many passkey texts; 0 turns it off.
    refine_tokens: int = 4096
    refine_passkeys: int = 4
    seed: int = 0
    # Edge mass and prefix shift (the RedKnot baseline, stored in the map's scores; not used to select):
    # at 8K on a CPU they cost about as much as a KL-greedy round.
    baseline_scores: bool = True

    def __post_init__(self) -> None:  # refuse what would fail only after minutes of model work
        for flag, ok, need in (
                ("--windows", min(self.windows, default=0) > 0, "> 0"), ("--round-fraction", self.round_fraction > 0, "> 0"),
                ("--num-natural", self.num_natural >= 1 or (not self.baseline_scores and self.num_recall >= 1),
                 "≥ 1 (or 0 with --no-baseline-scores and --num-recall ≥ 1)"),
                ("--kl-positions", self.kl_positions > 0, "≥ 1"), ("--calib-tokens", self.calib_tokens > 1, "≥ 2"),
                ("--refine-tokens", self.refine_tokens == 0 or self.refine_tokens >= 128, "0 (off) or ≥ 128")):
            if not ok:
                raise ValueError(f"{flag} must be {need}")


def calibration_set(tok, cfg: ProfileConfig) -> list[CalibSeq]:
    """The calibration sequences (seeds < 1000: never used for evaluation): ``num_natural`` windows
    of standard-library docstrings and ``num_recall`` multi-key recall texts."""
    t = cfg.calib_tokens
    k = min(cfg.kl_positions, t - 1)
    seqs = []
    for i in range(cfg.num_natural):
        nat = tasks.natural_text_ids(tok, "stdlib", cfg.seed + 10 * i, t)
        seqs.append(CalibSeq(f"stdlib{i}", torch.tensor([nat]), torch.arange(t - k, t)))
    for i in range(cfg.num_recall):
        seqs.append(_recall_seq(tok, cfg.seed + 1 + 10 * i, t))
    return seqs


def _recall_seq(tok, seed: int, t: int) -> CalibSeq:
    """8 facts hidden in ~``t`` tokens, then every fact asked; scored on the answer digits only."""
    rec = tasks.multikey(tok, seed, max(128, t - 24 * 8), num_keys=8)
    ids = tok(rec.prompt)["input_ids"]
    facts = list(rec.facts)
    asked = next(i for i, (_, c) in enumerate(facts) if " " + c == rec.answer)
    order = [facts[asked]] + [f for i, f in enumerate(facts) if i != asked]
    answers: list[int] = []
    for n, (name, code) in enumerate(order):
        if n:
            ids += tok(f"\nQuestion: what is the secret code for {name}? The secret code for {name} is")["input_ids"]
        ans = tok(" " + code)["input_ids"]
        answers += range(len(ids), len(ids) + len(ans))
        ids += ans
    pos = torch.tensor([a - 1 for a in answers])  # logits at a-1 predict token a
    return CalibSeq(f"multikey{seed}", torch.tensor([ids]), pos)


def _pick_upgrades(choice, gains: torch.Tensor, costs: list[float], spend: float) -> int:
    """Apply the best KL-drop-per-byte upgrades until ``spend`` (in head-cost units) is used."""
    cands = []
    for layer, row in enumerate(choice):
        for head, cur in enumerate(row):
            best = None
            for k in range(cur + 1, len(costs)):
                g = float(gains[layer, head, k])
                if g > 0:
                    ratio = g / (costs[k] - costs[cur])
                    if best is None or ratio > best[0]:
                        best = (ratio, k)
            if best:
                cands.append((best[0], layer, head, best[1]))
    cands.sort(reverse=True)
    spent, n = 0.0, 0
    for _, layer, head, k in cands:
        step = costs[k] - costs[choice[layer][head]]
        if spent + step > spend + 1e-9:
            continue  # would cross the round's limit (a checkpoint): try a cheaper upgrade
        spent += step
        choice[layer][head] = k
        n += 1
    return n


Progress = bool | str  # True / "always": bars on stderr; False / "never": none; "auto": on a terminal


def phase_bar(progress: Progress, desc: str, total: float, unit: str = "it"):
    """A tqdm bar for one phase of the profiler (``kvctl profile`` shows one per phase: minutes each)."""
    from tqdm import tqdm

    disable = {True: False, "always": False, False: True, "never": True}.get(progress)  # None: tqdm decides
    return tqdm(total=total, desc=f"profile: {desc}", unit=unit, unit_scale=unit == "B",
                unit_divisor=1024 if unit == "B" else 1000, disable=disable, file=sys.stderr)


def kl_greedy(model, seqs: list[CalibSeq], cfg: ProfileConfig, *, progress: Progress = True
              ) -> list[dict]:
    """The greedy trajectory: one dict per round ``{fraction, kl, kls, choice}`` (choice: option
    index per head into ``cfg.windows + (global,)``)."""
    options = option_grid(cfg)
    costs = option_costs(cfg.sink, options, cfg.calib_tokens)
    num_layers, nkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    num_heads = num_layers * nkv
    model.requires_grad_(False)
    runner = KlProbe(model, seqs, cfg.sink, options)
    choice = [[0] * nkv for _ in range(num_layers)]
    out = []
    rounds = int((cfg.max_fraction - costs[0]) / cfg.round_fraction) + 2
    bar = phase_bar(progress, "KL-greedy rounds", rounds, unit="round")
    while True:
        kls, gains = runner.step(choice)
        frac = sum(costs[c] for row in choice for c in row) / num_heads
        out.append({"fraction": frac, "kl": sum(kls) / len(kls), "kls": kls,
                    "choice": [list(r) for r in choice]})
        bar.update(1)
        bar.set_postfix(fraction=f"{frac:.3f}", kl=f"{out[-1]['kl']:.4f}")
        if frac >= cfg.max_fraction or len(out) > 3 * rounds:
            break
        ahead = [c - frac for c in cfg.checkpoints if c - frac > 2.0 / num_heads]
        spend = min([cfg.round_fraction] + ahead[:1])
        if _pick_upgrades(choice, gains, costs, spend * num_heads) == 0:
            break
    bar.close()
    return out


# ---- maps ------------------------------------------------------------------------------------


def option_grid(cfg: ProfileConfig) -> tuple[int, ...]:
    """The search's options per head: ``cfg.windows``, then 0 (global); a choice indexes into it."""
    return tuple(cfg.windows) + (0,)


def map_from_choice(model_name: str, choice: list[list[int]], cfg: ProfileConfig, **extra) -> HeadMap:
    return choice_map(model_name, choice, cfg.sink, option_grid(cfg), **extra)


def redknot_map(model_name: str, edge: list[list[float]], shift: list[list[float]],
                cfg: ProfileConfig, **extra) -> HeadMap:
    """The paper's selection: top ``global_ratio`` by max(edge, shift), OR absolute thresholds."""
    combined = [[max(e, s) for e, s in zip(er, sr, strict=True)] for er, sr in zip(edge, shift, strict=True)]
    flat = sorted((v for row in combined for v in row), reverse=True)
    k = max(0, round(cfg.global_ratio * len(flat)))
    cut = flat[k - 1] if k else float("inf")
    is_global = [[(v >= cut) or (cfg.edge_threshold is not None and e >= cfg.edge_threshold)
                  or (cfg.shift_threshold is not None and s >= cfg.shift_threshold)
                  for v, e, s in zip(cr, er, sr, strict=True)]
                 for cr, er, sr in zip(combined, edge, shift, strict=True)]
    return HeadMap.from_classes(model_name, is_global, sink=cfg.sink, window=cfg.window, **extra)


def trajectory_maps(head_map: HeadMap) -> list[tuple[float, float, HeadMap]]:
    """``(fraction at calib_tokens, calibration KL, map)`` for every state the profiler visited."""
    cal = head_map.calibration or {}
    cfg = ProfileConfig(**{k: (tuple(v) if k == "windows" else v)
                           for k, v in cal.get("config", {}).items()})
    return [(s["fraction"], s["kl"], map_from_choice(head_map.model, s["choice"], cfg, method="kl_greedy"))
            for s in cal.get("trajectory", [])]


def select(trajectory: list[dict], cfg: ProfileConfig, model_name: str) -> int:
    """Index of the shipped state among those with ``kv_fraction(bound_tokens) ≤ max_fraction_4k``: the
    lowest calibration KL, or with ``kl_target`` the cheapest state meeting it (else lowest KL)."""
    ok = [(s["kl"], s["fraction"], i) for i, s in enumerate(trajectory)
          if map_from_choice(model_name, s["choice"], cfg).kv_fraction(cfg.bound_tokens) <= cfg.max_fraction_4k]
    if not ok:
        return 0
    if cfg.kl_target is not None:
        meeting = [(f, i) for kl, f, i in ok if kl <= cfg.kl_target]
        if meeting:
            return min(meeting)[1]
    return min(ok)[2]


def reselect(head_map: HeadMap, **changes) -> HeadMap:
    """The same profile with another selection rule (``kl_target``, ``max_fraction_4k``): no rerun, no refinement."""
    cal = {k: v for k, v in (head_map.calibration or {}).items() if k != "refine"}  # a state before refinement
    conf = {**cal["config"], **changes}
    cfg = ProfileConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in conf.items()})
    idx = select(cal["trajectory"], cfg, head_map.model)
    cal.update(config=conf, selected_round=idx, calibration_kl=cal["trajectory"][idx]["kl"])
    scores = dict(head_map.scores or {})
    scores["window"] = [[float(x) for x in row] for row in _window_grid(cal["trajectory"][idx]["choice"], cfg)]
    return map_from_choice(head_map.model, cal["trajectory"][idx]["choice"], cfg, method="kl_greedy",
                           scores=scores, calibration=cal, fingerprint=head_map.fingerprint)


def profile(model_dir: str | Path, out: str | Path | None = None, *, cfg: ProfileConfig | None = None,
            model=None, tok=None, progress: Progress = True, model_name: str | None = None,
            model_id: str | None = None) -> HeadMap:
    """Profile the model in ``model_dir`` and write its head map to ``out`` (if given); return it.

    ``model``/``tok`` may be passed in to reuse a loaded fp32 model (tests do). Each phase (load,
    calibration set, edge mass, prefix shift, KL-greedy rounds, recall refinement) shows a bar.
    """
    cfg = cfg or ProfileConfig()
    if model is None:
        model, tok = _load(model_dir, progress)
    t0 = time.monotonic()
    name = model_name or Path(str(model_dir)).name  # the map's name (for people)
    # The fingerprint a serving engine registers for these weights (kvd.core.identity: the content of
    # the model's files, or model_id given by hand), in bf16, the dtype engines serve it in.
    mid, rev = choose_model_id(model_dir, explicit=model_id)
    spec = ModelSpec.from_hf_config(model.config, model_id=mid, revision=rev)
    with phase_bar(progress, "calibration set", 1, unit="set") as bar:
        seqs = calibration_set(tok, cfg)
        bar.update(1)
    scores = _baseline_scores(model, tok, seqs, cfg, progress) if cfg.baseline_scores else {}
    traj = kl_greedy(model, seqs, cfg, progress=progress)
    idx = select(traj, cfg, name)
    calibration = {
        "config": asdict(cfg),
        "sequences": [{"name": s.name, "tokens": int(s.ids.shape[1]), "scored_positions": len(s.positions)}
                      for s in seqs],
        "trajectory": traj,
        "selected_round": idx,
        "calibration_kl": traj[idx]["kl"],
        "seconds": round(time.monotonic() - t0, 1),
    }
    calibration = json.loads(json.dumps(calibration))  # tuples -> lists: equal to what load() returns
    scores["window"] = [[float(x) for x in row] for row in _window_grid(traj[idx]["choice"], cfg)]
    hm = map_from_choice(name, traj[idx]["choice"], cfg, method="kl_greedy", scores=scores,
                         calibration=calibration, fingerprint=spec.fingerprint())
    if cfg.refine_tokens > 0:
        from kvd.calibrate.refine import refine  # imports this module: import here

        hm = refine(model, tok, hm, recall_tokens=cfg.refine_tokens, bound_tokens=cfg.bound_tokens,
                    num_passkey=cfg.refine_passkeys, progress=progress)
    if out is not None:
        hm.save(out)
    return hm


def _baseline_scores(model, tok, seqs: list[CalibSeq], cfg: ProfileConfig, progress: Progress) -> dict:
    """Edge mass and prefix shift (the RedKnot baseline's scores, kept in the map for comparison)."""
    natural = [s.ids.to(model.device) for s in seqs if s.name.startswith("stdlib")]
    with phase_bar(progress, "edge mass", len(natural), unit="seq") as bar:
        edge = head_scores.edge_mass(model, _ticking(natural, bar), sink=cfg.sink, window=cfg.window)
    nat = seqs[0].ids[0].tolist()  # the first natural sequence (num_natural >= 1)
    third = min(256, len(nat) // 3)
    with phase_bar(progress, "prefix shift", 1, unit="pass") as bar:
        shift = head_scores.prefix_shift(model, nat[2 * third:3 * third],
                                         (nat[:third], tasks_prose_ids(tok, cfg.seed + 2, third)))
        bar.update(1)
    return {"edge_mass": edge, "prefix_shift": shift,
            "combined": [[max(a, b) for a, b in zip(e, s, strict=True)] for e, s in zip(edge, shift, strict=True)]}


def _load(model_dir: str | Path, progress: Progress):
    """Load the model; the bar counts its weight files' bytes (one step: transformers loads them)."""
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*") if f.suffix in (".safetensors", ".bin"))
    with phase_bar(progress, "load model", weights, unit="B") as bar:
        model, tok = load_causal_lm(model_dir)
        bar.update(weights)
    return model, tok


def _ticking(items: list, bar):
    """Yield ``items``, advancing ``bar`` after each has been used."""
    for x in items:
        yield x
        bar.update(1)


def _window_grid(choice, cfg: ProfileConfig) -> list[list[int]]:
    """Window per head, 0 for global (for the scores table)."""
    return [[cfg.windows[c] if c < len(cfg.windows) else 0 for c in row] for row in choice]


def tasks_prose_ids(tok, seed: int, num_tokens: int) -> list[int]:
    return tasks.natural_text_ids(tok, "prose", seed, num_tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvctl profile", description="profile a model's KV heads into a head map")
    ap.add_argument("model_dir")
    ap.add_argument("--out", required=True, help="head map JSON to write")
    d = ProfileConfig()
    ap.add_argument("--calib-tokens", type=int, default=d.calib_tokens)
    ap.add_argument("--kl-target", type=float, default=d.kl_target)
    ap.add_argument("--max-fraction-4k", type=float, default=d.max_fraction_4k,
                    help="the byte bound: kv_fraction at --bound-tokens the selected map may hold")
    ap.add_argument("--bound-tokens", type=int, default=d.bound_tokens,
                    help="context length of the byte bound (8192 to profile for 8K)")
    ap.add_argument("--kl-positions", type=int, default=d.kl_positions,
                    help="positions of each natural text whose KL is measured (its last ones)")
    ap.add_argument("--max-fraction", type=float, default=d.max_fraction)
    ap.add_argument("--round-fraction", type=float, default=d.round_fraction)
    ap.add_argument("--checkpoints", default=",".join(map(str, d.checkpoints)),
                    help="KV fractions the trajectory stops at exactly (a map exists at each)")
    ap.add_argument("--global-ratio", type=float, default=d.global_ratio)
    ap.add_argument("--windows", default=",".join(map(str, d.windows)))
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--num-natural", type=int, default=d.num_natural)
    ap.add_argument("--num-recall", type=int, default=d.num_recall)
    ap.add_argument("--refine-tokens", type=int, default=d.refine_tokens, help="0: no recall refinement")
    ap.add_argument("--no-baseline-scores", action="store_true", help="skip edge mass and prefix shift (the "
                    "RedKnot baseline's scores; not used to select)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    ap.add_argument("--model-name", default=None, help="the map's name (default: dir name)")
    ap.add_argument("--model-id", default=None, help="model_id of the fingerprint, as the engines set it by hand "
                    "(default: the content identity of the model's files, kvd.core.identity)")
    ap.add_argument("--progress", choices=["auto", "always", "never"], default="always",
                    help="a bar per phase on stderr (auto: on a terminal)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = replace(d, calib_tokens=a.calib_tokens, kl_target=a.kl_target, max_fraction_4k=a.max_fraction_4k,
                      bound_tokens=a.bound_tokens, kl_positions=a.kl_positions, max_fraction=a.max_fraction,
                      round_fraction=a.round_fraction, global_ratio=a.global_ratio, seed=a.seed,
                      windows=tuple(sorted({int(w) for w in a.windows.split(",")})),
                      num_natural=a.num_natural, num_recall=a.num_recall, refine_tokens=a.refine_tokens,
                      baseline_scores=not a.no_baseline_scores,
                      checkpoints=tuple(sorted(float(c) for c in a.checkpoints.split(",") if c)))
    except ValueError as e:  # ProfileConfig's range check, or a list item that is not a number
        ap.error(str(e) if str(e).startswith("--") else f"--windows, --checkpoints: comma-separated numbers ({e})")
    if Path(a.out).is_dir():
        ap.error(f"--out {a.out} is a directory: name the head map file to write")
    model = tok = None
    if a.device != "cpu":
        model, tok = _load(a.model_dir, a.progress)
        model.to(a.device)
    hm = profile(a.model_dir, a.out, cfg=cfg, model=model, tok=tok, model_name=a.model_name, model_id=a.model_id,
                 progress=a.progress)
    logger.info("wrote %s: %d/%d heads global, kv_fraction(%d)=%.3f, calibration KL %.4f",
                a.out, hm.num_global, hm.num_layers * hm.num_kv_heads, cfg.bound_tokens,
                hm.kv_fraction(cfg.bound_tokens), hm.calibration["calibration_kl"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
