"""Head-aware KV through the daemon (issue 12): what a head-aware reader stores and loads per token, a
bit-identical reload, and prefix hits per GB in capacity mode. Sections merge their keys into
``benchmarks/results/head_aware.json`` (``benchmarks/head_aware.py`` writes the Lil guard's keys there).

Usage: ``nice -n 10 python benchmarks/head_aware_daemon.py [--only bytes,capacity] [--threads 1]``.

- ``bytes``: SmolLM2-135M-Instruct (fp32, CPU) under a head map, through a real daemon in capacity
  mode (``local_cold_codec = drop``, admitted at once): a natural-text prompt (kvd's README and docs)
  of ``ctx + 1`` tokens; request 1 computes and stores its first ``ctx`` tokens, then its last token
  over the adapter's in-process head-aware pool (the reference logits); ``kvctl flush`` writes
  everything below the arena, which lets the cold window groups go; request 2 (a fresh cache) sends
  the whole prompt: the adapter loads the ``ctx`` stored tokens from the daemon as a head-aware reader
  and computes the last token, as an engine rerunning the prompt would. Keys per context (4k, 8k): ``bytes_stored_per_token_ratio_<ctx>`` (the bytes kvd
  keeps of the prefix's entries, uncompressed, over full KV: ``kvctl entries`` sizes),
  ``bytes_loaded_per_token_ratio_<ctx>`` (bytes leased for the reload over full KV), and
  ``headaware_reload_bit_identical`` (request 2's logits equal request 1's, bit for bit, at every
  context). The token-granular fraction the map keeps (``HeadMap.kv_fraction``) is reported beside:
  capacity mode trims each local group's sink chunk and window start to the token, so the ratio
  meets it when the windows end on chunk boundaries (before trimming it sat ~0.04 above). At 8K
  the map profiled for 8K (``kvd/data/heads/smollm2-135m-8k.json``) is used when present; the shipped
  4K map's 8K figure is reported too (``_8k_shipped_map``).
- ``capacity``: a seeded trace of long prompts (documents of 4K and 8K tokens, SmolLM2's KV shape,
  synthetic bf16 KV) with Zipf reuse against one fixed budget (arena + SSD), run twice through the
  daemon: exact readers with lossless cold extents, and head-aware readers in capacity mode (drop).
  Each request looks its prompt up, loads the hit prefix (a lease over the arena), and stores the
  rest. ``prefix_hit_rate_exact``, ``prefix_hit_rate_capacity`` (hit tokens / prompt tokens) and
  ``capacity_hits_per_gb_ratio`` (the same budget, so the ratio of hit tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.head_aware_results import merge  # noqa: E402
from kvd.client import prefix as kvio  # noqa: E402
from kvd.core import protocol as P  # noqa: E402
from kvd.core.headmap import HeadMap  # noqa: E402
from kvd.core.keys import EXACT, ModelSpec, attention_tag  # noqa: E402
from tests.daemon_proc import DaemonProc  # noqa: E402

OUT = ROOT / "benchmarks/results/head_aware.json"
SHIPPED = ROOT / "kvd/data/heads/smollm2-135m.json"
MAP_8K = ROOT / "kvd/data/heads/smollm2-135m-8k.json"
CHUNK = 256


def log(msg: str) -> None:
    print(f"[head_aware_daemon {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_map(path: Path) -> HeadMap:
    return HeadMap.load(path).model_copy(update={"fingerprint": None})  # windows only: the model is ours


# ---- bytes: one prompt, stored then reloaded by a head-aware reader -----------------------------------


def reload_once(model, tok, hm: HeadMap, ctx: int, seed: int, root: Path) -> dict:
    from kvd.calibrate.tasks import natural_text_ids
    from kvd.connectors.hf import cache as hf

    n = ctx  # a prompt of ctx + 1 tokens: request 2 loads the first ctx (whole chunks), computes the last
    ids = torch.tensor([natural_text_ids(tok, "docs", seed, ctx + 1)])
    root.mkdir(parents=True)
    leases: list = []
    real_open = kvio.open_lease
    kvio.open_lease = lambda *a, **kw: leases.append(real_open(*a, **kw)) or leases[-1]
    d = DaemonProc(root, env_extra={"KVD_HOST__CAPACITY_BYTES": "1GiB", "KVD_SSD__CAPACITY_BYTES": "2GiB",
                                    "KVD_CODEC__LOCAL_COLD_CODEC": "drop", "KVD_SSD__ADMIT_AFTER": "1"}).start()
    try:
        with d.client() as client, torch.no_grad():
            first = hf.attach(model, head_map=hm, client=client)
            h = first.att.handle
            assert h is not None and h.reader == "head_aware", "the adapter did not register with the daemon"
            t0 = time.perf_counter()
            model(ids[:, :n], past_key_values=first)
            ref = model(ids[:, n:], past_key_values=first).logits
            compute_s = time.perf_counter() - t0
            client.flush(P.FlushRequest())
            prefix = set(h.hashes(ids[0, :n].tolist()))
            kept = [e for e in client.entries(model=h.fingerprint, limit=100_000).entries if e.hash in prefix]
            full_entry = sum(p.nbytes for p in h.plans(CHUNK).values())
            second = first.fresh()
            t0 = time.perf_counter()
            got = model(ids, past_key_values=second).logits[:, -1:]
            reload_s = time.perf_counter() - t0
            answers = leases[-1]._answers
        hf.detach(model)
    finally:
        kvio.open_lease = real_open
        d.kill()
    loaded = sum(x.nbytes for e in answers if e.status == "ok" for x in e.extents)
    return {"ctx": ctx, "prefix_tokens": n, "map": hm.model, "kv_fraction_token_granular": round(hm.kv_fraction(n), 4),
            "entries_kept": len(kept), "stored_ratio": sum(e.nbytes for e in kept) / (len(prefix) * full_entry),
            "loaded_ratio": loaded / (len(prefix) * full_entry), "loaded_entries": sum(e.status == "ok" for e in answers),
            "bit_identical": bool(torch.equal(got, ref)), "max_abs_logit_diff": float((got - ref).abs().max()),
            "compute_s": round(compute_s, 1), "reload_s": round(reload_s, 1)}


def bytes_section(args) -> dict:
    from kvd.calibrate.model import load_causal_lm
    from kvd.testing.models import smollm2_dir

    model, tok = load_causal_lm(smollm2_dir())
    runs = []
    plan = [(4096, load_map(SHIPPED), ""), (8192, load_map(SHIPPED), "_shipped_map")]
    if args.smoke:  # the path only, at 1K tokens: no figure
        plan = [(1024, load_map(SHIPPED), "")]
    elif MAP_8K.exists():
        plan.append((8192, load_map(MAP_8K), ""))
    with tempfile.TemporaryDirectory(prefix="kvd-ha-") as tmp:
        for i, (ctx, hm, suffix) in enumerate(plan):
            log(f"bytes: {ctx} tokens under {hm.model}")
            r = reload_once(model, tok, hm, ctx, seed=100 + i, root=Path(tmp) / f"run{i}")
            r["suffix"] = suffix
            log(f"  {json.dumps(r)}")
            runs.append(r)
    out: dict = {"bytes_runs": runs,
                 "headaware_reload_bit_identical": all(r["bit_identical"] for r in runs)}
    if args.smoke:
        return {"smoke_bytes_runs": runs}
    for r in runs:
        k = f"{r['ctx'] // 1024}k{r['suffix']}"
        out[f"bytes_stored_per_token_ratio_{k}"] = round(r["stored_ratio"], 4)
        out[f"bytes_loaded_per_token_ratio_{k}"] = round(r["loaded_ratio"], 4)
    if not MAP_8K.exists():  # the 8K keys are the shipped map's until an 8K map ships
        out["bytes_stored_per_token_ratio_8k"] = out["bytes_stored_per_token_ratio_8k_shipped_map"]
        out["bytes_loaded_per_token_ratio_8k"] = out["bytes_loaded_per_token_ratio_8k_shipped_map"]
    return out


# ---- capacity: a Zipf trace against one budget, exact vs head-aware in capacity mode ------------------


def trace(num_docs: int, num_requests: int, s: float, seed: int) -> tuple[list[int], list[int]]:
    """Document lengths (4K and 8K alternating) and the requested document of each request (Zipf)."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** s for k in range(num_docs)]
    order = list(range(num_docs))
    rng.shuffle(order)  # popularity independent of length
    lengths = [4096 if d % 2 == 0 else 8192 for d in range(num_docs)]
    return lengths, [order[i] for i in rng.choices(range(num_docs), weights, k=num_requests)]


def run_trace(mode: str, hm: HeadMap, lengths: list[int], requests: list[int], budget: dict, root: Path) -> dict:
    spec = ModelSpec("smollm2-135m-instruct", num_layers=30, num_kv_heads=3, head_dim=64)
    env = {"KVD_HOST__CAPACITY_BYTES": budget["host"], "KVD_SSD__CAPACITY_BYTES": budget["ssd"],
           "KVD_SSD__ADMIT_AFTER": "1", "KVD_CODEC__LOCAL_COLD_CODEC": "drop" if mode == "capacity" else "lossless"}
    root.mkdir(parents=True)
    d = DaemonProc(root, env_extra=env).start()
    g = torch.Generator().manual_seed(7)
    kv = (torch.randn(30, 2, 3, max(lengths), 64, generator=g) * 0.5).to(torch.bfloat16)
    asked = hit = 0
    t0 = time.perf_counter()
    try:
        with d.client() as client:
            if mode == "capacity":
                h = kvio.register(client, spec, hm, computed_under=attention_tag(hm.sinks, hm.windows),
                                  reader="head_aware")
            else:
                h = kvio.register(client, spec, hm, computed_under=EXACT)
            for doc in requests:
                n = lengths[doc]
                ids = [doc * 100_000 + t for t in range(n)]
                limit = n - 1  # as an engine: all but the last token can be loaded
                k = min(kvio.lookup_prefix(h, ids, max_tokens=limit).num_prefix_hits, -(-limit // CHUNK))
                chunks = tokens = 0
                if k:
                    with kvio.load_prefix(h, ids, max_chunks=k, max_tokens=limit) as lp:
                        chunks, tokens = lp.num_chunks, lp.num_tokens
                asked += limit
                hit += tokens
                kvio.store_prefix(h, ids, kv[:, :, :, :n], start_chunk=chunks)
            stats = client.stats()
    finally:
        d.kill()
    return {"mode": mode, "hit_tokens": hit, "asked_tokens": asked, "hit_rate": hit / asked,
            "seconds": round(time.perf_counter() - t0, 1),
            "tiers": {t.name: {"used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes} for t in stats.tiers}}


def capacity_section(args) -> dict:
    """The headline is the budget fixed before the first run (1.5 GiB: 512 MiB arena + 1 GiB SSD, under a
    third of the trace's working set); ``--budgets`` adds others (same 1:2 split) to show the curve."""
    hm = load_map(SHIPPED)
    lengths, requests = trace(args.docs, args.requests, args.zipf, seed=12)
    if args.smoke:
        lengths, requests = [1024, 2048, 1024], [0, 1, 0, 2, 1, 0]
    budgets = [1.5] + [float(b) for b in args.budgets.split(",") if b and float(b) != 1.5]
    sweep = []
    with tempfile.TemporaryDirectory(prefix="kvd-cap-") as tmp:
        for gib in budgets:
            host_mib = int(gib * 1024 / 3)
            budget = {"host": f"{host_mib}MiB", "ssd": f"{int(gib * 1024) - host_mib}MiB"}
            runs = {}
            for mode in ("exact", "capacity"):
                log(f"capacity: {gib} GiB, {mode} readers, {len(requests)} requests over {len(lengths)} documents")
                runs[mode] = run_trace(mode, hm, lengths, requests, budget, Path(tmp) / f"{mode}-{gib}")
                log(f"  {json.dumps(runs[mode])}")
            sweep.append({"budget_gib": gib, "budget": budget, "runs": runs,
                          "hits_per_gb_ratio": round(runs["capacity"]["hit_tokens"] / max(runs["exact"]["hit_tokens"], 1), 3)})
    if args.smoke:
        return {"smoke_capacity_runs": sweep}
    head = sweep[0]["runs"]
    full_gb = sum(lengths) * 30 * 3 * 2 * 64 * 2 / 2**30
    return {"capacity_sweep": sweep, "capacity_budget_gib": budgets[0], "capacity_working_set_gib": round(full_gb, 2),
            "capacity_trace": {"documents": len(lengths), "requests": len(requests), "zipf_s": args.zipf,
                               "lengths": "4096 and 8192 alternating", "seed": 12},
            "prefix_hit_rate_exact": round(head["exact"]["hit_rate"], 4),
            "prefix_hit_rate_capacity": round(head["capacity"]["hit_rate"], 4),
            "capacity_hits_per_gb_ratio": sweep[0]["hits_per_gb_ratio"]}


SECTIONS = {"bytes": bytes_section, "capacity": capacity_section}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--docs", type=int, default=40, help="capacity: documents")
    ap.add_argument("--requests", type=int, default=300, help="capacity: requests")
    ap.add_argument("--zipf", type=float, default=1.0, help="capacity: Zipf exponent of document popularity")
    ap.add_argument("--budgets", default="", help="capacity: more budgets in GiB besides 1.5, e.g. 0.75,3")
    ap.add_argument("--smoke", action="store_true", help="run each path small (no figures); writes smoke_* keys")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in args.only.split(","):
        t0 = time.perf_counter()
        keys = SECTIONS[name](args)
        keys[f"{name}_meta"] = {"date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0, 1),
                                "threads": args.threads, "hardware": f"{os.cpu_count()} CPU cores (this machine)"}
        merge(Path(args.out), keys)
        log(f"{name}: done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
