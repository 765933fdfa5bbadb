"""Fidelity of position-independent chunk reuse on SmolLM2 (CPU, fp32): issue 7's accuracy goals.

Task (generated, nothing downloaded): a corpus of documents of generated prose (evaluation seeds of
``kvd.calibrate.tasks``), each holding one fact ``The access code for the <place> is <5 digits>.`` (two
facts per document made the 135M model confuse them even with full recompute: ~45% accuracy).
A request is a system header, ``--docs`` documents drawn from the corpus in a random order (so each
document comes back in several requests at different positions), and a question about one fact
(or, for ``--two-fact`` of the requests, two facts from two documents) ending in an answer lead-in
(``... The access code for the <place> is``). Documents are the reusable segments; header and question
are not.

Scoring (teacher-forced, one forward per method and request, as ``kvd.calibrate.harness`` does): the
method prefills the request (``KvdCache.reuse``), then the answer tokens are fed through the cache.
A request is *correct* when the argmax at every scored answer position (the first answer token and
every digit) is the answer token: exactly the condition for greedy decoding to produce the codes.
``top1`` is the share of scored positions whose argmax equals full recompute's. Methods and their
settings: ``kvd.reuse.plan.method_config`` (recompute; kvd with the shipped head map; kvd_sparse_ffn;
naive; cacheblend 15%; epic 32 tokens; kvd_cached_local, the variant whose local heads keep the
chunks' KV). kvd methods decode with the head map, the others with full KV.

Usage: ``nice -n 10 python benchmarks/pi_reuse_fidelity.py [--requests 120] [--out DIR]``; per-request
rows are appended to ``<out>/pi_reuse_fidelity.rows.jsonl`` as they finish (a rerun resumes), the
summary goes to ``<out>/pi_reuse_fidelity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvd.calibrate.tasks import EVAL_SEED_BASE, prose  # noqa: E402
from kvd.connectors.hf import cache as hf  # noqa: E402
from kvd.core.headmap import HeadMap  # noqa: E402
from kvd.reuse.chunks import LocalChunkStore  # noqa: E402
from kvd.reuse.plan import BENCH_METHODS, SPARSE_FFN, Segment, method_config  # noqa: E402

METHODS = BENCH_METHODS
PLACES = ["harbor office", "north gate", "old mill", "river lock", "signal tower", "city archive", "glass house",
          "east pier", "clock tower", "salt warehouse", "ferry terminal", "stone bridge", "weather station",
          "village school", "copper mine", "fire station", "music hall", "orchard shed", "lighthouse",
          "boat yard", "flower market", "museum vault", "train depot", "bakery cellar", "chapel tower",
          "water tower", "paper mill", "tram garage", "grain silo", "fish market", "south gate", "toll house",
          "print shop", "garden lodge", "iron foundry", "post office", "royal stables", "castle keep",
          "wine cellar", "ice rink", "boat house", "city library", "old prison", "rope walk", "bell tower",
          "west gate", "coal yard", "dye works", "herb garden", "sawmill"]
HEADER = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "Read the documents below, then answer the question.\n\n")


@dataclass(slots=True, frozen=True)
class Doc:
    ids: tuple[int, ...]
    facts: tuple[tuple[str, str], ...]  # (place, code)


@dataclass(slots=True, frozen=True)
class Request:
    seed: int
    doc_ids: tuple[int, ...]  # corpus indices, in prompt order
    question: tuple[int, ...]  # question + answer lead-in tokens
    answer: tuple[int, ...]  # teacher-forced answer tokens
    scored: tuple[int, ...]  # indices into answer that are scored
    asked: tuple[str, ...]


def make_corpus(tok, num_docs: int, doc_words: int, seed: int, two_fact_docs: float = 0.0) -> list[Doc]:
    rng = random.Random(seed)
    places = rng.sample(PLACES, len(PLACES))
    docs, p = [], 0
    for i in range(num_docs):
        n_facts = 2 if rng.random() < two_fact_docs else 1
        facts = []
        words = prose(EVAL_SEED_BASE + seed * 1000 + i, doc_words).split()[:doc_words]
        for _ in range(n_facts):
            place, code = places[p % len(places)], str(rng.randint(10000, 99999))
            p += 1
            ends = [j + 1 for j, w in enumerate(words) if w.endswith(".")] or [len(words)]
            cut = rng.choice(ends)
            words = words[:cut] + f"The access code for the {place} is {code}.".split() + words[cut:]
            facts.append((place, code))
        text = "Document:\n" + " ".join(words) + "\n\n"
        docs.append(Doc(tuple(tok(text)["input_ids"]), tuple(facts)))
    if p > len(PLACES):
        raise ValueError(f"{p} facts need distinct places; the list has {len(PLACES)}: use fewer documents")
    return docs


def make_request(tok, corpus: list[Doc], seed: int, docs: int, two_fact: bool) -> Request:
    rng = random.Random(seed)
    doc_ids = tuple(rng.sample(range(len(corpus)), docs))
    picks = rng.sample(doc_ids, 2 if two_fact else 1)
    asked = [rng.choice(corpus[d].facts) for d in picks]
    if two_fact:
        q = f"What are the access codes for the {asked[0][0]} and the {asked[1][0]}?"
        answer = f" {asked[0][1]}, and the access code for the {asked[1][0]} is {asked[1][1]}"
    else:
        q = f"What is the access code for the {asked[0][0]}?"
        answer = f" {asked[0][1]}"
    lead = f"Question: {q}<|im_end|>\n<|im_start|>assistant\nThe access code for the {asked[0][0]} is"
    ans = tok(answer)["input_ids"]
    scored = tuple(i for i, t in enumerate(ans) if i == 0 or tok.decode([t]).strip().isdigit())
    return Request(seed, doc_ids, tuple(tok(lead)["input_ids"]), tuple(ans), scored, tuple(a[0] for a in asked))


def segments(tok, corpus: list[Doc], req: Request) -> list[Segment]:
    head = Segment(tok(HEADER)["input_ids"])
    return [head, *[Segment(corpus[d].ids, reusable=True) for d in req.doc_ids], Segment(req.question)]


@torch.no_grad()
def run_method(caches: dict, method: str, segs: list[Segment], req: Request) -> tuple[torch.Tensor, object]:
    """``(argmax at each answer position [len(answer)], the ReuseResult)`` under ``method``."""
    base = caches["kvd"] if method.startswith("kvd") else caches["full"]
    cache = base.fresh()
    cfg = method_config(method)
    res = cache.reuse(segs, method=cfg.method, sparse_ffn=cfg.sparse_ffn, local_kv=cfg.local_kv,
                      boundary_tokens=cfg.boundary_tokens)
    model = cache.att.model
    S = res.input_ids.shape[1]
    dev = model.device
    ans = torch.tensor(req.answer, device=dev)[None]
    pos = torch.arange(S, S + ans.shape[1] - 1, device=dev)[None]
    rest = model(ans[:, :-1], past_key_values=cache, position_ids=pos).logits[0] if ans.shape[1] > 1 else None
    logits = res.logits if rest is None else torch.cat([res.logits, rest], 0)
    return logits.argmax(-1).cpu(), res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=80)
    ap.add_argument("--docs", type=int, default=4, help="documents per request")
    ap.add_argument("--corpus", type=int, default=24, help="documents in the corpus")
    ap.add_argument("--doc-words", type=int, default=220)
    ap.add_argument("--two-fact", type=float, default=0.25, help="share of two-fact questions")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--head-map", default=str(ROOT / "config/heads/smollm2-135m.json"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to sweep settings fast (fp32 either way)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from kvd.calibrate.model import load_causal_lm
    from kvd.testing.models import smollm2_dir

    model, tok = load_causal_lm(smollm2_dir())
    model.to(args.device)
    head_map = HeadMap.load(args.head_map)
    store = LocalChunkStore()
    caches = {"kvd": hf.attach(model, head_map=head_map, chunk_store=store),
              "full": hf.attach(model, chunk_store=store)}
    corpus = make_corpus(tok, args.corpus, args.doc_words, args.seed)
    methods = [m for m in re.split(r",(?![^\[]*\])", args.methods) if m]  # commas inside [...] stay
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "pi_reuse_fidelity.rows.jsonl"
    done = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["seed"], r["method"])] = r
    rng = random.Random(args.seed)
    for i in range(args.requests):
        seed = args.seed * 100000 + i
        req = make_request(tok, corpus, seed, args.docs, rng.random() < args.two_fact)
        segs = segments(tok, corpus, req)
        ans = torch.tensor(req.answer)
        scored = torch.tensor(req.scored)
        ref = None
        for method in ["recompute"] + [m for m in methods if m != "recompute"]:
            key = (seed, method)
            if key in done and method != "recompute":
                continue
            if key in done and all((seed, m) in done for m in methods):
                continue
            t0 = time.perf_counter()
            top, rr = run_method(caches, method, segs, req)
            dt = time.perf_counter() - t0
            if method == "recompute":
                ref = top
            row = {"seed": seed, "method": method, "tokens": sum(len(s) for s in segs),
                   "two_fact": len(req.asked) == 2,
                   "correct": bool((top[scored] == ans[scored]).all()),
                   "top1": float((top[scored] == ref[scored]).float().mean()), "seconds": round(dt, 2),
                   "active_fraction": round(rr.active_fraction, 4), "ffn_fraction": round(rr.ffn_fraction, 4)}
            if key not in done:
                done[key] = row
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        print(f"[{i + 1}/{args.requests}] " + " ".join(
            f"{m}={int(done[(seed, m)]['correct'])}/{done[(seed, m)]['top1']:.2f}" for m in methods
            if (seed, m) in done), flush=True)
    summarize(done, methods, args, out)
    return 0


def summarize(done: dict, methods: list[str], args, out: Path) -> None:
    seeds = sorted({s for s, _ in done})
    seeds = [s for s in seeds if all((s, m) in done for m in methods)]
    res = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "machine": platform.machine(),
           "device": args.device, "date": time.strftime("%Y-%m-%d"), "num_requests": len(seeds), "docs_per_request": args.docs,
           "corpus_docs": args.corpus, "head_map": os.path.relpath(args.head_map, ROOT),
           "sparse_ffn": {"keep_fraction": SPARSE_FFN.keep_fraction, "dense_layers": SPARSE_FFN.dense_layers,
                          "recent_tokens": SPARSE_FFN.recent_tokens, "importance": SPARSE_FFN.importance,
                          "skipped": SPARSE_FFN.skipped},
           "mean_tokens": sum(done[(s, "recompute")]["tokens"] for s in seeds) / max(1, len(seeds))}
    for m in methods:
        rows = [done[(s, m)] for s in seeds]
        res[f"acc_{m}"] = sum(r["correct"] for r in rows) / max(1, len(rows))
        res[f"top1_{m}"] = sum(r["top1"] for r in rows) / max(1, len(rows))
        res[f"seconds_{m}"] = sum(r["seconds"] for r in rows) / max(1, len(rows))
        res[f"active_fraction_{m}"] = sum(r["active_fraction"] for r in rows) / max(1, len(rows))
    (out / "pi_reuse_fidelity.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k.startswith(("acc_", "top1_"))}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
