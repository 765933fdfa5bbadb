"""Fidelity of an exact reader that accepts lossy KV (issue 12): real vLLM (CPU build) serving
SmolLM2-135M-Instruct with kvd's connector and ``accept_lossy = true``, against vLLM without kvd.

Setup: the daemon runs with ``codec.local_cold_codec = "fp8"`` and the shipped SmolLM2 head map (placement:
local window groups outside their window go cold, fp8 on SSD); admitted at once. Engine ``lossy``
serves each document (2,304 tokens of kvd's README and docs, 9 chunks) once, which stores it; the
daemon is flushed (every entry written to SSD, cold extents leave the arena, so they exist only as fp8
records); then the engine serves prompts that are leading parts of those documents (5 to 8 whole
chunks plus 1 to 255 more tokens, seeded) and generates ``--new`` tokens greedily with the top
``--top`` logprobs at each step. Their prefixes load from kvd, cold local heads decoded from fp8.
Engine ``exact`` (no connector) then reads each prompt followed by the tokens ``lossy`` generated
(teacher forcing, ``prompt_logprobs``): the exact model's distribution at the same positions, on the
same tokens.

The same run with ``local_cold_codec = "lossless"`` is the control (``lossy_control_lossless_*``):
exact bytes through the same path, so what it measures is decode vs teacher-forced prefill on this
CPU build, the floor the fp8 figure is read against.

Per position: top-1 agreement and KL(exact ‖ lossy) over the union of both top-K lists (a token
missing from one list gets that list's K-th logprob: an estimate, exact when the tail beyond K is
negligible, which it is at K=100 for this model's peaked distributions). Keys
``lossy_exact_reader_kl`` (mean), ``lossy_exact_reader_top1`` (share), over >= 1,000 positions.
Evidence that lossy bytes were used: the daemon's fp8 decodes (promotions of local extents from SSD)
(the ``*promot*`` counters), and the tokens each prompt loaded from kvd.

Usage: ``nice -n 10 python benchmarks/lossy_vllm.py [--docs 32] [--new 32]``; results merged into
``benchmarks/results/head_aware.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.head_aware_results import merge  # noqa: E402

OUT = ROOT / "benchmarks/results/head_aware.json"
DOC_TOKENS, CHUNK = 2304, 256


# ---- the engine process (vLLM must start under __main__) -----------------------------------------------


def engine(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams

    kw = {"kv_transfer_config": job["connector"]} if job["connector"] else {}
    llm = LLM(model=job["model"], max_model_len=4096, enforce_eager=True, seed=0, enable_prefix_caching=False,
              max_logprobs=job["top"], **kw)
    out: dict = {}
    if job["mode"] == "lossy":
        from kvd.client.client import KvdClient
        from kvd.core import protocol as P

        store = SamplingParams(temperature=0.0, max_tokens=1)
        for ids in job["docs"]:
            llm.generate([{"prompt_token_ids": ids}], store, use_tqdm=False)
        with KvdClient(job["socket"], register_cuda=False) as c:
            out["flushed"] = c.flush(P.FlushRequest()).count
        gen = SamplingParams(temperature=0.0, max_tokens=job["new"], logprobs=job["top"])
        out["runs"] = []
        for ids in job["prompts"]:
            (r,) = llm.generate([{"prompt_token_ids": ids}], gen, use_tqdm=False)
            c = r.outputs[0]
            out["runs"].append({"tokens": list(c.token_ids), "cached": r.num_cached_tokens,
                                "top": [{str(t): lp.logprob for t, lp in step.items()} for step in c.logprobs]})
    else:
        tf = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=job["top"])
        out["runs"] = []
        for ids, n in zip(job["prompts"], job["forced"]):
            (r,) = llm.generate([{"prompt_token_ids": ids}], tf, use_tqdm=False)
            steps = r.prompt_logprobs[len(ids) - n:]  # the distributions that predict the forced tokens
            out["runs"].append({"top": [{str(t): lp.logprob for t, lp in step.items()} for step in steps]})
    Path(job["out"]).write_text(json.dumps(out))


# ---- the driver ----------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[lossy_vllm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_engine(job: dict, root: Path, name: str, timeout: float = 3600) -> dict:
    job = {**job, "out": str(root / f"{name}.json")}
    (root / f"{name}.job.json").write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with open(root / f"{name}.log", "wb") as logf:
        rc = subprocess.run([sys.executable, __file__, "--engine", str(root / f"{name}.job.json")], cwd=ROOT,
                            env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if rc:
        raise RuntimeError(f"engine {name} exited {rc}:\n{(root / f'{name}.log').read_text()[-4000:]}")
    return json.loads((root / f"{name}.json").read_text())


def kl_top1(p: dict[str, float], q: dict[str, float]) -> tuple[float, bool]:
    """KL(p ‖ q) over the union of two top-K logprob lists (missing: that list's smallest), and whether
    their argmaxes agree."""
    p_floor, q_floor = min(p.values()), min(q.values())
    toks = set(p) | set(q)
    lp = {t: p.get(t, p_floor) for t in toks}
    lq = {t: q.get(t, q_floor) for t in toks}
    zp = math.log(sum(math.exp(v) for v in lp.values()))
    zq = math.log(sum(math.exp(v) for v in lq.values()))
    kl = sum(math.exp(lp[t] - zp) * ((lp[t] - zp) - (lq[t] - zq)) for t in toks)
    return max(kl, 0.0), max(p, key=p.get) == max(q, key=q.get)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--docs", type=int, default=32, help="documents (one measured prompt each)")
    ap.add_argument("--new", type=int, default=32, help="generated tokens per prompt (positions measured)")
    ap.add_argument("--top", type=int, default=100, help="logprobs kept per position")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--keep", help="work in this directory and keep it (logs of the daemon and engines)")
    args = ap.parse_args(argv)
    if args.engine:
        engine(args.engine)
        return 0
    from transformers import AutoTokenizer

    from kvd.calibrate.tasks import natural_text_ids
    from kvd.core.headmap import HeadMap
    from kvd.testing.models import smollm2_dir
    from tests.daemon_proc import DaemonProc

    model = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(model)
    docs = [natural_text_ids(tok, "docs", 500 + i, DOC_TOKENS) for i in range(args.docs)]
    rng = random.Random(12)
    prompts = [d[: rng.randint(5, 8) * CHUNK + rng.randint(1, 255)] for d in docs]
    t0 = time.perf_counter()
    engines: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kvd-lossy-") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        hm_path = root / "map.json"
        HeadMap.load(ROOT / "kvd/data/heads/smollm2-135m.json").model_copy(update={"fingerprint": None}).save(hm_path)
        # fp8: the figure. lossless: the control, the same path with exact bytes (what decode vs
        # teacher-forced prefill alone differ by on this CPU build).
        for codec in ("fp8", "lossless"):
            (root / codec).mkdir()
            d = DaemonProc(root / codec, env_extra={
                "KVD_HOST__CAPACITY_BYTES": "1GiB", "KVD_SSD__CAPACITY_BYTES": "4GiB",
                "KVD_CODEC__LOCAL_COLD_CODEC": codec, "KVD_SSD__ADMIT_AFTER": "1"}).start()
            try:
                connector = {"kv_connector": "KvdConnector", "kv_connector_module_path": "kvd.connectors.vllm",
                             "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                             "kv_connector_extra_config": {"socket": d.socket, "namespace": "lossy", "timeout_s": 10.0,
                                                           "load_wait_s": 10.0, "head_map": str(hm_path),
                                                           "accept_lossy": True}}
                log(f"{codec}: {len(docs)} documents stored, flushed, {len(prompts)} prompts x {args.new} tokens")
                engines[codec] = run_engine({"model": model, "connector": connector, "mode": "lossy", "docs": docs,
                                             "prompts": prompts, "new": args.new, "top": args.top, "socket": d.socket},
                                            root, codec)
                with d.client() as c:
                    engines[codec]["counters"] = {k: v for k, v in c.stats().counters.items()
                                                  if "promot" in k or "checksum" in k}
            finally:
                d.kill()
        log("exact engine: teacher-forced on each run's tokens")
        forced = [r["tokens"] for codec in engines for r in engines[codec]["runs"]]
        exact = run_engine({"model": model, "connector": None, "mode": "exact", "top": args.top,
                            "prompts": [p + f for p, f in zip(prompts * len(engines), forced)],
                            "forced": [len(f) for f in forced]}, root, "exact")
    res: dict = {}
    for j, codec in enumerate(engines):
        kls, agree = [], []
        for lr, er in zip(engines[codec]["runs"], exact["runs"][j * len(prompts):(j + 1) * len(prompts)]):
            for q, p in zip(lr["top"], er["top"]):
                k, a = kl_top1(p, q)
                kls.append(k)
                agree.append(a)
        cached = [r["cached"] for r in engines[codec]["runs"]]
        key = "lossy_exact_reader" if codec == "fp8" else "lossy_control_lossless"
        res.update({f"{key}_kl": round(sum(kls) / len(kls), 5), f"{key}_top1": round(sum(agree) / len(agree), 4),
                    f"{key}_positions": len(kls), f"{key}_kl_p99": round(sorted(kls)[int(0.99 * len(kls))], 4),
                    f"{key}_loaded_tokens_mean": round(sum(cached) / len(cached), 1),
                    f"{key}_counters": engines[codec]["counters"]})
    res["lossy_meta"] = {"date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0, 1),
                         "hardware": f"{os.cpu_count()} CPU cores (this machine), vLLM CPU build",
                         "codec": "fp8 on cold local window groups (control: lossless)",
                         "map": "kvd/data/heads/smollm2-135m.json", "docs": args.docs, "new_tokens": args.new,
                         "top": args.top}
    log(json.dumps(res))
    merge(Path(args.out), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
