"""The GPU tier on a GPU machine (issue 18): CUDA IPC between processes, load speed, restart TTFT, NVML.

Run on the GPU machine: ``python3 benchmarks/gpu_tier.py --out DIR`` (results JSON + PNG in DIR; copy
them to benchmarks/results/gpu_tier.json/.png). Here, without a GPU: ``--cpu-dry-run`` runs every code
path on tiny shapes (CPU tensors, the in-process stand-in for CUDA IPC, the daemon in a thread, the
kernels through the Triton interpreter); its numbers mean nothing.

What runs (GPU mode; Llama-3-8B's KV shape: 32 layers, 8 KV heads, head_dim 128, bf16, 32K tokens):

1. a kvd daemon (its own process) with ``[gpu] enabled``: a pool of GPU memory shared by CUDA IPC;
2. engine A (a process): its KV in vLLM's GPU layout (``LBNHC``, blocks of 16 tokens, a shuffled
   block table), seeded random bf16; it reserves 128 entries of 256 tokens in the GPU tier, gathers
   them straight into the pool with the gather kernel (``kvd.client.paged.store_paged``), commits,
   and exits;
3. engine B (another process): registers (mapping and cudaHostRegister-ing the arena, as any engine),
   loads a random-weight Llama-8B-shaped model (transformers, bf16, SDPA) and warms it (a 512-token
   prompt, and one token over a 32K cache of random KV, so the model's one-time costs stay out), then:
   - ``restart_ttft_gpu_tier_s``: its first request for the 32K prefix + 1 token: lookup, lease
     (mapping the pool by CUDA IPC on first use), copy to the model's cache, one forward, argmax;
   - ``gpu_tier_load_GBps``: the prefix scattered from the pool into B's own paged KV (LBNHC) with the
     scatter kernel, bytes / time (median of repeats), against ``hbm_copy_GBps``: a plain device copy
     of as many bytes (bytes copied / time; the DRAM traffic is twice that). Bytes verified against
     the KV regenerated from A's seed, by plain torch indexing;
   - the prefix evicted from the GPU tier (``kvctl evict --tier gpu``: demoted to the arena, checked
     against the commit checksum on the way), then ``restart_ttft_host_tier_s`` and
     ``host_tier_load_GBps`` (arena -> paged KV, the product path: the scatter kernel reading the
     cudaHostRegister-ed arena in place; staging each extent through device memory first beside)
     against ``pinned_memcpy_GBps`` (a cudaMemcpy of as many bytes from pinned memory); bytes verified
     again. The gpu tier's load is also timed without the kernels' 16-byte alignment hint;
   - ``recompute_ttft_s``: the same prompt computed from scratch;
4. ``/metrics`` scraped: the NVML series (``kvd_gpu_memory_used_bytes`` ...) and the gpu tier's gauges.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

if "--cpu-dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kvd.client.client import KvdClient  # noqa: E402
from kvd.client.gpu_pool import GpuPools  # noqa: E402
from kvd.client.paged import load_paged, store_paged  # noqa: E402
from kvd.client.prefix import register  # noqa: E402
from kvd.client.transfer import open_lease, reserve  # noqa: E402
from kvd.core import protocol as P  # noqa: E402
from kvd.core.headmap import HeadMap  # noqa: E402
from kvd.core.keys import ModelSpec  # noqa: E402
from kvd.testing.models import random_llama  # noqa: E402

CHUNK, BLOCK, LAYOUT = 256, 16, "LBNHC"
NAMESPACE = "bench"


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head_dim: int
    q_heads: int
    hidden: int
    intermediate: int
    vocab: int
    tokens: int
    window: int

    @property
    def kv_bytes(self) -> int:
        return self.layers * 2 * self.kv_heads * self.tokens * self.head_dim * 2


LLAMA_8B = Shape(layers=32, kv_heads=8, head_dim=128, q_heads=32, hidden=4096, intermediate=14336, vocab=128256,
                 tokens=32768, window=4096)
TINY = Shape(layers=2, kv_heads=2, head_dim=16, q_heads=4, hidden=64, intermediate=128, vocab=512, tokens=1024,
             window=256)


def log(msg: str) -> None:
    print(f"[gpu_tier {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def spec_of(s: Shape) -> ModelSpec:
    return ModelSpec("bench-llama-8b-shape", num_layers=s.layers, num_kv_heads=s.kv_heads, head_dim=s.head_dim,
                     kv_dtype="bfloat16", rope={"rope_theta": 500000.0})


def head_map(s: Shape) -> HeadMap:
    """A quarter of each layer's KV heads global, the rest local (sink 4, a window): two extents per entry."""
    g = max(1, s.kv_heads // 4)
    return HeadMap.from_classes(spec_of(s).model_id, [[h < g for h in range(s.kv_heads)]] * s.layers, sink=4,
                                window=s.window)


def token_ids(s: Shape, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, s.vocab, (s.tokens + 1,), generator=g).tolist()  # the prefix + the next token


def expected_layer(s: Shape, layer: int, device) -> torch.Tensor:
    """Engine A's KV of ``layer``, ``[2, H, T, D]`` bf16, regenerated bit for bit from its seed."""
    g = torch.Generator(device=device).manual_seed(1000 + layer)
    return torch.randn(2, s.kv_heads, s.tokens, s.head_dim, generator=g, device=device).to(torch.bfloat16)


def paged_kv(s: Shape, num_blocks: int, device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """vLLM's LBNHC: per layer physically ``[blocks, N, H, 2D]``; the kernels' view is ``[blocks, H, N, 2D]``."""
    phys = [torch.zeros(num_blocks, BLOCK, s.kv_heads, 2 * s.head_dim, dtype=torch.bfloat16, device=device)
            for _ in range(s.layers)]
    return phys, [p.permute(0, 2, 1, 3) for p in phys]


def block_table(s: Shape, num_blocks: int, seed: int, device) -> torch.Tensor:
    """``[entries, blocks per entry]``: each chunk's blocks, from a shuffled pool (as a busy engine's)."""
    g = torch.Generator().manual_seed(seed)
    per = CHUNK // BLOCK
    return torch.randperm(num_blocks, generator=g)[: s.tokens // BLOCK].reshape(-1, per).to(device)


def cells(kv: torch.Tensor) -> torch.Tensor:
    """``[2, H, T, D]`` -> ``[T, H, 2D]``: each token's K|V per head, as LBNHC keeps a block's rows."""
    return torch.cat([kv[0].transpose(0, 1), kv[1].transpose(0, 1)], dim=-1)


def verify(s: Shape, phys: list[torch.Tensor], ids: torch.Tensor, device) -> bool:
    ok = True
    for layer in range(s.layers):
        got = phys[layer][ids.reshape(-1)].reshape(s.tokens, s.kv_heads, 2 * s.head_dim)
        ok &= bool(torch.equal(got, cells(expected_layer(s, layer, device))))
    return ok


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


# ---- engine A: store ------------------------------------------------------------------------------


def engine_store(sock: str, s: Shape, device, pools: GpuPools, use_triton: bool) -> dict:
    client = KvdClient(sock, timeout_s=600, register_cuda=False)  # stores go to the GPU tier: no arena copies
    h = register(client, spec_of(s), head_map(s), namespace=NAMESPACE, gpu=pools)
    num_blocks = s.tokens // BLOCK + s.tokens // BLOCK // 4
    phys, layers = paged_kv(s, num_blocks, device)
    ids = block_table(s, num_blocks, seed=11, device=device)
    for layer in range(s.layers):  # "prefill": the engine's KV in its own paged layout
        phys[layer][ids.reshape(-1)] = cells(expected_layer(s, layer, device)).reshape(-1, BLOCK, s.kv_heads,
                                                                                       2 * s.head_dim)
    toks = token_ids(s)[: s.tokens]
    entries = [P.ReserveEntry(hash=x, num_tokens=CHUNK, start_token=i * CHUNK, end_token=s.tokens)
               for i, x in enumerate(h.hashes(toks))]
    t0 = time.perf_counter()
    res = reserve(h, entries)
    t_reserve = time.perf_counter() - t0
    if res.num_reserved != len(entries):
        raise RuntimeError(f"engine A: {res.num_reserved} of {len(entries)} entries reserved ({res.states[:4]}...)")
    views = [res.entry(i) for i in range(len(entries))]
    pool = pools.pool(res.gpu_pool).untyped_storage().data_ptr() if res.gpu_pool is not None else None
    on_gpu = all(v.view.untyped_storage().data_ptr() == pool for e in views for v in e.extents)
    store_paged(views[:1], layers, ids[:1], layout=LAYOUT, use_triton=use_triton)  # warm: kernel compile
    t0 = time.perf_counter()
    store_paged(views, layers, ids, layout=LAYOUT, use_triton=use_triton)
    t_copy = time.perf_counter() - t0
    t0 = time.perf_counter()
    committed = res.commit(transfer_s=t_copy)
    t_commit = time.perf_counter() - t0
    client.close()
    return {"entries": len(committed), "stored_in_gpu_pool": on_gpu, "reserve_s": t_reserve,
            "store_copy_s": t_copy, "store_GBps": s.kv_bytes / t_copy / 1e9, "commit_s": t_commit}


# ---- engine B: load, restart TTFT ----------------------------------------------------------------


def build_model(s: Shape, device):
    return random_llama(device, seed=0, vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                        num_hidden_layers=s.layers, num_attention_heads=s.q_heads, num_key_value_heads=s.kv_heads,
                        head_dim=s.head_dim, max_position_embeddings=max(8192, 2 * s.tokens), rope_theta=500000.0)


class Engine:
    """Engine B: one kvd client with the GPU pools mapped, a model, and a KV buffer in its cache layout."""

    def __init__(self, sock: str, s: Shape, device, pools: GpuPools) -> None:
        self.s, self.device = s, device
        t0 = time.perf_counter()
        self.client = KvdClient(sock, timeout_s=600, register_cuda=device.type == "cuda")
        self.h = register(self.client, spec_of(s), head_map(s), namespace=NAMESPACE, gpu=pools)
        self.register_s = time.perf_counter() - t0
        self.arena_registered = self.client.arena().cuda_registered
        self.toks = token_ids(s)
        self.hashes = self.h.hashes(self.toks[: s.tokens])
        self.model = None
        self.kvbuf = torch.empty(s.layers, 2, s.kv_heads, s.tokens, s.head_dim, dtype=torch.bfloat16, device=device)

    def warm_decode(self) -> None:
        """One forward of a token over a cache as long as the prefix (random KV, not kvd's): the
        model's one-time costs for this shape stay out of the first measured request."""
        from transformers import DynamicCache

        s = self.s
        self.kvbuf.normal_()
        cache = DynamicCache(ddp_cache_data=[(self.kvbuf[i, 0][None], self.kvbuf[i, 1][None])
                                             for i in range(s.layers)], config=self.model.config)
        with torch.no_grad():
            self.model(input_ids=torch.tensor([[1]], device=self.device), past_key_values=cache,
                       position_ids=torch.tensor([[s.tokens]], device=self.device), use_cache=True, logits_to_keep=1)
        sync(self.device)

    def ttft_cached(self, verify: bool = True) -> tuple[float, set[str]]:
        """First token of prompt = prefix + 1 token, with the prefix's KV loaded from kvd."""
        from transformers import DynamicCache

        s = self.s
        sync(self.device)
        t0 = time.perf_counter()
        hits = self.client.lookup(P.LookupRequest(fingerprint=self.h.fingerprint, namespace=NAMESPACE,
                                                  prefix_hashes=self.hashes, prefetch=True)).num_prefix_hits
        if hits != len(self.hashes):
            raise RuntimeError(f"lookup found {hits} of {len(self.hashes)} chunks")
        with open_lease(self.h, self.hashes, verify=verify) as lease:
            if lease.num_leading != len(self.hashes):
                raise RuntimeError(f"lease: {lease.states[:4]}")
            tiers = {x.tier for e in lease._answers for x in e.extents}
            for i, view in enumerate(lease.usable()):
                view.read_into(self.kvbuf, i * CHUNK)
        cache = DynamicCache(ddp_cache_data=[(self.kvbuf[i, 0][None], self.kvbuf[i, 1][None])
                                             for i in range(s.layers)], config=self.model.config)
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([[self.toks[s.tokens]]], device=self.device),
                             past_key_values=cache, position_ids=torch.tensor([[s.tokens]], device=self.device),
                             use_cache=True, logits_to_keep=1)
            out.logits[0, -1].argmax().item()
        sync(self.device)
        return time.perf_counter() - t0, tiers

    def ttft_recompute(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([self.toks], device=self.device), use_cache=False,
                             logits_to_keep=1)
            out.logits[0, -1].argmax().item()
        sync(self.device)
        return time.perf_counter() - t0

    def load_paged_timed(self, repeats: int, use_triton: bool, *variants: dict) -> list[dict]:
        """Each variant's load (``load_paged`` keyword arguments) timed ``repeats`` times, the variants
        alternating within one lease so that whatever else the machine does falls on all of them alike
        (the first runs timed them one after the other, and their order moved the figures by up to 30%)."""
        s = self.s
        variants = variants or ({},)
        num_blocks = s.tokens // BLOCK + s.tokens // BLOCK // 3
        phys, layers = paged_kv(s, num_blocks, self.device)
        ids = block_table(s, num_blocks, seed=22, device=self.device)
        with open_lease(self.h, self.hashes) as lease:
            views = list(lease.usable())
            tiers = sorted({x.tier for e in lease._answers for x in e.extents})
            ok = True
            for kw in variants:  # warm (kernel compile), then the bytes checked for each variant
                for p in phys:
                    p.zero_()
                load_paged(views, layers, ids, layout=LAYOUT, use_triton=use_triton, **kw)
                ok &= verify(s, phys, ids, self.device)
            times: list[list[float]] = [[] for _ in variants]
            for _ in range(repeats):
                for i, kw in enumerate(variants):
                    times[i] += timed(lambda kw=kw: load_paged(views, layers, ids, layout=LAYOUT,
                                                                use_triton=use_triton, **kw), self.device, 1)
            ok &= verify(s, phys, ids, self.device)
            split = [time_split(lambda kw=kw: load_paged(views, layers, ids, layout=LAYOUT, use_triton=use_triton,
                                                          **kw), self.device) for kw in variants]
        out = []
        for ts, (kernel_s, host) in zip(times, split):
            t = statistics.median(ts)
            out.append({"GBps": s.kv_bytes / t / 1e9, "s": t, "times_s": ts, "verified": ok, "tiers": tiers,
                        "kernel_s": kernel_s, "host_top": host})
        return out


def time_split(fn, device) -> tuple[float, list[str]]:
    """Where one call's time goes, outside the timed runs: the copy kernels' device time (torch's
    profiler) and the host functions that took longest (cProfile, cumulative)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    kernel_s = 0.0  # the dry run's copies run on the CPU: no device time to take apart
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        kernel_s = sum(e.device_time_total for e in prof.key_averages() if "gather_scatter" in e.key) / 1e6
    pr = cProfile.Profile()
    pr.enable()
    fn()
    sync(device)
    pr.disable()
    st = pstats.Stats(pr).sort_stats("cumulative")
    top = [f"{st.stats[k][3] * 1e3:.3f} ms {k[2]} ({Path(k[0]).name}:{k[1]})" for k in st.fcn_list[:14]]
    return kernel_s, top


def copy_ceilings(s: Shape, device, repeats: int) -> dict:
    n = s.kv_bytes
    a = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    dev = statistics.median(timed(lambda: b.copy_(a), device, repeats))
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=device.type == "cuda").fill_(0x5A)  # memcpy: data-blind
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    h2d = statistics.median(timed(lambda: dst.copy_(pinned, non_blocking=True), device, repeats))
    return {"hbm_copy_GBps": n / dev / 1e9, "pinned_memcpy_GBps": n / h2d / 1e9}


def engine_load(sock: str, s: Shape, device, pools: GpuPools, use_triton: bool, repeats: int) -> dict:
    out: dict = {"errors": []}

    def section(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failed section must not lose the others' figures
            import traceback

            traceback.print_exc()
            out["errors"].append(f"{name}: {type(e).__name__}: {e}")

    eng = Engine(sock, s, device, pools)
    out["register_s"], out["arena_cuda_registered"] = eng.register_s, eng.arena_registered
    log(f"engine B registered in {eng.register_s:.2f} s (arena cudaHostRegister: {eng.arena_registered})")
    t0 = time.perf_counter()
    eng.model = build_model(s, device)
    out["model_build_s"] = time.perf_counter() - t0
    with torch.no_grad():  # warm the model's kernels on an unrelated short prompt (not kvd)
        eng.model(input_ids=torch.randint(0, s.vocab, (1, 512), device=device), use_cache=False, logits_to_keep=1)
    eng.warm_decode()
    log(f"model built in {out['model_build_s']:.1f} s")

    def gpu_ttft():
        first, tiers = eng.ttft_cached()
        warm = [eng.ttft_cached()[0] for _ in range(repeats)]
        out.update(restart_ttft_gpu_tier_s=first, ttft_gpu_tier_warm_s=statistics.median(warm), ttft_gpu_tiers=sorted(tiers))
        log(f"TTFT gpu tier: first {first:.3f} s, warm {statistics.median(warm):.3f} s, tiers {sorted(tiers)}")

    def gpu_load():
        r, u = eng.load_paged_timed(4 * repeats, use_triton, {}, {"aligned": False})
        out.update(gpu_tier_load_GBps=r["GBps"], gpu_tier_load_s=r["s"], gpu_load_verified=r["verified"] and u["verified"],
                   gpu_load_tiers=r["tiers"], gpu_tier_load_unaligned_GBps=u["GBps"],
                   gpu_tier_load_kernel_s=r["kernel_s"], gpu_tier_load_host_profile=r["host_top"])
        log("one load's host time (cProfile, cumulative):\n    " + "\n    ".join(r["host_top"]))
        log(f"gpu tier load {r['GBps']:.1f} GB/s ({r['s'] * 1e3:.1f} ms; {u['GBps']:.1f} without the alignment "
            f"hint), verified {out['gpu_load_verified']}, {r['tiers']}")

    def ceilings():
        out.update(copy_ceilings(s, device, repeats))
        log(f"HBM copy {out['hbm_copy_GBps']:.1f} GB/s, pinned H2D {out['pinned_memcpy_GBps']:.1f} GB/s")

    def evict():
        t0 = time.perf_counter()
        r = eng.client.evict(P.EvictRequest(tier="gpu", namespace=NAMESPACE))
        out.update(evict_gpu_entries=r.count, evict_gpu_s=time.perf_counter() - t0)
        log(f"evicted {r.count} entries from the gpu tier in {out['evict_gpu_s']:.2f} s")

    def host_ttft():
        first, tiers = eng.ttft_cached()
        warm = [eng.ttft_cached()[0] for _ in range(repeats)]
        nover = [eng.ttft_cached(verify=False)[0] for _ in range(repeats)]
        out.update(restart_ttft_host_tier_s=first, ttft_host_tier_warm_s=statistics.median(warm),
                   ttft_host_tier_noverify_warm_s=statistics.median(nover), ttft_host_tiers=sorted(tiers))
        log(f"TTFT host tier: first {first:.3f} s, warm {statistics.median(warm):.3f} s, tiers {sorted(tiers)}")

    def host_load():
        # the product's default (zero copy from the pinned arena) beside staging through device memory
        r, st = eng.load_paged_timed(4 * repeats, use_triton, {}, {"zero_copy": False})
        out.update(host_tier_load_GBps=r["GBps"], host_tier_load_s=r["s"], host_load_verified=r["verified"],
                   host_load_tiers=r["tiers"], host_tier_load_staged_GBps=st["GBps"],
                   host_staged_verified=st["verified"])
        log(f"host tier load {r['GBps']:.1f} GB/s zero copy, {st['GBps']:.1f} GB/s staged, verified "
            f"{r['verified'] and st['verified']}, {r['tiers']}")

    def recompute():
        times = [eng.ttft_recompute() for _ in range(2)]
        out.update(recompute_ttft_s=min(times), recompute_ttft_runs_s=times)
        log(f"TTFT recompute {min(times):.3f} s")

    for name, fn in (("gpu_ttft", gpu_ttft), ("gpu_load", gpu_load), ("ceilings", ceilings), ("evict", evict),
                     ("host_ttft", host_ttft), ("host_load", host_load), ("recompute", recompute)):
        section(name, fn)
    out["bytes_verified"] = bool(out.get("gpu_load_verified") and out.get("host_load_verified")
                                 and out.get("host_staged_verified"))
    eng.client.close()
    return out


# ---- the daemon, the engine processes, the results ----------------------------------------------


@dataclass(frozen=True)
class Sizes:
    pool_bytes: int
    host_bytes: int
    slot_bytes: int


def sizes_for(s: Shape, dry: bool) -> Sizes:
    slot = (16 << 10) if dry else (2 << 20)
    room = -(-s.kv_bytes * 5 // 4 // slot) * slot  # the prefix and a quarter more: under the relief watermark
    return Sizes(room, room, slot)


def arena_dir(nbytes: int) -> Path:
    """/dev/shm when it has room for the arena, else /tmp (the arena is allocated in full at start)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > nbytes + (1 << 30):
        return shm
    return Path("/tmp")


def free_port() -> int:
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


class Daemon:
    """The kvd daemon: its own process (GPU mode) or a thread with the in-process stand-in (dry run)."""

    def __init__(self, root: Path, sz: Sizes, dry: bool) -> None:
        self.root, self.dry, self.port = root, dry, free_port()
        self.socket = str(root / "kvd.sock")
        self.log = root / "kvd.log"
        arena = arena_dir(sz.host_bytes) / f"kvd-bench-{os.getpid()}.arena"
        sections = {"gpu": {"enabled": True, "capacity_bytes": sz.pool_bytes, "slot_bytes": sz.slot_bytes},
                    "host": {"path": str(arena), "capacity_bytes": sz.host_bytes, "slot_bytes": sz.slot_bytes,
                             "lease_ttl_s": 600.0, "reservation_ttl_s": 600.0},
                    "ssd": {"enabled": False}, "daemon": {"metrics_addr": f"127.0.0.1:{self.port}"}}
        if dry:
            from kvd.core.gpu_ipc import InProcessIpc
            from tests.daemon_thread import ThreadDaemon, settings_for

            self.ipc = InProcessIpc()  # the stand-in for CUDA IPC: daemon and engines share this process
            self.thread = ThreadDaemon(settings_for(root, **sections), gpu_ipc=self.ipc).start()
            self.socket = self.thread.socket
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVD_")}
        for sec, kv in sections.items():
            for k, v in kv.items():
                if sec != "daemon":
                    env[f"KVD_{sec.upper()}__{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "kvd.daemon.service", "--socket", self.socket, "--metrics-addr",
               f"127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        c = KvdClient(self.socket, timeout_s=2.0, register_cuda=False)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvd exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                c.health()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kvd did not come up:\n{self.log.read_text()[-3000:]}") from None
                time.sleep(0.1)
        c.close()

    def pools(self) -> GpuPools:
        return GpuPools(self.ipc) if self.dry else GpuPools()

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.dry:
            self.thread.stop()
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_role(role: str, sock: str, repeats: int, tokens: int | None) -> dict:
    """Engine A or B as a process of its own (GPU mode): its last line is ``RESULT <json>``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--socket", sock, "--repeats", str(repeats)]
    if tokens:
        cmd += ["--tokens", str(tokens)]
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = p.stdout.splitlines()
    for line in lines:
        if not line.startswith("RESULT "):
            print(f"  [{role}] {line}", flush=True)
    found = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
    if p.returncode != 0 or not found:
        raise RuntimeError(f"engine {role} exited with {p.returncode}")
    return found[-1]


def metric_lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = ["gpu tier\nload", "HBM copy", "host tier load\n(zero copy)", "host tier\nstaged", "pinned\nmemcpy"]
    vals = [r.get(k) or 0 for k in ("gpu_tier_load_GBps", "hbm_copy_GBps", "host_tier_load_GBps",
                                     "host_tier_load_staged_GBps", "pinned_memcpy_GBps")]
    a.bar(names, vals, color=["tab:green", "tab:gray", "tab:blue", "tab:cyan", "tab:gray"])
    a.set_ylabel("GB/s (bytes copied / s)")
    a.set_yscale("log")
    a.set_title(f"32K-token prefix ({r['kv_bytes'] / 2**30:.1f} GiB of KV) into paged KV")
    for i, v in enumerate(vals):
        a.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    names = ["gpu tier", "host tier", "recompute"]
    vals = [r.get(k) or 0 for k in ("restart_ttft_gpu_tier_s", "restart_ttft_host_tier_s", "recompute_ttft_s")]
    b.bar(names, vals, color=["tab:green", "tab:blue", "tab:red"])
    b.set_ylabel("seconds")
    b.set_title("restart TTFT, 8B-shaped model (first request)")
    for i, v in enumerate(vals):
        b.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"kvd GPU tier on {r['device']} ({r['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"), help="directory for gpu_tier.json/.png")
    ap.add_argument("--cpu-dry-run", action="store_true", help="every path on tiny CPU shapes; numbers mean nothing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=None, help="prefix length (default 32768; tiny: 1024)")
    ap.add_argument("--role", choices=["store", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--socket", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dry = args.cpu_dry_run
    shape = TINY if dry else LLAMA_8B
    if args.tokens:
        shape = Shape(**{**asdict(shape), "tokens": args.tokens})
    device = torch.device("cpu" if dry else "cuda")
    if args.role:  # engine A or B, in its own process (GPU mode)
        fn = engine_store if args.role == "store" else engine_load
        extra = () if args.role == "store" else (args.repeats,)
        print("RESULT " + json.dumps(fn(args.socket, shape, device, GpuPools(), True, *extra)), flush=True)
        return 0
    import tempfile

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="kvd-gpu-tier-"))
    sz = sizes_for(shape, dry)
    r: dict = {"date": date.today().isoformat(), "mode": "cpu-dry-run" if dry else "gpu",
               "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(0), "torch": torch.__version__,
               "shape": asdict(shape), "kv_bytes": shape.kv_bytes, "sizes": asdict(sz), "layout": LAYOUT}
    log(f"{r['device']}: {shape.tokens} tokens, {shape.kv_bytes / 2**30:.2f} GiB of KV; pool and arena "
        f"{sz.pool_bytes >> 20} MiB each")
    d = Daemon(root, sz, dry)
    try:
        if dry:
            r["store"] = engine_store(d.socket, shape, device, d.pools(), True)
            r.update(engine_load(d.socket, shape, device, d.pools(), True, 2))
        else:
            r["store"] = run_role("store", d.socket, args.repeats, args.tokens)
            log(f"engine A stored {r['store']['entries']} entries in the GPU pool: {r['store']}")
            r.update(run_role("load", d.socket, args.repeats, args.tokens))
        text = d.scrape()
        nvml = metric_lines(text, "kvd_gpu_memory_used_bytes{") + metric_lines(text, "kvd_gpu_utilization_ratio{")
        r["nvml_series_present"] = bool(metric_lines(text, "kvd_gpu_memory_used_bytes{"))
        r["metrics_excerpt"] = nvml + metric_lines(text, 'kvd_tier_capacity_bytes{tier="gpu"}') + \
            metric_lines(text, 'kvd_checksum_failures_total{tier="gpu"}') + \
            metric_lines(text, 'kvd_demotions_total{head_class="global",tier="host"}')
    finally:
        d.stop()
        if not dry:
            shutil.copy(d.log, out_dir / "gpu_tier.daemon.log")
    r["bytes_verified"] = bool(r.get("bytes_verified") and r["store"].get("stored_in_gpu_pool"))
    for k, ceiling, goal in (("gpu_tier_load_GBps", "hbm_copy_GBps", 0.6),
                             ("host_tier_load_GBps", "pinned_memcpy_GBps", 0.8)):
        if r.get(k) and r.get(ceiling):
            r[f"{k}_ratio"] = r[k] / r[ceiling]
            r[f"{k}_goal"] = f">= {goal} x {ceiling}"
            r[f"{k}_goal_met"] = r[k] / r[ceiling] >= goal
    name = "gpu_tier.dry_run" if dry else "gpu_tier"
    (out_dir / f"{name}.json").write_text(json.dumps(r, indent=2) + "\n")
    plot(r, out_dir / f"{name}.png")
    keys = ["gpu_tier_load_GBps", "gpu_tier_load_unaligned_GBps", "hbm_copy_GBps", "host_tier_load_GBps",
            "host_tier_load_staged_GBps", "pinned_memcpy_GBps", "restart_ttft_gpu_tier_s", "restart_ttft_host_tier_s",
            "recompute_ttft_s", "ttft_gpu_tier_warm_s", "ttft_host_tier_warm_s", "ttft_host_tier_noverify_warm_s",
            "nvml_series_present", "bytes_verified"]
    for k in keys:
        v = r.get(k)
        print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
    print("errors:", r.get("errors"))
    return 0 if not r.get("errors") else 1


if __name__ == "__main__":
    sys.exit(main())
