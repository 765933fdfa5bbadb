"""Two hosts under real vLLM (CPU build) serving SmolLM2-135M-Instruct, sharing KV through a real
Redis Cluster (issue 14): an engine on host A stores prompts; an engine on host B — another daemon,
with an empty arena and no SSD tier — loads them from the remote tier.

Host A's engine computes every prompt (no kvd hit: its daemon is empty): its outputs are the
recomputed reference. Host B's engine starts only after A's daemon has written the entries through
to the cluster; B's outputs must equal A's within the vLLM tolerance, with the KV coming from kvd
(``num_cached_tokens``) and through the remote tier (B's metrics).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.connectors.vllm.test_e2e import ENGINE_TIMEOUT_S, LOGPROB_TOL, REPO

pytestmark = [pytest.mark.vllm, pytest.mark.model]
ENGINE = str(Path(__file__).with_name("test_e2e.py"))  # the engine script (run as __main__)


def host(root: Path, cluster, prefix: str):
    from tests.daemon_proc import DaemonProc

    root.mkdir()
    cfg = root / "kvd.toml"
    cfg.write_text(f"[remote]\nenabled = true\nrequired = true\nstartup_nodes = {json.dumps(cluster.startup_nodes)}\n"
                   f"key_prefix = \"{prefix}\"\n[ssd]\nenabled = false\n")
    return DaemonProc(root, env_extra={"KVD_HOST__CAPACITY_BYTES": "512MiB"}, args=["--config", str(cfg)]).start()


def run_engine(root: Path, name: str, model: str, daemon, prompts: dict, names: list[str]) -> dict:
    kvd = {"kv_connector": "KvdConnector", "kv_connector_module_path": "kvd.connectors.vllm",
           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
           "kv_connector_extra_config": {"socket": daemon.socket, "namespace": "xhost", "timeout_s": 2.0,
                                         "load_wait_s": 10.0}}
    job = {"model": model, "connector": kvd, "prefix_caching": False, "prompts": prompts,
           "program": [{"op": "generate", "names": names}], "out": str(root / f"{name}.json")}
    (root / f"{name}.job.json").write_text(json.dumps(job))
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    import os

    with open(root / f"{name}.log", "wb") as log:
        rc = subprocess.run([sys.executable, ENGINE, str(root / f"{name}.job.json")], cwd=REPO,
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            timeout=ENGINE_TIMEOUT_S).returncode
    assert rc == 0, f"engine {name} exited with {rc}:\n{(root / f'{name}.log').read_text()[-4000:]}"
    return json.loads((root / f"{name}.json").read_text())["outputs"]


def metric(port: int, name: str, **labels) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_an_engine_on_another_host_loads_kv_from_the_remote_tier(tmp_path, redis_cluster, smollm2_dir):
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    from kvd.calibrate.tasks import alphabet_document

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    prompts = {f"Q{i}": alphabet_document(20 + i, 1000, tok) for i in (1, 2)}
    prefix = "x" + uuid.uuid4().hex[:8]
    a, b = host(tmp_path / "a", redis_cluster, prefix), host(tmp_path / "b", redis_cluster, prefix)
    try:
        ref = run_engine(tmp_path, "a", str(smollm2_dir), a, prompts, ["Q1", "Q2"])
        with a.client() as c:  # the background write-through has put every entry in the cluster
            deadline = time.monotonic() + 60
            while len(c.entries(tier="remote").entries) < 8:  # 2 prompts x (3 chunks + a tail)
                assert time.monotonic() < deadline, "write-through did not finish"
                time.sleep(0.1)
        got = run_engine(tmp_path, "b", str(smollm2_dir), b, prompts, ["Q1", "Q2"])
        for q in prompts:
            assert ref[q]["num_cached_tokens"] == 0  # A computed them: the reference
            assert got[q]["num_cached_tokens"] == 896, q  # B loaded 3 chunks + the tail entry from kvd
            assert got[q]["token_ids"] == ref[q]["token_ids"], q
            assert max(abs(x - y) for x, y in zip(got[q]["logprobs"], ref[q]["logprobs"])) < LOGPROB_TOL
        assert metric(b.port, "kvd_moved_bytes_total", direction="promote", tier="remote") > 0
        assert metric(b.port, "kvd_hit_tokens_total", kind="prefix", tier="remote") > 0
    finally:
        a.kill()
        b.kill()
