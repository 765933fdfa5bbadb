"""Time to first token of real vLLM (CPU build) on SmolLM2-135M-Instruct: recompute vs. kvd vs. vLLM's
ExampleConnector vs. vLLM's own prefix cache, for 1K, 2K, 3,000 and 4K-token prompts (3,000 = 11 chunks +
184 tokens: kvd serves the 11 chunks and the prompt's 128-token tail entry).

Run ``nice python benchmarks/vllm_e2e.py [--runs 5]``; results go to benchmarks/results/vllm_e2e.json and
.png. Engines are subprocesses of this script (``--engine JOB``: vLLM, then one command per stdin line)
against kvd daemons started here (host arena 4 GiB, room for every prompt stored; SSD tier off: the
hot path is measured):

1. ``kvd_store`` (KvdConnector), ``kvd128_store`` (KvdConnector on a second daemon with 128-token chunks,
   vLLM's CPU block size) and ``example_store`` (vLLM's ExampleConnector: one safetensors file per layer
   and request on local disk) serve every prompt Q_L_r once, storing it (``example_store`` also the
   K_L_r prompts), and shut down.
2. Three engines start and stay up together, all with vLLM's prefix caching on (as served in
   production): ``baseline`` (no connector), ``kvd_load`` and ``example_load``. Each serves warm-up
   prompts of every length, then the check prompt Q_L_c with 8 greedy tokens and logprobs: the
   baseline's first sight of it is the reference; the loading engines' outputs (and the storing
   engines') must equal it, logprobs within 0.25 (two recomputing processes differ by up to ~0.08 in
   bf16). Then ``--runs`` rounds time every mode at every length, in a shuffled order, so that all see
   the same load of this shared 2-core machine:
   ``recompute`` (baseline, a prompt nobody has seen), ``prefix_cache`` (baseline, Q_L_c again: vLLM's
   own hit on every full block but the one holding the last token), ``kvd`` and ``example`` (Q_L_r,
   stored in step 1, never seen by this engine: a hit after an engine restart; the example files are
   in the page cache, its best case), ``example_cold`` (K_L_r, its files evicted from the page cache
   just before: read from the disk), ``prefix_cache_kvd_engine`` (vLLM's own hit inside the kvd
   engine) and at 4K ``prefix_cache_3840of4096`` (vLLM's own hit on 15 chunks plus 256 new tokens:
   what kvd cost before its loads could end inside the last chunk, kept for comparison).
3. ``kvd_load`` and ``example_load`` shut down; ``kvd128_load`` starts, and the same rounds time
   ``kvd_chunk128`` against ``prefix_cache_phase3`` (the baseline again, same moments).

TTFT = wall time of ``LLM.generate`` for one prompt with ``max_tokens=1`` on an idle engine; medians.
Asks are 1.5 s apart: vLLM's worker and engine core busy-wait for 1 s after each message, which on
2 cores would slow the next engine asked (measured: +0.3 s per request before this pause).
Prompts are English-like sentences ending in the alphabet (a continuation the model is sure of; see
``kvd.calibrate.tasks.alphabet_document``).

Where kvd's time goes is measured too: the scheduler's lookup RPC and the worker's lease + release RPCs
for Q_4096's 16 chunks (from this process, median of 50), and the arena -> vLLM copy speed the workers
reported to the daemon (``kvd_moved_bytes_total`` / ``kvd_moved_seconds_total`` for loads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ARENA = "4GiB"  # every stored prompt fits (8 x 10,168 tokens x 23 KB = 1.9 GB + warm-ups), so no run misses
LENGTHS = (1024, 2048, 3000, 4096)  # 3000: not a whole number of chunks or blocks (tail entries)
MODES = ("recompute", "kvd", "example", "prefix_cache")
CHECK_TOKENS, LOGPROB_TOL = 8, 0.25
# vLLM's worker and engine core busy-wait (sched_yield) for 1 s after each message before they sleep;
# on 2 cores, an engine that just answered slows whichever engine is asked next. Pause between asks.
PAUSE_S = 1.5
GOALS_4K = {"kvd_speedup_vs_recompute": 5.0, "kvd_speedup_vs_example": 2.0, "kvd_over_prefix_cache_max": 2.0}


# ---- one engine (a subprocess serving commands) -------------------------------------------------


def engine(job_path: str, reply_fd: int) -> None:
    """Start vLLM, then answer one JSON command per stdin line on ``reply_fd`` (vLLM owns stdout)."""
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams

    kw = {"kv_transfer_config": job["connector"]} if job["connector"] else {}
    llm = LLM(model=job["model"], max_model_len=8192, enforce_eager=True, seed=0,
              enable_prefix_caching=job["prefix_caching"], **kw)
    prompts = job["prompts"]
    first = SamplingParams(temperature=0.0, max_tokens=1)
    check = SamplingParams(temperature=0.0, max_tokens=CHECK_TOKENS, logprobs=1)
    reply = os.fdopen(reply_fd, "w", buffering=1)
    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        t0 = time.perf_counter()
        (r,) = llm.generate([{"prompt_token_ids": prompts[cmd["name"]]}], check if cmd["op"] == "check" else first,
                            use_tqdm=False)
        dt = time.perf_counter() - t0
        c = r.outputs[0]
        ans = {"s": dt, "cached": r.num_cached_tokens, "token_ids": list(c.token_ids)}
        if cmd["op"] == "check":
            ans["logprobs"] = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
        reply.write(json.dumps(ans) + "\n")


class Engine:
    """An engine subprocess; ``ask(op, name)`` sends one command and waits for its answer."""

    def __init__(self, name: str, root: Path, model_dir: Path, prompts, *, connector, prefix_caching) -> None:
        self.name, self.root = name, root
        job = {"model": str(model_dir), "connector": connector, "prefix_caching": prefix_caching, "prompts": prompts}
        (root / f"{name}.job.json").write_text(json.dumps(job))
        r, w = os.pipe()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        self.log = open(root / f"{name}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, __file__, "--engine", str(root / f"{name}.job.json"),
                                      "--reply-fd", str(w)], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                     stdout=self.log, stderr=subprocess.STDOUT, pass_fds=(w,), text=True)
        os.close(w)
        self.replies = os.fdopen(r, "r")
        self.t0 = time.monotonic()

    def wait_ready(self) -> None:
        self._read()
        print(f"engine {self.name} ready after {time.monotonic() - self.t0:.0f} s", flush=True)

    def _read(self) -> dict:
        line = self.replies.readline()
        if not line:
            raise RuntimeError(f"engine {self.name} died:\n{(self.root / f'{self.name}.log').read_text()[-4000:]}")
        return json.loads(line)

    def ask(self, op: str, name: str) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, "name": name}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


# ---- the orchestrator ----------------------------------------------------------------------------




def build_prompts(model_dir: Path, runs: int) -> dict[str, list[int]]:
    """Q{L}_{r}: stored by the storing engines, each served once by a loading engine (r = runs: the
    correctness check and vLLM's own repeated hit); R{L}_{r}: new each run (recompute); W{L}: warm-up;
    C{r}: Q4096's first 3,840 tokens and 256 new ones."""
    from transformers import AutoTokenizer

    from kvd.calibrate.tasks import alphabet_document

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    p: dict[str, list[int]] = {}
    for i, L in enumerate(LENGTHS):
        p[f"W{L}"] = alphabet_document(100 + i, L, tok)
        for r in range(runs + 1):
            p[f"Q{L}_{r}"] = alphabet_document(1 + 10 * i + r, L, tok)
            p[f"R{L}_{r}"] = alphabet_document(1000 + 10 * i + r, L, tok)
            p[f"K{L}_{r}"] = alphabet_document(3000 + 10 * i + r, L, tok)
    for r in range(runs):
        p[f"C{r}"] = p[f"Q4096_{runs}"][:3840] + alphabet_document(2000 + r, 256, tok)
    return p


def start_daemon(root: Path, *, chunk_tokens: int = 256) -> tuple[subprocess.Popen, str, int]:
    root.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock = str(root / "kvd.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVD_")}
    env.update({"KVD_HOST__PATH": str(root / "arena"), "KVD_HOST__CAPACITY_BYTES": ARENA,
                "KVD_SSD__ENABLED": "false", "KVD_SSD__PATH": str(root / "ssd"), "PYTHONPATH": str(REPO),
                "KVD_KEYS__CHUNK_TOKENS": str(chunk_tokens)})
    proc = subprocess.Popen([sys.executable, "-m", "kvd.daemon.service", "--socket", sock, "--metrics-addr",
                             f"127.0.0.1:{port}"], env=env, stdout=open(root / "kvd.log", "wb"),
                            stderr=subprocess.STDOUT)
    from kvd.client.client import KvdClient
    from kvd.core.errors import DaemonUnavailable

    deadline = time.monotonic() + 30
    while True:
        try:
            with KvdClient(sock, timeout_s=1.0, register_cuda=False) as c:
                c.health()
            return proc, sock, port
        except DaemonUnavailable:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((root / "kvd.log").read_text()[-3000:]) from None
            time.sleep(0.1)


def same(a: dict, ref: dict) -> bool:
    gap = max(abs(x - y) for x, y in zip(a["logprobs"], ref["logprobs"]))
    return a["token_ids"] == ref["token_ids"] and gap < LOGPROB_TOL


def metric(port: int, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def rpc_profile(sock: str, prompt: list[int]) -> dict[str, float]:
    """Median ms of the scheduler's lookup and the worker's lease + release for ``prompt``'s chunks."""
    from kvd.client.client import KvdClient
    from kvd.core import protocol as P
    from kvd.core.keys import prefix_hashes

    with KvdClient(sock, register_cuda=False) as c:
        (m,) = c.models().models
        hashes = prefix_hashes(prompt, chunk_tokens=256, namespace="bench", fingerprint=m.fingerprint)[:16]
        look, lease = [], []
        for _ in range(50):
            t0 = time.perf_counter()
            c.lookup(P.LookupRequest(fingerprint=m.fingerprint, namespace="bench", prefix_hashes=hashes))
            t1 = time.perf_counter()
            r = c.lease(P.LeaseRequest(fingerprint=m.fingerprint, namespace="bench", hashes=hashes))
            c.release(P.ReleaseRequest(lease_id=r.lease_id))
            t2 = time.perf_counter()
            look.append(t1 - t0)
            lease.append(t2 - t1)
    return {"lookup_rpc_ms": statistics.median(look) * 1e3, "lease_release_rpc_ms": statistics.median(lease) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--reply-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if args.engine:
        engine(args.engine, args.reply_fd)
        return 0
    sys.path.insert(0, str(REPO))
    from kvd.testing.models import smollm2_dir

    model_dir = smollm2_dir()
    runs = args.runs
    prompts = build_prompts(model_dir, runs)
    root = Path(tempfile.mkdtemp(prefix="kvd-vllm-bench-"))
    daemon, sock, port = start_daemon(root / "kvd")
    daemon128, sock128, _ = start_daemon(root / "kvd128", chunk_tokens=128)

    def kvd(socket_path: str) -> dict:
        return {"kv_connector": "KvdConnector", "kv_connector_module_path": "kvd.connectors.vllm",
                "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {"socket": socket_path, "namespace": "bench"}}

    example = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": {"shared_storage_path": str(root / "example")}}
    stored = [f"Q{L}_{r}" for L in LENGTHS for r in range(runs + 1)]
    cold = [f"K{L}_{r}" for L in LENGTHS for r in range(runs)]
    check = [f"Q{L}_{runs}" for L in LENGTHS]
    new = lambda name, conn, pc: Engine(name, root, model_dir, prompts, connector=conn, prefix_caching=pc)  # noqa: E731
    engines: dict[str, Engine] = {}
    try:
        # 1. Three engines store every Q prompt (kvd, kvd with 128-token chunks, ExampleConnector's
        # files; the latter also the K prompts, read back cold) and shut down.
        stores = {"kvd": new("kvd_store", kvd(sock), False), "kvd_chunk128": new("kvd128_store", kvd(sock128), False),
                  "example": new("example_store", example, False)}
        for e in stores.values():
            e.wait_ready()
        store_checks = {m: {q: e.ask("check" if q in check else "warm", q) for q in stored}
                        for m, e in stores.items()}
        folders = example_folders(stores["example"], root / "example", cold)
        for e in stores.values():
            e.close()
        # 2. Three engines (prefix caching on), alive together and asked in turn so that they see the
        # same load of the machine. The loading engines never saw the Q prompts: hits after a restart.
        engines = {"baseline": new("baseline", None, True), "kvd": new("kvd_load", kvd(sock), True),
                   "example": new("example_load", example, True)}
        checks = start_and_check(engines, check)
        times, cached = timed_runs(engines, runs, PHASE2, drop=lambda name: drop_page_cache(folders.get(name)))
        profile = rpc_profile(sock, prompts[f"Q4096_{runs}"])
        load_bytes = metric(port, "kvd_moved_bytes_total", direction="load", tier="host")
        load_s = metric(port, "kvd_moved_seconds_total", direction="load", tier="host")
        # 3. The same kvd hit with 128-token chunks (vLLM's block size), against the same baseline.
        for name in ("kvd", "example"):
            engines.pop(name).close()
        engines["kvd_chunk128"] = new("kvd128_load", kvd(sock128), True)
        checks.update(start_and_check({"kvd_chunk128": engines["kvd_chunk128"]}, check))
        t3, c3 = timed_runs(engines, runs, PHASE3)
        times.update(t3)
        cached.update(c3)
    finally:
        for e in engines.values():
            e.close()
        for d in (daemon, daemon128):
            d.terminate()
            d.wait(30)
    res = summarize(runs, checks, store_checks, times, cached, profile, load_bytes, load_s, root)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vllm_e2e.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, RESULTS / "vllm_e2e.png")
    print(json.dumps({k: v for k, v in res.items() if k.startswith(("ttft_", "goal", "correct"))
                      and "runs" not in k}, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    return 0


def start_and_check(engines: dict[str, Engine], check: list[str]) -> dict[str, dict]:
    for e in engines.values():
        e.wait_ready()
    for e in engines.values():
        for L in LENGTHS:
            e.ask("warm", f"W{L}")
    return {m: {q: e.ask("check", q) for q in check} for m, e in engines.items()}  # baseline: first sight


def example_folders(store: Engine, path: Path, names: list[str]) -> dict[str, list[Path]]:
    """Serve ``names`` on the ExampleConnector store engine; ``name -> the files it wrote``."""
    out = {}
    for name in names:
        before = set(path.iterdir()) if path.exists() else set()
        time.sleep(PAUSE_S)
        store.ask("warm", name)
        out[name] = [f for d in set(path.iterdir()) - before for f in d.iterdir()]
    return out


def drop_page_cache(files: list[Path] | None) -> None:
    """Evict ``files`` from the page cache: the next read comes from the disk."""
    for f in files or []:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# mode -> (engine, prompt): recompute on prompts nobody saw; vLLM's own hit on the check prompt it
# served; kvd / example hits on prompts the storing engines stored; example_cold on files just evicted
# from the page cache; vLLM's own hit in the kvd engine; vLLM's own hit on 15 chunks + 256 new tokens.
PHASE2 = {"recompute": ("baseline", "R{L}_{r}"), "prefix_cache": ("baseline", "Q{L}_{c}"),
          "kvd": ("kvd", "Q{L}_{r}"), "example": ("example", "Q{L}_{r}"), "example_cold": ("example", "K{L}_{r}"),
          "prefix_cache_kvd_engine": ("kvd", "Q{L}_{c}"), "prefix_cache_3840of4096": ("baseline", "C{r}")}
PHASE3 = {"kvd_chunk128": ("kvd_chunk128", "Q{L}_{r}"), "prefix_cache_phase3": ("baseline", "Q{L}_{c}")}


def timed_runs(engines: dict[str, Engine], runs: int, where: dict[str, tuple[str, str]], drop=None):
    """Each run: every mode at every length once, modes in a shuffled order."""
    times: dict[str, dict[int, list[float]]] = {m: {} for m in where}
    cached: dict[str, dict[int, list[int]]] = {m: {} for m in where}
    rng = random.Random(0)
    for r in range(runs):
        for L in LENGTHS:
            order = [m for m in where if L == 4096 or m != "prefix_cache_3840of4096"]
            rng.shuffle(order)
            for mode in order:
                eng, name = where[mode]
                name = name.format(L=L, r=r, c=runs)
                if mode == "example_cold" and drop is not None:
                    drop(name)
                time.sleep(PAUSE_S)
                a = engines[eng].ask("time", name)
                times[mode].setdefault(L, []).append(a["s"])
                cached[mode].setdefault(L, []).append(a["cached"])
        print(f"run {r + 1}/{runs}: " + ", ".join(f"{m} {times[m][4096][-1]:.3f} s" for m in where) + " at 4096",
              flush=True)
    return times, cached


def summarize(runs, checks, store_checks, times, cached, profile, load_bytes, load_s, root) -> dict:
    import torch
    import vllm

    res: dict = {"date": date.today().isoformat(), "machine": machine(), "model": "SmolLM2-135M-Instruct (bf16)",
                 "vllm": vllm.__version__, "torch": torch.__version__, "runs": runs, "chunk_tokens": 256,
                 "block_tokens": 128}
    layout = [x for x in (root / "kvd_load.log").read_text().splitlines() if "KV block layout" in x]
    res["kv_layout"] = layout[0].split("kvd worker: ")[-1] if layout else "unknown"
    for L in LENGTHS:
        q = f"Q{L}_{runs}"
        ref = checks["baseline"][q]
        for m in ("kvd", "kvd_chunk128", "example"):
            res[f"correct_{m}_{L}"] = same(checks[m][q], ref) and same(store_checks[m][q], ref)
    for mode in times:  # the four modes of the issue, and the extra points described in the docstring
        for L, series in times[mode].items():
            res[f"ttft_{mode}_{L}_s"] = statistics.median(series)
            res[f"ttft_runs_{mode}_{L}_s"] = [round(x, 4) for x in series]
            res[f"cached_tokens_{mode}_{L}"] = cached[mode][L][-1]
    t = {m: res[f"ttft_{m}_4096_s"] for m in (*MODES, "example_cold", "kvd_chunk128", "prefix_cache_phase3")}
    res["goal_kvd_speedup_vs_recompute_4096"] = t["recompute"] / t["kvd"]
    res["goal_kvd_speedup_vs_example_4096"] = t["example"] / t["kvd"]
    res["goal_kvd_over_prefix_cache_4096"] = t["kvd"] / t["prefix_cache"]
    res["goals_4096"] = GOALS_4K
    res["goals_met_4096"] = {
        "kvd_speedup_vs_recompute": res["goal_kvd_speedup_vs_recompute_4096"] >= GOALS_4K["kvd_speedup_vs_recompute"],
        "kvd_speedup_vs_example": res["goal_kvd_speedup_vs_example_4096"] >= GOALS_4K["kvd_speedup_vs_example"],
        "kvd_within_2x_of_prefix_cache": res["goal_kvd_over_prefix_cache_4096"] <= GOALS_4K["kvd_over_prefix_cache_max"],
    }
    # The same ratios for the extra points (not the goals, what explains them).
    res["kvd_speedup_vs_example_cold_4096"] = t["example_cold"] / t["kvd"]
    res["kvd_chunk128_speedup_vs_recompute_4096"] = t["recompute"] / t["kvd_chunk128"]
    res["kvd_chunk128_speedup_vs_example_4096"] = t["example"] / t["kvd_chunk128"]
    res["kvd_chunk128_over_prefix_cache_4096"] = t["kvd_chunk128"] / t["prefix_cache_phase3"]
    res.update({k: round(v, 3) for k, v in profile.items()})
    res["load_copy_MBps"] = load_bytes / load_s / 1e6 if load_s else None
    res["load_copy_4096_ms_est"] = 3968 * 23040 / (load_bytes / load_s) * 1e3 if load_s else None
    res["arena_bytes"] = ARENA
    return res


def machine() -> str:
    cpu = platform.processor()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = "AMX" if "amx_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
    return f"{cpu}, {os.cpu_count()} cores (shared), {isa}, {platform.system()} {platform.release()}"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    modes = {"recompute": "#999999", "example_cold": "#f2c28c", "example": "#d98c3f", "kvd": "#2a7ab9",
             "kvd_chunk128": "#8cc0e8", "prefix_cache": "#5aa05a"}
    width = 0.8 / len(modes)
    for i, (mode, color) in enumerate(modes.items()):
        ys = [res[f"ttft_{mode}_{L}_s"] for L in LENGTHS]
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(LENGTHS))]
        label = {"example": "example (page cache warm)", "example_cold": "example (from disk)",
                 "kvd": "kvd (256-token chunks)", "kvd_chunk128": "kvd (128-token chunks)",
                 "prefix_cache": "vLLM prefix cache"}.get(mode, mode)
        ax.bar(xs, ys, width, label=label, color=color)
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(LENGTHS)), [f"{L} tokens" for L in LENGTHS])
    ax.set_yscale("log")
    ax.set_ylabel("time to first token, s (median, log scale)")
    ax.set_title(f"vLLM {res['vllm']} CPU, SmolLM2-135M bf16: TTFT by where the prefix KV comes from",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.text(0.01, 0.01, f"{res['date']} · {res['machine']}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
