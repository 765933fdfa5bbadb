"""kvd under real vLLM (CPU build) with tensor parallelism: SmolLM2-135M-Instruct on 3 ranks (its 3 KV
heads, one per rank), end to end.

Engine ``a`` (3 ranks, kvd, vLLM prefix caching off) computes two ~1,000-token prompts and stores them:
each rank its own head, as a model of its own (``[tp<r>/3]``). Engine ``b`` (3 ranks, a fresh process)
then serves the same prompts: every rank loads its head's chunks (3 chunks and the 128-token tail
entry: 896 tokens) and the greedy output equals ``a``'s, which computed every token. The daemon holds
the same keys under each rank's model, and nothing under the whole model's. Both engines run with
SmolLM2's profiled head map: each rank registers its own head's column of it (checked against the
whole model's fingerprint first), so the rank's entries are placed by its own heads' classes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.connectors.vllm import test_e2e as e2e

REPO = Path(__file__).resolve().parents[3]
TP = 3
HEAD_MAP = REPO / "kvd" / "data" / "heads" / "smollm2-135m.json"
pytestmark = [pytest.mark.vllm, pytest.mark.model, pytest.mark.timeout(e2e.ENGINE_TIMEOUT_S + 300)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm2_dir):
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    from kvd.calibrate.tasks import alphabet_document
    from tests.daemon_proc import DaemonProc

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    prompts = {f"T{i}": alphabet_document(20 + i, 1000, tok) for i in (1, 2)}
    root = tmp_path_factory.mktemp("vllm-tp")
    (root / "kvd").mkdir()
    daemon = DaemonProc(root / "kvd", env_extra={"KVD_HOST__CAPACITY_BYTES": "512MiB"}).start()
    kvd = {"kv_connector": "KvdConnector", "kv_connector_module_path": "kvd.connectors.vllm",
           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
           "kv_connector_extra_config": {"socket": daemon.socket, "namespace": "tp", "timeout_s": 5.0,
                                         "head_map": str(HEAD_MAP)}}
    # One OpenMP thread per rank, ranks 0 and 2 on core 0 (2-core CI machines); an explicit list also
    # keeps vLLM's CPU build from reserving a core for the connector.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "VLLM_CPU_OMP_THREADS_BIND": "0|1|0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    out = {}
    try:
        for name, prefix_caching in (("a", False), ("b", True)):
            job = {"model": str(smollm2_dir), "connector": kvd, "prefix_caching": prefix_caching, "tp": TP,
                   "prompts": prompts, "program": [{"op": "generate", "names": sorted(prompts)}],
                   "out": str(root / f"{name}.json")}
            (root / f"{name}.job.json").write_text(json.dumps(job))
            with open(root / f"{name}.log", "wb") as log:
                rc = subprocess.run([sys.executable, e2e.__file__, str(root / f"{name}.job.json")], cwd=REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, timeout=e2e.ENGINE_TIMEOUT_S).returncode
            assert rc == 0, f"engine {name} exited with {rc}:\n{(root / f'{name}.log').read_text()[-4000:]}"
            out[name] = json.loads((root / f"{name}.json").read_text())["outputs"]
        with daemon.client() as c:
            models = {m.fingerprint: m for m in c.models().models}
            entries = c.entries(limit=100000).entries
        yield out, models, entries, root
    finally:
        daemon.kill()


def test_every_rank_loads_its_heads_and_the_output_is_the_computed_one(runs):
    out, _, _, root = runs
    for name in ("T1", "T2"):
        assert out["a"][name]["num_cached_tokens"] == 0
        assert out["b"][name]["num_cached_tokens"] == 896  # 3 chunks and the tail, from kvd
        assert out["b"][name]["token_ids"] == out["a"][name]["token_ids"]
        gap = max(abs(x - y) for x, y in zip(out["b"][name]["logprobs"], out["a"][name]["logprobs"]))
        assert gap < e2e.LOGPROB_TOL, (name, gap)
    loaded = [int(x) for x in re.findall(r"kvd worker shutting down: .*?loaded_tokens=(\d+)", (root / "b.log").read_text())]
    assert sorted(loaded) == [2 * 896] * TP  # every rank loaded both prompts


def test_each_rank_is_a_model_of_its_own_holding_the_same_keys(runs):
    _, models, entries, _ = runs
    ranks = {fp: m.model_id for fp, m in models.items() if re.search(r" \[tp\d/3\]$", m.model_id)}
    assert sorted(m[-7:] for m in ranks.values()) == ["[tp0/3]", "[tp1/3]", "[tp2/3]"]
    keys = {fp: {e.hash for e in entries if e.fingerprint == fp} for fp in ranks}
    assert len({frozenset(k) for k in keys.values()}) == 1 and len(next(iter(keys.values()))) == 8  # 2 x (3 + tail)
    assert not [e for e in entries if e.fingerprint not in ranks]  # nothing under the whole model


def test_each_rank_registers_its_own_heads_part_of_the_head_map(runs):
    from kvd.core.headmap import HeadMap

    _, models, _, _ = runs
    whole = HeadMap.load(HEAD_MAP)
    for m in models.values():
        r = int(re.search(r" \[tp(\d)/3\]$", m.model_id).group(1))
        assert (m.num_kv_heads, m.head_map_method) == (1, whole.method)
        assert m.num_global_heads == sum(row[r] for row in whole.class_grid()), m.model_id
    assert len({m.num_global_heads for m in models.values()}) > 1  # the ranks' columns differ: each got its own
