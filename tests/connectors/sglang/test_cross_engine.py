"""Cross-engine: a prompt stored through the vLLM connector (real vLLM CPU build, SmolLM2), asked for
through the SGLang backend. It is NOT found, and this test shows why, then shows the bytes would fit.

- Same model, same daemon, same namespace: the backend registers SmolLM2 under exactly the fingerprint
  vLLM's connector registered (one model in the daemon), so KV bytes are interchangeable.
- Keys are not: vLLM's connector keys a prompt by ``kvd.core.keys.prefix_hashes`` (BLAKE2b chained over
  each 256-token chunk's token ids); SGLang keys a page by SHA-256 chained over its token ids and hands
  the backend only those keys (no token ids; ``get_storage_hash_str`` in its controller). Even with
  SGLang's page size equal to kvd's chunk (256, the most favourable case: one page = one chunk) neither
  key can be computed from the other without the tokens, so the backend's entries (keyed by SGLang's
  keys, ``kvd.connectors.sglang.keys``) and vLLM's are disjoint: the hit query finds 0 pages.
- With the token ids, which this test has and the backend does not, vLLM's chunks load into SGLang's
  host pool through the backend's own page views, and the pages equal the per-head segments vLLM stored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvd.client.transfer import open_lease
from kvd.connectors.sglang.keys import page_entry_hashes
from kvd.connectors.sglang.pages import HostPages
from kvd.core.keys import prefix_hashes, prefix_tail_hash
from tests.connectors.sglang.conftest import extra_config
from tests.connectors.sglang.sglang_env import Controller, make_pool, page_keys

pytestmark = [pytest.mark.vllm, pytest.mark.model]

REPO = Path(__file__).resolve().parents[3]
VLLM_ENGINE = REPO / "tests" / "connectors" / "vllm" / "test_e2e.py"  # its engine script (``engine_main``)
C = 256  # kvd's chunk_tokens (the daemon's default) = SGLang's page size here
NS = "cross-engine"


@pytest.fixture(scope="module")
def stored_by_vllm(tmp_path_factory, smollm2_dir):
    """A daemon holding one ~1,000-token prompt stored by a real vLLM engine through kvd's connector."""
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    from kvd.calibrate.tasks import alphabet_document
    from tests.daemon_proc import DaemonProc

    root = tmp_path_factory.mktemp("xeng")
    (root / "kvd").mkdir()
    daemon = DaemonProc(root / "kvd", env_extra={"KVD_HOST__CAPACITY_BYTES": "512MiB"}).start()
    prompt = alphabet_document(1, 1000, AutoTokenizer.from_pretrained(str(smollm2_dir)))
    job = {"model": str(smollm2_dir), "prefix_caching": False, "prompts": {"P": prompt},
           "program": [{"op": "generate", "names": ["P"]}], "out": str(root / "vllm.json"),
           "connector": {"kv_connector": "KvdConnector", "kv_connector_module_path": "kvd.connectors.vllm",
                         "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                         "kv_connector_extra_config": {"socket": daemon.socket, "namespace": NS}}}
    (root / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    try:
        with open(root / "vllm.log", "wb") as log:
            rc = subprocess.run([sys.executable, str(VLLM_ENGINE), str(root / "job.json")], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, timeout=480).returncode
        assert rc == 0, (root / "vllm.log").read_text()[-4000:]
        yield daemon, prompt
    finally:
        daemon.kill()


def test_a_prompt_stored_by_vllm_is_not_found_by_sglang_keys(sglang_version, stored_by_vllm, smollm2_dir):
    daemon, prompt = stored_by_vllm
    with daemon.client() as kc:
        entries = kc.entries(limit=1000).entries
    (vllm_fp,) = {e.fingerprint for e in entries}
    vllm_keys = {e.hash for e in entries}
    chunks = prefix_hashes(prompt, chunk_tokens=C, namespace=NS, fingerprint=vllm_fp)
    tail = prefix_tail_hash(prompt, chunk_tokens=C, tail_tokens=128, namespace=NS, fingerprint=vllm_fp,
                            parent=chunks[-1])
    assert vllm_keys == {*chunks, tail}  # 3 chunks and the tail entry, keyed by tokens

    pool = make_pool("page_head", num_pages=32, page_size=C)
    c = Controller(pool, extra_config(daemon.socket, namespace=NS, model_path=str(smollm2_dir)),
                   model_name=str(smollm2_dir))  # SGLang passes --served-model-name, the model path by default
    try:
        h = c.backend.io.session.handle()
        assert h.fingerprint == vllm_fp  # one model for both engines: the bytes are interchangeable
        full = prompt[: len(prompt) // C * C]  # SGLang asks storage for whole pages only
        sglang_keys = page_keys(full, C)  # what SGLang's controller asks the backend for
        assert len(sglang_keys) == 3
        asked = page_entry_hashes(sglang_keys, namespace=NS, fingerprint=h.fingerprint)
        assert not set(asked) & vllm_keys  # disjoint: SHA-256 page chains vs kvd's token-chunk chains
        assert c.prefetch(full) == (0, None)  # SGLang's hit query: nothing
        assert c.backend.batch_exists(sglang_keys) == 0

        # With the tokens (the backend never gets them) vLLM's chunks load into SGLang's pool, and the
        # pages are exactly the per-head segments vLLM stored.
        dst = pool.alloc(3 * C)
        pages = HostPages(pool)
        with open_lease(h, chunks) as lease:
            assert lease.num_leading == 3
            for i, s in enumerate(dst[::C].tolist()):
                lease.entry(i).read_into(pages.kv(s), 0, C)
                for plan, view, *_ in lease.entry(i).extents:
                    for j, (layer, head) in enumerate(plan.heads):
                        assert torch.equal(pages.kv(s)[layer, :, head].view(torch.int16), view[j].view(torch.int16))
        assert bool(pages.kv(dst[0].item()).view(torch.int16).any())  # real KV, not an empty page
    finally:
        c.close()
