"""Two engines register one model with different head maps (audit 11's suspicion). The fingerprint
leaves the head map out, and the daemon plans a model's extents by the map registered last (the
registry lets it change while the model has no entries). An engine that registered the other map laid
its heads out by its own plan: with classes of the same sizes (head 0 local for one, head 1 for the
other), its writes landed as the other engine's heads, and reads took the other engine's heads as its
own. Every answered extent carries its plan's layout tag: a client whose plan differs neither writes
nor reads it."""

from __future__ import annotations

import pytest
import torch

from kvd.client.client import KvdClient
from kvd.client.prefix import register
from kvd.client.transfer import open_lease, reserve
from kvd.core.errors import HeadMapError
from kvd.core.headmap import HeadMap
from tests.client.test_transfer import SPEC, entries, kv_for
from tests.daemon_proc import DaemonProc

MAP_A = HeadMap.from_classes(SPEC.model_id, [[False, True]] * 3, sink=4, window=64)  # head 0 local
MAP_B = HeadMap.from_classes(SPEC.model_id, [[True, False]] * 3, sink=4, window=64)  # head 1 local: same sizes


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProc(tmp_path).start()
    yield d
    d.kill()


def test_an_engine_of_another_head_map_neither_writes_nor_reads_the_models_extents(daemon):
    with KvdClient(daemon.socket, register_cuda=False) as ca, KvdClient(daemon.socket, register_cuda=False) as cb:
        ha = register(ca, SPEC, MAP_A, namespace="maps")
        hb = register(cb, SPEC, MAP_B, namespace="maps")  # no entries yet: the daemon now plans by MAP_B
        toks = list(range(256))
        with pytest.raises(HeadMapError, match="another head map"):
            reserve(ha, entries(ha, toks))  # A's heads would land where B's plan puts other heads
        assert ca.stats().reservations_open == 0
        kv = kv_for(256, 3)
        with reserve(hb, entries(hb, toks)) as res:  # B stores by the daemon's plan
            res.entry(0).write_from(kv, 0)
        with open_lease(ha, ha.hashes(toks), verify=False) as le:  # A may not read B's layout as its own
            assert le.entry(0) is None and le.num_leading == 0
        with open_lease(hb, hb.hashes(toks), verify=False) as le:
            out = torch.zeros_like(kv)
            le.entry(0).read_into(out)
        assert torch.equal(out, kv)
