"""Where a fresh engine's kvd hit spends its time: a breakdown of the ``kvd`` rows of ``vllm_e2e.py``.

A store engine (a subprocess, kvd connector) computes three 4,096-token pass-key prompts (the
``vllm_e2e`` prompts, ``Q4096_*``); then an engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
so its worker's hooks run here; the same thread settings and connector as ``vllm_e2e``) asks for each
of them once (a kvd hit: 4,095 tokens loaded, the first hit warms the engine's one-token shapes and is
reported apart) and then again (its own prefix cache plus kvd's part-filled last block). The connector's
hooks are wrapped with timers and minor-page-fault counts (``getrusage``): the scheduler's lookup
(``sched_match``), the worker's lease (one RPC, and with ``verify_with_copy: false`` every extent's
xxh3 read; by default the extents are hashed during the copies instead), the per-layer copies into vLLM's blocks (``load_layer``, summed
over the 30 layers), the step's end (release RPC). With ``populate_arena`` on, the populate at the
engine's start is timed apart (the ``engine_start`` row). TTFT is the wall time of one ``LLM.generate``
with ``max_tokens=1``. Every timed request is checked, as ``vllm_e2e`` checks its timed hits: its first
token must be the one the storing engine computed for that prompt, and a kvd hit must have loaded
4,095 tokens; a failed check ends the run without writing a result.

Run: ``python benchmarks/vllm_hit_profile.py [--extra JSON] [--out FILE]`` (4-10 minutes on 2 cores);
writes ``benchmarks/results/vllm_hit_profile.json``. ``--extra``: connector options merged into
``kv_connector_extra_config`` (``'{"populate_arena": true}'``, ``'{"verify_with_copy": false}'``); the
copier's own share of the loads is timed apart (``copier_load_layer``). A profile, not a comparison: no goal is judged on it
(an in-process engine; the issue's TTFT goals are judged on ``vllm_e2e.py``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.vllm_e2e import KVD_CONNECTOR, build_prompts  # noqa: E402
from benchmarks.vllm_e2e_procs import ENGINE_ENV, Engine, KvdDaemon  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "vllm_hit_profile.json"
RUNS = 3  # prompts stored and loaded; the first load warms the engine
ARENA = "2GiB"  # the daemon's host arena (on /dev/shm: benchmarks.vllm_e2e_procs.KvdDaemon)


def timed(cls, name: str, key: str, acc: dict) -> None:
    """Wrap ``cls.name`` to add its wall time (ms) and minor page faults to ``acc[key]``."""
    f = getattr(cls, name)

    def wrapper(*a, **kw):
        t0, f0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        try:
            return f(*a, **kw)
        finally:
            ms, faults = acc.setdefault(key, [0.0, 0])
            acc[key] = [ms + (time.perf_counter() - t0) * 1e3,
                        faults + resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0]

    setattr(cls, name, wrapper)


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0].split()
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def main() -> None:
    import argparse

    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extra", default="{}", help="JSON merged into the connector's kv_connector_extra_config "
                    "(e.g. '{\"populate_arena\": true}')")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    extra = json.loads(args.extra)

    from kvd.testing.models import smollm2_dir

    model = smollm2_dir()
    prompts, _ = build_prompts(AutoTokenizer.from_pretrained(str(model)), (4096,), RUNS)
    names = [f"Q4096_{r}" for r in range(RUNS)]
    root = Path(tempfile.mkdtemp(prefix="kvd-hit-profile-"))
    kvd = KvdDaemon(root / "kvd", ARENA).start()
    conn = {**KVD_CONNECTOR, "kv_connector_extra_config": {"socket": kvd.socket, "namespace": "bench", **extra}}
    try:
        store = Engine("store", root, model, prompts, connector=conn)
        store.wait_ready()
        first_token = {n: store.ask("time", n)["token_ids"][0] for n in names}
        store.close()
        rows = load_engine(model, prompts, names, conn, first_token)
    finally:
        kvd.stop()
    hits = [r for r in rows if r["mode"] == "kvd_hit" and r["name"] != names[0]]
    own = [r for r in rows if r["mode"] == "own_prefix_cache_hit"]
    med = lambda rs, k: statistics.median(r[k][0] if isinstance(r[k], list) else r[k] for r in rs)  # noqa: E731
    res = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores, flags {cpu_flags()}", "thread_settings": {k: ENGINE_ENV[k] for k in (
               "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")}, "tokens": 4096, "rows": rows,
           "median_kvd_hit": {k: med(hits, k) for k in ("ttft_ms", "sched_match", "lease", "load_layer", "end_step")},
           "median_kvd_hit_lease_faults": statistics.median(r["lease"][1] for r in hits),
           "median_own_hit_ttft_ms": med(own, "ttft_ms"),
           "arena_populate_ms_at_start": rows[0].get("arena_populate", [None])[0], "arena": ARENA,
           "connector_extra": extra}
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))


def load_engine(model: Path, prompts: dict, names: list[str], conn: dict, first_token: dict[str, int]) -> list[dict]:
    os.environ.update(ENGINE_ENV)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker's hooks run in this process
    from vllm import LLM, SamplingParams

    from kvd.client.arena import ArenaMapping
    from kvd.connectors.vllm import scheduler as S
    from kvd.connectors.vllm import worker as W
    from kvd.connectors.vllm.strided import StridedCopier

    startup: dict = {}
    timed(ArenaMapping, "_populate", "arena_populate", startup)  # at the engine's start (populate_arena)
    acc: dict = {}
    for cls, name, key in ((W.WorkerIO, "_lease", "lease"), (W.WorkerIO, "load_layer", "load_layer"),
                           (W.WorkerIO, "end_step", "end_step"), (W.WorkerIO, "save_layer", "save_layer"),
                           (S.SchedulerPlanner, "num_new_matched_tokens", "sched_match"),
                           (StridedCopier, "load_layer", "copier_load_layer")):
        timed(cls, name, key, acc)
    llm = LLM(model=str(model), max_model_len=8192, enforce_eager=True, seed=0, enable_prefix_caching=True,
              kv_transfer_config=conn)
    first = SamplingParams(temperature=0.0, max_tokens=1)
    rows = [{"mode": "engine_start", **{k: [round(ms, 2), f] for k, (ms, f) in startup.items()}}]
    print(json.dumps(rows[-1]), flush=True)
    for mode, batch in (("kvd_hit", names), ("own_prefix_cache_hit", names)):
        for n in batch:
            acc.clear()
            time.sleep(1.0)
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            (r,) = llm.generate([{"prompt_token_ids": prompts[n]}], first, use_tqdm=False)
            rows.append({"mode": mode, "name": n, "ttft_ms": round((time.perf_counter() - t0) * 1e3, 1),
                         "cached_tokens": r.num_cached_tokens,
                         "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0,
                         **{k: [round(ms, 2), faults] for k, (ms, faults) in acc.items()}})
            print(json.dumps(rows[-1]), flush=True)
            got = r.outputs[0].token_ids[0]
            if got != first_token[n] or (mode == "kvd_hit" and r.num_cached_tokens != len(prompts[n]) - 1):
                raise SystemExit(f"{mode} of {n}: first token {got} (the storing engine's {first_token[n]}), "
                                 f"{r.num_cached_tokens} cached tokens: wrong KV or no load; no result written")
    return rows


if __name__ == "__main__":
    main()
