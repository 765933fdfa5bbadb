"""The vLLM connector's ``accept_lossy`` (issue 12): with ``codec.local_cold_codec = "fp8"`` a cold local
extent exists only as an fp8 record once written down. vLLM is an exact reader: by default it loads up
to that chunk and recomputes from there; with ``accept_lossy`` it loads the fp8-decoded bytes (close,
not equal) and every exact extent bit for bit."""

from __future__ import annotations

import pytest
import torch

from kvd.connectors.vllm.plan import LoadSpec, SaveSpec, StepPlan
from kvd.core import protocol as P
from kvd.core.headmap import HeadMap
from tests.connectors.vllm.test_worker import NS, blocks_equal, hashes, make_worker, run_step, toks_for
from tests.daemon_proc import DaemonProc

L = 3
# head 0 global, head 1 local (sink 4, window 64). An 800-token prompt: chunk 1 [256, 512) is outside
# the sink and the window [736, 800): its local extent goes cold (fp8); chunks 0 and 2 stay exact.
HM = HeadMap.from_classes("lossy", [[True, False]] * L, sink=4, window=64)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProc(tmp_path_factory.mktemp("kvd"), env_extra={"KVD_CODEC__LOCAL_COLD_CODEC": "fp8",
                                                              "KVD_SSD__ADMIT_AFTER": "1"}).start()
    yield d
    d.kill()


def test_exact_by_default_lossy_bytes_only_when_accepted(daemon):
    src = make_worker(daemon, "lossy", head_map=HM, seed=1)
    toks = toks_for(11)
    hs = hashes(src, toks)
    src_blocks = (5, 2, 11, 7, 19, 3, 8)
    assert run_step(src, StepPlan(saves=(SaveSpec("a", NS, 0, hs, src_blocks, len(toks)),))) == set()
    with daemon.client() as c:
        assert c.flush(P.FlushRequest()).count >= 3  # on SSD; chunk 1's local extent leaves the arena

    exact = make_worker(daemon, "lossy", head_map=HM, seed=2)
    blocks = (4, 9, 1, 13, 6, 20)
    errors = run_step(exact, StepPlan(loads=(LoadSpec("b", NS, 0, hs, 0, 768, blocks),)))
    assert errors == set(blocks[2:])  # chunk 1 onward: vLLM recomputes it
    assert blocks_equal(src, src_blocks[:2], exact, blocks[:2])

    lossy = make_worker(daemon, "lossy", head_map=HM, seed=3, accept_lossy=True)
    assert run_step(lossy, StepPlan(loads=(LoadSpec("c", NS, 0, hs, 0, 768, blocks),))) == set()
    assert lossy.counters["loaded_tokens"] == 768
    assert blocks_equal(src, src_blocks[:2], lossy, blocks[:2])  # chunk 0: exact
    assert blocks_equal(src, src_blocks[4:6], lossy, blocks[4:6])  # chunk 2: exact (in the window)
    assert not blocks_equal(src, src_blocks[2:4], lossy, blocks[2:4])  # chunk 1: fp8-decoded local head
    for a, b in zip(src.kv_caches.values(), lossy.kv_caches.values()):
        got, want = b[list(blocks[2:4])].float(), a[list(src_blocks[2:4])].float()
        assert torch.allclose(got, want, rtol=0.13, atol=0.02)  # e4m3 keeps 3 mantissa bits
