"""Engine-neutral KV (issue 12): real vLLM (CPU build) and the transformers adapter share SmolLM2's KV
through one daemon, with no ``model_id`` set anywhere.

Both engines derive the model's ``model_id`` from its files (``kvd.core.identity``), so they register
one fingerprint, and both key prefix entries with ``kvd.core.keys.prefix_hashes`` over the same token
ids in the same namespace. Both run the model in bf16 (vLLM's default for it; the adapter loads it so),
so the KV dtype in the fingerprint is equal too.

- ``ref`` (vLLM, no connector) computes A and B: vLLM's recompute reference.
- ``v`` (vLLM + kvd) serves A (storing 3 whole chunks, a 128-token tail entry and aliases), signals,
  waits until this process has stored B through the adapter, then serves B: it loads B's 3 whole
  chunks (768 tokens) stored by transformers; the adapter stores no tail entry, so vLLM computes the
  rest.
- This process (transformers + ``kvd.connectors.hf``, no head map: exact) recomputes A without the
  daemon, then serves A with it: it loads A's 3 whole chunks stored by vLLM (the adapter loads whole
  chunks only; vLLM's tail entry is not used), then serves B, storing its chunks.

Greedy outputs must equal each engine's own recompute, with logprobs within the vLLM tolerance
(``test_e2e.LOGPROB_TOL``): KV computed by one engine's kernels and read by the other's differs from
the reader's own only by rounding. Prompts are ``alphabet_document``s, whose continuations have no
near-ties (their docstring says why that matters across vLLM processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.connectors.vllm.test_e2e import ENGINE_TIMEOUT_S, LOGPROB_TOL, MAX_TOKENS, REPO

pytestmark = [pytest.mark.vllm, pytest.mark.model]
ENGINE = str(Path(__file__).with_name("test_e2e.py"))  # its engine script (``engine_main``)
NS = "xeng-hf"
WAIT_S = 2 * ENGINE_TIMEOUT_S  # two engines start side by side with this process's model: slow on a busy machine
C = 256  # the daemon's default chunk_tokens


def _generate(model, ids: list[int], cache=None) -> tuple[dict, int]:
    """Greedy ``MAX_TOKENS`` tokens; returns (tokens + logprobs, tokens the first forward computed)."""
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        with torch.no_grad():
            r = model.generate(torch.tensor([ids]), past_key_values=cache, max_new_tokens=MAX_TOKENS, do_sample=False,
                               output_scores=True, return_dict_in_generate=True)
    finally:
        hook.remove()
    toks = r.sequences[0, len(ids):].tolist()
    lps = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(r.scores, toks)]
    return {"token_ids": toks, "logprobs": lps}, seen[0]


def _wait_for(path: Path, procs: dict) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        for name, p in procs.items():
            assert p.poll() is None or name == "ref", f"engine {name} exited early with {p.returncode}"
        assert time.monotonic() < deadline, f"waited too long for {path.name}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, smollm2_dir):
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    from kvd.calibrate.model import load_causal_lm
    from kvd.calibrate.tasks import alphabet_document
    from kvd.connectors.hf import cache as hf
    from tests.daemon_proc import DaemonProc

    root = tmp_path_factory.mktemp("xeng-hf")
    (root / "kvd").mkdir()
    daemon = DaemonProc(root / "kvd", env_extra={"KVD_HOST__CAPACITY_BYTES": "512MiB"}).start()
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    prompts = {"A": alphabet_document(21, 1000, tok), "B": alphabet_document(22, 1000, tok)}
    kvd = {"kv_connector": "KvdConnector", "kv_connector_module_path": "kvd.connectors.vllm", "kv_role": "kv_both",
           "kv_load_failure_policy": "recompute",
           "kv_connector_extra_config": {"socket": daemon.socket, "namespace": NS, "timeout_s": 5.0}}
    programs = {"ref": (None, [{"op": "generate", "names": ["A", "B"]}]),
                "v": (kvd, [{"op": "generate", "names": ["A"]}, {"op": "touch", "path": str(root / "v_stored")},
                            {"op": "wait", "path": str(root / "hf_stored")}, {"op": "generate", "names": ["B"]}])}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    procs = {}
    model = None
    try:
        for name, (connector, program) in programs.items():
            job = {"model": str(smollm2_dir), "connector": connector, "prefix_caching": False, "prompts": prompts,
                   "program": program, "out": str(root / f"{name}.json")}
            (root / f"{name}.job.json").write_text(json.dumps(job))
            with open(root / f"{name}.log", "wb") as log:
                procs[name] = subprocess.Popen([sys.executable, ENGINE, str(root / f"{name}.job.json")], cwd=REPO,
                                               env=env, stdout=log, stderr=subprocess.STDOUT)
        model, _ = load_causal_lm(smollm2_dir, dtype="bfloat16")
        hf_out = {"A_recompute": _generate(model, prompts["A"], hf.attach(model))}
        _wait_for(root / "v_stored", procs)
        with daemon.client() as client:
            cache = hf.attach(model, client=client, namespace=NS)
            hf_out["A"] = _generate(model, prompts["A"], cache)
            hf_out["B"] = _generate(model, prompts["B"], cache.fresh())
            (root / "hf_stored").touch()
            for name, p in procs.items():
                rc = p.wait(timeout=WAIT_S)
                assert rc == 0, f"engine {name} exited with {rc}:\n{(root / f'{name}.log').read_text()[-4000:]}"
            models = client.models().models
        yield ({name: json.loads((root / f"{name}.json").read_text())["outputs"] for name in procs}, hf_out,
               models, cache.att.fingerprint)
    finally:
        if model is not None:
            hf.detach(model)
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        daemon.kill()


def _close(got: dict, ref: dict) -> None:
    assert got["token_ids"] == ref["token_ids"], (got["token_ids"], ref["token_ids"])
    gap = max(abs(a - b) for a, b in zip(got["logprobs"], ref["logprobs"]))
    assert gap < LOGPROB_TOL, gap


def test_both_engines_register_one_model_by_content_identity(shared):
    _, _, models, hf_fingerprint = shared
    (m,) = models  # one model in the daemon: vLLM's connector and the adapter derived one fingerprint
    assert m.fingerprint == hf_fingerprint
    assert m.model_id.startswith("llama@") and m.kv_dtype == "bfloat16"


def test_transformers_loads_the_chunks_vllm_stored(shared):
    _, hf_out, _, _ = shared
    got, computed = hf_out["A"]
    assert computed == 1000 - 3 * C  # 3 whole chunks came from kvd (vLLM's tail entry is not read)
    _close(got, hf_out["A_recompute"][0])
    assert hf_out["A_recompute"][1] == 1000


def test_vllm_loads_the_chunks_transformers_stored(shared):
    vllm, hf_out, _, _ = shared
    assert hf_out["B"][1] == 1000  # B was computed (and stored) by the adapter
    assert vllm["v"]["B"]["num_cached_tokens"] == 3 * C  # whole chunks only: the adapter stores no tail
    _close(vllm["v"]["B"], vllm["ref"]["B"])
    assert vllm["v"]["A"]["num_cached_tokens"] == 0
    _close(vllm["v"]["A"], vllm["ref"]["A"])
