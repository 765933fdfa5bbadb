"""Head-aware KV through kvd (issue 12) on SmolLM2-135M-Instruct (CPU, fp32): one section per figure,
results merged into ``benchmarks/results/head_aware.json`` (other sections' keys are kept).

Usage: ``nice -n 10 python benchmarks/head_aware.py --only lil-calibrate,lil [--prompts 30]``.
Sections (``SECTIONS``; a new one is a function returning its keys):

- ``lil-calibrate``: data for the Lil guard's thresholds (``kvd.connectors.hf.guard``). Calibration
  prompts (seeds < 1000, never the benchmark's) decoded greedily under full KV and under the
  aggressive map without a guard; for each generation the compression ratio of every window of
  recent tokens. The rule: for each window size, the threshold is 10 % above the highest ratio any
  full-KV generation that ended by itself (EOS) reached — healthy text never trips it — and the
  window whose threshold catches the map's runaway generations earliest wins. Key ``lil_calibration``.
- ``lil``: the guard on held-out prompts (seeds ≥ 1000). Per prompt: full KV (plain transformers),
  the adapter under the aggressive map without the guard, with it at its defaults (``GuardConfig()``,
  restore, ``stopping_criteria=[cache.guard]``), and with ``action="rerun"`` (through
  ``kvd.connectors.hf.generate``). Keys ``lil_inflation_noguard``, ``lil_inflation_guard`` (the
  default, restore), ``lil_inflation_guard_rerun`` (mean over prompts of ``len / len_full - 1``),
  ``lil_tokens_spent_*`` (every token decoded, the ones a rerun throws away included, over full KV's),
  ``lil_trip_share``, accuracies of the prompts with an answer, and per-prompt rows.

The aggressive map (``aggressive_map``): every KV head local with sink 4 and window 32 except a
seeded 10 % that stay global (8 of 90): 12 % of full KV at 1K tokens. It is meant to break decoding
(loops), not to be served.

Cost note: a guarded run is the unguarded run until the guard trips (the guard only reads tokens
until then), so when it does not trip, its output is used for the unguarded and the rerun rows too
and the map is decoded once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.head_aware_results import merge  # noqa: E402
from kvd.calibrate import tasks  # noqa: E402
from kvd.connectors.hf import cache as hf  # noqa: E402
from kvd.connectors.hf.guard import GuardConfig, compression_ratio, generate  # noqa: E402
from kvd.core.headmap import HeadMap  # noqa: E402

OUT = ROOT / "benchmarks/results/head_aware.json"
EOS = 2  # SmolLM2's <|im_end|>
MAX_NEW = 384
WINDOWS = (32, 48, 64, 96)


def aggressive_map(seed: int = 0) -> HeadMap:
    g = torch.Generator().manual_seed(seed)
    is_global = (torch.rand(30, 3, generator=g) < 0.1).tolist()
    return HeadMap.from_classes("smollm2-aggressive", is_global, sink=4, window=32, method="lil-benchmark")


# ---- prompts ------------------------------------------------------------------------------------------

_TOPICS = ["how bread is baked", "why leaves change colour in autumn", "how a bicycle works", "the life of a honeybee",
           "how rain forms", "how a library is organised", "how ships stay afloat", "why we need sleep",
           "how a lighthouse guides ships", "how cheese is made", "how a compass works", "why the tides rise and fall"]


def lil_prompt(tok, seed: int) -> tuple[str, str | None, str]:
    """``(chat prompt, answer or None, kind)``: a paragraph explaining a topic, a short story, or a
    summary of a short generated text that ends by stating a fact it was given (a secret code: the
    answer). SmolLM2's full-KV answers to these run 60-400 tokens (a quarter or more hit 384: this
    135M model also loops on its own)."""
    rng = random.Random(seed)
    kind = ("paragraph", "story", "summary")[seed % 3]
    answer = None
    if kind == "paragraph":
        q = f"Write one paragraph explaining {rng.choice(_TOPICS)}."
    elif kind == "story":
        q = f"Write a short story about {rng.choice(tasks._SUBJ)} who {rng.choice(tasks._VERB)} {rng.choice(tasks._OBJ)}."
    else:
        name, answer = rng.choice(tasks._NAMES), str(rng.randint(1000, 9999))
        q = (f"{tasks.prose(seed, 150)}\n\nThe secret code for {name} is {answer}.\n\nSummarize the text above in one "
             f"paragraph, then give the secret code for {name}.")
    return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True), \
        answer, kind


# ---- decoding -----------------------------------------------------------------------------------------


def decode(model, ids: torch.Tensor, *, head_map: HeadMap | None = None, guard: GuardConfig | None = None,
           max_new: int = MAX_NEW) -> tuple[list[int], dict | None]:
    """Greedy tokens after ``ids`` (up to and including EOS) and the guard's counters."""
    with torch.no_grad():
        if head_map is None:
            out = model.generate(ids, max_new_tokens=max_new, do_sample=False)
            return out[0, ids.shape[1]:].tolist(), None
        cache = hf.attach(model, head_map=head_map, guard=guard)
        try:  # kvd's generate: the guard as a stopping criterion, and its rerun
            out = generate(model, ids, cache, max_new_tokens=max_new, do_sample=False)
        finally:
            hf.detach(model)
    stats = None
    if cache.guard is not None:
        stats = asdict(cache.guard.stats)
    return out[0, ids.shape[1]:].tolist(), stats


def window_ratios(tokens: list[int], window: int) -> list[float]:
    """Compression ratio of every window of ``window`` tokens (one per token from the window's end)."""
    return [compression_ratio(tokens[j - window:j]) for j in range(window, len(tokens) + 1)]


# ---- sections -----------------------------------------------------------------------------------------


def lil_calibrate(model, tok, args) -> dict:
    hm = aggressive_map()
    rows = []
    for seed in range(args.calib_prompts):  # calibration seeds < 1000
        prompt, _, kind = lil_prompt(tok, seed)
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        full, _ = decode(model, ids)
        mapped, _ = decode(model, ids, head_map=hm)
        rows.append({"seed": seed, "kind": kind, "full": full, "map": mapped})
        log(f"calib {seed} {kind}: full {len(full)} (eos {full[-1] == EOS}), map {len(mapped)} (eos {mapped[-1] == EOS})")
    choice = {}
    for w in WINDOWS:
        healthy = [max(window_ratios(r["full"], w), default=0.0) for r in rows if r["full"][-1] == EOS]
        threshold = round(1.1 * max(healthy, default=2.0), 2)
        runaway = [r["map"] for r in rows if r["map"][-1] != EOS and r["full"][-1] == EOS]
        caught = [next((j + w for j, x in enumerate(window_ratios(m, w)) if x >= threshold), None) for m in runaway]
        hits = [c for c in caught if c is not None]
        choice[w] = {"threshold": threshold, "healthy_max": max(healthy, default=0.0), "healthy": len(healthy),
                     "runaway": len(runaway), "caught": len(hits),
                     "mean_tokens_to_trip": sum(hits) / len(hits) if hits else None}
    best = min((w for w in WINDOWS if choice[w]["caught"]),
               key=lambda w: (-choice[w]["caught"], choice[w]["mean_tokens_to_trip"]), default=None)
    return {"lil_calibration": {"prompts": len(rows), "max_new_tokens": MAX_NEW, "per_window": choice,
                                "chosen_window": best,
                                "chosen_ratio": choice[best]["threshold"] if best else None,
                                "rows": rows}}  # token ids too: other rules can be tried without decoding again


def _correct(tok, tokens: list[int], answer: str | None) -> bool | None:
    return None if answer is None else answer in tok.decode(tokens, skip_special_tokens=True)


def lil(model, tok, args) -> dict:
    hm = aggressive_map()
    cfg = GuardConfig()  # the defaults: restore
    rerun_cfg = GuardConfig(action="rerun")  # the same thresholds
    rows = []
    for i in range(args.prompts):
        seed = tasks.EVAL_SEED_BASE + i  # held out: never used to choose anything
        prompt, answer, kind = lil_prompt(tok, seed)
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        t0 = time.monotonic()
        full, _ = decode(model, ids)
        guarded, stats = decode(model, ids, head_map=hm, guard=cfg)
        plain = decode(model, ids, head_map=hm)[0] if stats["trips"] else guarded
        rerun, rstats = decode(model, ids, head_map=hm, guard=rerun_cfg) if stats["trips"] else (guarded, None)
        row = {"seed": seed, "kind": kind, "prompt_tokens": ids.shape[1], "len_full": len(full),
               "len_noguard": len(plain), "len_guard": len(guarded), "len_guard_rerun": len(rerun),
               "spent_noguard": len(plain), "spent_guard": len(guarded),
               "spent_guard_rerun": len(rerun) + (rstats["trip_generated"] if rstats else 0),
               "rerun_equals_full": rerun == full if rstats else None, "guard": stats, "guard_rerun": rstats,
               "correct_full": _correct(tok, full, answer), "correct_noguard": _correct(tok, plain, answer),
               "correct_guard": _correct(tok, guarded, answer), "correct_guard_rerun": _correct(tok, rerun, answer),
               "seconds": round(time.monotonic() - t0, 1)}
        rows.append(row)
        log(f"lil {seed} {kind}: full {len(full)} noguard {len(plain)} guard {len(guarded)} rerun {len(rerun)} "
            f"trips {stats['trips']} stops {stats['stops']} ({row['seconds']} s)")
    n = len(rows)
    infl = lambda key: sum(r[key] / r["len_full"] - 1 for r in rows) / n  # noqa: E731
    spent = lambda key: sum(r[key] for r in rows) / sum(r["len_full"] for r in rows) - 1  # noqa: E731
    answered = [r for r in rows if r["correct_full"] is not None]
    acc = lambda key: sum(bool(r[key]) for r in answered) / len(answered) if answered else None  # noqa: E731
    reruns = [r["rerun_equals_full"] for r in rows if r["rerun_equals_full"] is not None]
    return {
        "lil_inflation_noguard": infl("len_noguard"),
        "lil_inflation_guard": infl("len_guard"),
        "lil_inflation_guard_rerun": infl("len_guard_rerun"),
        "lil_trip_share": sum(r["guard"]["trips"] > 0 for r in rows) / n,
        "lil_tokens_spent_noguard": spent("spent_noguard"),
        "lil_tokens_spent_guard": spent("spent_guard"),
        "lil_tokens_spent_guard_rerun": spent("spent_guard_rerun"),
        "lil_rerun_equals_full_share": sum(reruns) / len(reruns) if reruns else None,
        "lil_accuracy_full": acc("correct_full"), "lil_accuracy_noguard": acc("correct_noguard"),
        "lil_accuracy_guard": acc("correct_guard"), "lil_accuracy_guard_rerun": acc("correct_guard_rerun"),
        "lil_answered_prompts": len(answered),
        "lil_setup": {"prompts": n, "max_new_tokens": MAX_NEW, "guard": asdict(cfg), "guard_rerun": asdict(rerun_cfg),
                      "map_kv_fraction_1k": hm.kv_fraction(1024), "map_global_heads": hm.num_global},
        "lil_rows": rows,
    }


SECTIONS = {"lil-calibrate": lil_calibrate, "lil": lil}


# ---- driver ---------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[head_aware {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    ap.add_argument("--prompts", type=int, default=30, help="lil: held-out prompts")
    ap.add_argument("--calib-prompts", type=int, default=12, help="lil-calibrate: calibration prompts")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine: see DEVELOPERS.md)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    names = [s for s in a.only.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    torch.set_num_threads(a.threads)
    from kvd.calibrate.model import load_causal_lm
    from kvd.testing.models import smollm2_dir

    model, tok = load_causal_lm(smollm2_dir())
    for name in names:
        t0 = time.monotonic()
        res = SECTIONS[name](model, tok, a)
        res[f"{name.replace('-', '_')}_machine"] = {"seconds": round(time.monotonic() - t0), "cpus": os.cpu_count(),
                                                    "loadavg_end": os.getloadavg(), "threads": a.threads}
        merge(Path(a.out), res)
        log(f"{name}: {json.dumps({k: v for k, v in res.items() if not k.endswith('rows')}, default=str)[:2000]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
