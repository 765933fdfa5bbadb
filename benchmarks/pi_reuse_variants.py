"""Design measurements behind kvd's chunk-reuse defaults (docs/chunk_reuse.md), on SmolLM2 (CPU, fp32).

Same generated multi-document task as ``pi_reuse_fidelity.py``; for each request, the KL divergence of
the next-token distribution at the answer position from full recompute's (``KL(p_recompute ‖ p)``,
nats), and the share of hidden states each variant computes. Variants:

- ``kvd``: every head's KV recomputed (the default); ``kvd_cached_local``: local heads keep the chunks'
  KV (RedKnot's rule, as issue 7 describes it) except the first 32 tokens of each chunk;
  ``kvd_cached_local_b0``: the same without that boundary repair;
- ``sparse_identity_m0.6`` / ``_m0.8``: RedKnot's Sparse FFN as written (tokens outside the mass skip
  the FFN and continue), output-norm mass 0.6 / 0.8 from layer 2;
- ``sparse_freeze_f0.15``: kvd's Sparse FFN (``kvd.reuse.plan.SPARSE_FFN``: one selection at layer 2,
  15% of the cached tokens by output norm continue, the rest use their cached KV from then on);
- the baselines naive, cacheblend and epic.

Usage: ``nice -n 10 python benchmarks/pi_reuse_variants.py [--requests 12]`` → results/pi_reuse_variants.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import pi_reuse_fidelity as fid  # noqa: E402

from kvd.connectors.hf import cache as hf  # noqa: E402
from kvd.core.headmap import HeadMap  # noqa: E402
from kvd.reuse.chunks import LocalChunkStore  # noqa: E402
from kvd.reuse.plan import SPARSE_FFN, SparseFfn  # noqa: E402

VARIANTS = {  # name -> (head map?, reuse() keyword arguments)
    "recompute": (False, {"method": "recompute"}),
    "kvd": (True, {}),
    "kvd_cached_local": (True, {"local_kv": "cached"}),
    "kvd_cached_local_b0": (True, {"local_kv": "cached", "boundary_tokens": 0}),
    "sparse_identity_m0.6": (True, {"sparse_ffn": SparseFfn(mass=0.6, dense_layers=2)}),
    "sparse_identity_m0.8": (True, {"sparse_ffn": SparseFfn(mass=0.8, dense_layers=2)}),
    "sparse_freeze_f0.15": (True, {"sparse_ffn": SPARSE_FFN}),
    "naive": (False, {"method": "naive"}),
    "cacheblend": (False, {"method": "cacheblend"}),
    "epic": (False, {"method": "epic"}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from kvd.calibrate.model import load_causal_lm
    from kvd.testing.models import smollm2_dir

    model, tok = load_causal_lm(smollm2_dir())
    store = LocalChunkStore()
    caches = {True: hf.attach(model, head_map=HeadMap.load(ROOT / "config/heads/smollm2-135m.json"),
                              chunk_store=store),
              False: hf.attach(model, chunk_store=store)}
    corpus = fid.make_corpus(tok, 24, 220, args.seed)
    rng = random.Random(args.seed)
    kls = {name: [] for name in VARIANTS}
    active = {name: [] for name in VARIANTS}
    for i in range(args.requests):
        req = fid.make_request(tok, corpus, args.seed * 100000 + i, 4, rng.random() < 0.25)
        segs = fid.segments(tok, corpus, req)
        ref = None
        with torch.no_grad():
            for name, (use_map, kw) in VARIANTS.items():
                res = caches[use_map].fresh().reuse(segs, **kw)
                logp = res.logits[0].log_softmax(-1)
                ref = logp if ref is None else ref
                kls[name].append(float((ref.exp() * (ref - logp)).sum()))
                active[name].append(res.active_fraction)
        print(f"[{i + 1}/{args.requests}] " + " ".join(f"{n}={v[-1]:.4f}" for n, v in kls.items()), flush=True)
    out = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "date": time.strftime("%Y-%m-%d"),
           "num_requests": args.requests, "docs_per_request": 4, "metric": "KL(p_recompute || p) at the answer, nats"}
    for name in VARIANTS:
        v = sorted(kls[name])
        out[f"kl_mean_{name}"] = sum(v) / len(v)
        out[f"kl_median_{name}"] = v[len(v) // 2]
        out[f"active_fraction_{name}"] = sum(active[name]) / len(active[name])
    path = Path(args.out) / "pi_reuse_variants.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: round(v, 4) for k, v in out.items() if k.startswith("kl_mean")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
