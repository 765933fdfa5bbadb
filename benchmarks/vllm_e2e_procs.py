"""The processes of ``benchmarks/vllm_e2e.py``: vLLM engines, the kvd daemon, the LMCache server, and
the block probe that reads vLLM's KV blocks back for the bit-exactness check.

**Engines.** Each engine is a subprocess running this file with ``--engine JOB``: it starts vLLM, then
answers one JSON command per stdin line on a pipe (vLLM owns stdout). Every engine, with a connector
or without, gets the same thread settings (``THREAD_ENV``) and the same environment otherwise
(``ENGINE_ENV``). Why they must be pinned: vLLM 0.32's CPU build (``vllm/utils/ompmultiprocessing.py``,
``OMPProcessManager``) reserves ``local_world_size`` more CPUs whenever ``kv_transfer_config`` is set
("reserve at one more core for nixl_connector under p/d case"), so with the default
``VLLM_CPU_OMP_THREADS_BIND=auto`` an engine with a connector gets other OpenMP cores and thread
counts than one without (on 2 cores: 2 threads vs 1). ``VLLM_CPU_OMP_THREADS_BIND=0`` gives every
engine one OpenMP thread on core 0 (the user-defined list ignores the reserve) and
``VLLM_CPU_NUM_OF_RESERVED_CPU=1`` overrides the reserve count itself, which is then equal too (vLLM
only warns that it is below its minimum). Nothing else in the CPU platform, worker or model runner
reads ``kv_transfer_config`` (checked in the installed source: the other use picks a Mamba conv-state
layout for NIXL only). Each engine's log line "OpenMP thread binding info" is parsed and recorded.

**Block probe** (a test hook, used by the correctness gate only). ``ProbedKvdConnector`` is
``KvdConnector`` plus one thing: in the worker it remembers the load and save specs of the step it
is bound to (one dict update per step). ``probe_blocks``, sent to the worker with vLLM's own
``LLM.collective_rpc``, takes the last request's specs and returns the xxh3 digest of the raw bytes
of every (layer, KV block) it loaded or saved, in vLLM's own packing (``kv_caches`` as vLLM handed
them to ``register_kv_caches``): read straight from the engine's KV cache, not through kvd's copiers.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LMCACHE_PYTHON = REPO / ".venv-lmcache" / "bin" / "python"  # `make lmcache-venv`
# The same for every engine of a comparison, connector or not (see the module docstring).
THREAD_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
ENGINE_ENV = {**THREAD_ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
              # collective_rpc with a function (probe_blocks) needs pickling between vLLM's processes
              "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "LMCACHE_TRACK_USAGE": "false"}
CHECK_TOKENS = 8


# ---- inside an engine ------------------------------------------------------------------------------

_PROBE: dict[str, object] = {}  # in the worker: the last step's load spec and the saves per request


@functools.cache
def _probed_connector():
    from kvd.connectors.vllm.connector import KvdConnector

    class ProbedKvdConnector(KvdConnector):
        """``KvdConnector`` that remembers the last load and the saves of each request (worker side)."""

        def bind_connector_metadata(self, connector_metadata) -> None:
            super().bind_connector_metadata(connector_metadata)
            plan = getattr(connector_metadata, "plan", None)
            if self.worker is None or plan is None:
                return
            _PROBE["worker"] = self.worker
            for spec in plan.loads:
                _PROBE["load"] = spec
            for spec in plan.saves:
                saves = _PROBE.setdefault("saves", {})
                if _PROBE.get("save_req") != spec.req_id:
                    saves.clear()
                    _PROBE["save_req"] = spec.req_id
                saves[spec.first_chunk] = spec

    return ProbedKvdConnector


def __getattr__(name: str):  # vLLM's factory does getattr(module, kv_connector)
    if name == "ProbedKvdConnector":
        return _probed_connector()
    raise AttributeError(name)


def probe_blocks(worker, kind: str, upto: int) -> dict:
    """Run in the vLLM worker: digests of the blocks of the last ``kind`` ("load" or "save") that
    hold tokens ``[0, upto)``: xxh3-64 of each whole block's raw bytes (vLLM's packing), and of a last
    block ``upto`` ends inside, the loaded tokens' K and V only (read through the probed layout), since
    its other slots hold what the engine computed itself.

    ``{"end": tokens covered from 0, "start": first loaded token, "hashes": entry keys, "sizes":
    their tokens, "digests": [layer][block]}``."""
    import torch
    import xxhash

    from kvd.client.views import numpy_view
    from kvd.connectors.vllm.plan import entry_sizes

    io = _PROBE.get("worker")
    if io is None:
        return {"error": "no kvd worker in this engine"}
    if kind == "load":
        spec = _PROBE.get("load")
        if spec is None:
            return {"error": "nothing loaded yet"}
        start, end, block_ids = spec.start, spec.end, spec.block_ids
        hashes, sizes = list(spec.hashes), entry_sizes(spec.hashes, io.session.handle().chunk_tokens, spec.last_tokens)
    else:
        saves = _PROBE.get("saves") or {}
        if not saves:
            return {"error": "nothing saved yet"}
        hashes, sizes, block_ids, c = [], [], (), io.session.handle().chunk_tokens
        for first in sorted(saves):
            s = saves[first]
            hashes += s.hashes
            sizes += entry_sizes(s.hashes, c, s.last_tokens)
            block_ids = max(block_ids, s.block_ids, key=len)
        start, end = 0, sum(sizes)
    end = min(end, upto)
    blocks = io._kernel_blocks(block_ids, 0, end)
    lay = io.copier.layout
    part = end % lay.block_tokens
    digests = []
    for kv in io.kv_caches.values():
        flat = torch.as_strided(kv, (kv.shape[0], kv[0].numel()), (kv.stride(0), 1))
        row = [xxhash.xxh3_64_hexdigest(numpy_view(flat[b]).tobytes()) for b in blocks]
        if part:  # canonical [H, 2, N, D] of the last block, its loaded tokens only
            canon = flat[blocks[-1]][lay.to_canon].view(lay.num_heads, 2, lay.block_tokens, lay.head_dim)
            row[-1] = xxhash.xxh3_64_hexdigest(numpy_view(canon[:, :, :part].contiguous()).tobytes())
        digests.append(row)
    return {"start": start, "end": end, "hashes": hashes, "sizes": sizes, "digests": digests}


def engine_main(job_path: str, reply_fd: int) -> None:
    """Start vLLM, then answer one JSON command per stdin line on ``reply_fd``."""
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams

    kw = {"kv_transfer_config": job["connector"]} if job["connector"] else {}
    llm = LLM(model=job["model"], max_model_len=8192, enforce_eager=True, seed=0, enable_prefix_caching=True, **kw)
    prompts = job["prompts"]
    first = SamplingParams(temperature=0.0, max_tokens=1, logprobs=1)
    check = SamplingParams(temperature=0.0, max_tokens=CHECK_TOKENS, logprobs=1)
    reply = os.fdopen(reply_fd, "w", buffering=1)
    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "probe":
            from benchmarks.vllm_e2e_procs import probe_blocks as fn  # pickled by reference

            kind, upto = cmd["name"].split(":")
            reply.write(json.dumps(llm.collective_rpc(fn, args=(kind, int(upto)))[0]) + "\n")
            continue
        if cmd["op"] == "stall":  # a decoding request while a long one arrives: benchmarks/vllm_ssd_stall.py
            from benchmarks.vllm_ssd_stall import stall

            reply.write(json.dumps(stall(llm, prompts, {"a": cmd["name"], **cmd})) + "\n")
            continue
        params = check if cmd["op"] == "check" else first  # "time": the first token only
        if cmd["op"] == "answer":  # a long answer (a conversation's turn; EOS ignored): benchmarks/vllm_multiturn.py
            params = SamplingParams(temperature=0.0, max_tokens=cmd["max_tokens"], ignore_eos=True, logprobs=1)
        prompt = {"prompt_token_ids": prompts[cmd["name"]]}
        if cmd.get("salt"):  # vLLM's cache salt: its own prefix cache and kvd's namespace both include it
            prompt["cache_salt"] = cmd["salt"]
        t0 = time.perf_counter()
        (r,) = llm.generate([prompt], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        c = r.outputs[0]
        reply.write(json.dumps({"s": dt, "cached": r.num_cached_tokens, "token_ids": list(c.token_ids),
                                "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]}) + "\n")


# ---- the orchestrator's handles ---------------------------------------------------------------------


class Engine:
    """An engine subprocess; ``ask(op, name)`` sends one command and waits for its answer."""

    def __init__(self, name: str, root: Path, model_dir: Path, prompts, *, connector, python: str | None = None):
        self.name, self.root = name, root
        job = {"model": str(model_dir), "connector": connector, "prompts": prompts}
        (root / f"{name}.job.json").write_text(json.dumps(job))
        r, w = os.pipe()
        env = {**os.environ, **ENGINE_ENV, "PYTHONPATH": str(REPO)}
        self.log_path = root / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([python or sys.executable, __file__, "--engine", str(root / f"{name}.job.json"),
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
            raise RuntimeError(f"engine {self.name} died:\n{self.log_path.read_text()[-4000:]}")
        return json.loads(line)

    def ask(self, op: str, name: str, **extra) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, "name": name, **extra}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def thread_binding(self) -> str:
        """vLLM's own report of the OpenMP binding (core ids, reserve count) from this engine's log."""
        text = self.log_path.read_text(errors="replace")
        parts = [m.group(0).strip() for m in re.finditer(
            r"(VLLM_CPU_OMP_THREADS_BIND=\S+|reserve_cpu_num=\d+|core ids=\[[^\]]*\])", text)]
        return ", ".join(dict.fromkeys(parts)) or "not reported"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(90)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KvdDaemon:
    """The kvd daemon on ``root``: host arena of ``arena`` bytes in /dev/shm (where the daemon puts it by
    default, a tmpfs; LMCache's pool is shared memory too), SSD tier under root/ssd. Until 2026-12-06
    the arena file was root/arena, on the disk's page cache, whose mappings fault and write back
    differently; results before then were measured so."""

    def __init__(self, root: Path, arena: str) -> None:
        self.root, self.arena = root, arena
        root.mkdir(parents=True, exist_ok=True)
        self.socket = str(root / "kvd.sock")
        self.port = free_port()
        self.arena_path = Path("/dev/shm") / f"kvd-bench-{os.getpid()}-{self.port}.arena"
        self.proc: subprocess.Popen | None = None

    def start(self) -> KvdDaemon:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVD_")}
        env.update({"KVD_HOST__PATH": str(self.arena_path), "KVD_HOST__CAPACITY_BYTES": self.arena,
                    "KVD_SSD__ENABLED": "true", "KVD_SSD__PATH": str(self.root / "ssd"), "PYTHONPATH": str(REPO)})
        self.proc = subprocess.Popen([sys.executable, "-m", "kvd.daemon.service", "--socket", self.socket,
                                      "--metrics-addr", f"127.0.0.1:{self.port}"], env=env,
                                     stdout=open(self.root / "kvd.log", "ab"), stderr=subprocess.STDOUT)
        from kvd.client.client import KvdClient
        from kvd.core.errors import DaemonUnavailable

        deadline = time.monotonic() + 60
        while True:
            try:
                with KvdClient(self.socket, timeout_s=1.0, register_cuda=False) as c:
                    c.health()
                return self
            except DaemonUnavailable:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError((self.root / "kvd.log").read_text()[-3000:]) from None
                time.sleep(0.1)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a series of the daemon's /metrics over the given labels."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read().decode()
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def rpc_profile(self, hashes: list[str]) -> dict[str, float]:
        """Median ms of the scheduler's lookup (compact) and the worker's lease + release of ``hashes``
        (a stored prompt's entries), from this process, 50 times."""
        import statistics

        from kvd.client.client import KvdClient
        from kvd.core import protocol as P

        with KvdClient(self.socket, register_cuda=False) as c:
            fp = next(m.fingerprint for m in c.models().models if m.num_layers == 30)
            look, lease = [], []
            for _ in range(50):
                t0 = time.perf_counter()
                c.lookup_compact(P.LookupRequest(fingerprint=fp, namespace="bench", prefix_hashes=hashes))
                t1 = time.perf_counter()
                r = c.lease(P.LeaseRequest(fingerprint=fp, namespace="bench", hashes=hashes))
                c.release(P.ReleaseRequest(lease_id=r.lease_id))
                look.append(t1 - t0)
                lease.append(time.perf_counter() - t1)
        return {"lookup_rpc_ms": round(statistics.median(look) * 1e3, 3),
                "lease_release_rpc_ms": round(statistics.median(lease) * 1e3, 3)}

    def flush(self, namespace: str | None = None) -> int:
        """Write every host entry (of ``namespace``) down to the SSD tier (``kvctl flush``); the count."""
        from kvd.client.client import KvdClient
        from kvd.core import protocol as P

        with KvdClient(self.socket, register_cuda=False) as c:
            return c.flush(P.FlushRequest(namespace=namespace)).count

    def to_ssd(self, namespace: str) -> None:
        """The namespace's entries on SSD only (``kvctl flush``, then ``kvctl evict --tier host``)."""
        from kvd.client.client import KvdClient
        from kvd.core import protocol as P

        self.flush(namespace)
        with KvdClient(self.socket, register_cuda=False) as c:
            c.evict(P.EvictRequest(tier="host", namespace=namespace))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.arena_path.unlink(missing_ok=True)


class LMCacheServer:
    """``lmcache server`` (multiprocess mode) in its own venv: L1 of ``l1_gb`` GB, an ``fs`` L2 under
    root/l2, a shared-memory transfer pool, observability off."""

    def __init__(self, root: Path, l1_gb: float) -> None:
        self.root, self.l1_gb = root, l1_gb
        root.mkdir(parents=True, exist_ok=True)
        (root / "l2").mkdir(exist_ok=True)
        self.port, self.http_port = free_port(), free_port()
        self.shm_name = f"kvdbench_{os.getpid()}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [str(LMCACHE_PYTHON.parent / "lmcache"), "server", "--host", "localhost", "--port", str(self.port),
                "--chunk-size", "256", "--l1-size-gb", str(self.l1_gb), "--eviction-policy", "LRU",
                "--l2-adapter", json.dumps({"type": "fs", "base_path": str(self.root / "l2")}),
                "--supported-transfer-mode", "auto", "--shm-name", self.shm_name, "--disable-observability",
                "--http-port", str(self.http_port)]

    def start(self) -> LMCacheServer:
        env = {**os.environ, "LMCACHE_TRACK_USAGE": "false"}
        self.proc = subprocess.Popen(self.command(), env=env, stdout=open(self.root / "server.log", "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while b"cache server is running" not in (self.root / "server.log").read_bytes():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError((self.root / "server.log").read_text()[-3000:])
            time.sleep(0.2)
        return self

    def connector(self) -> dict:
        return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"lmcache.mp.host": "tcp://localhost", "lmcache.mp.port": self.port}}

    def l1_l2_keys(self) -> tuple[int, int]:
        """Keys its prefetches found in L1 and in L2, summed over the server log (its own report)."""
        l1 = l2 = 0
        for m in re.finditer(r"\((\d+) L1, (\d+) L2\)", (self.root / "server.log").read_text(errors="replace")):
            l1, l2 = l1 + int(m.group(1)), l2 + int(m.group(2))
        return l1, l2

    def rotate_log(self) -> None:
        log = self.root / "server.log"
        if log.exists():
            log.rename(self.root / f"server.{time.time_ns()}.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def start_lmcache(root: Path, res: dict, wanted: bool) -> LMCacheServer | None:
    """The LMCache peer (2 GB L1, as kvd's 2 GiB arena) if ``wanted`` and its venv exists; records in
    ``res`` its command line, or why it did not run (``lmcache_blocker``)."""
    if not wanted:
        return None
    if not LMCACHE_PYTHON.exists():
        res["lmcache_blocker"] = f"{LMCACHE_PYTHON} missing (make lmcache-venv)"
        return None
    lmc = LMCacheServer(root / "lmcache", 2).start()
    res["lmcache"] = "0.5.6 multiprocess: " + " ".join(lmc.command()[1:])
    return lmc


def drop_page_cache(folder: Path) -> int:
    """Evict every file under ``folder`` from the page cache (fsync, then POSIX_FADV_DONTNEED): the
    next read comes from the disk. Returns the bytes covered."""
    total = 0
    for f in folder.rglob("*"):
        if not f.is_file():
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", required=True)
    ap.add_argument("--reply-fd", type=int, required=True)
    a = ap.parse_args()
    engine_main(a.engine, a.reply_fd)
