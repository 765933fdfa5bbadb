"""Audit 41: interactions between the day's changes to the store (eviction order, model registration, SSD)."""

import pytest

from kvd.core import protocol as P
from kvd.core.errors import Conflict
from kvd.core.headmap import HeadMap
from tests.store.test_pipeline import World
from tests.store.test_store import HM, commit, hashes, make_store, reserve


@pytest.mark.parametrize("policy", ["lru", "arc", "cost_aware"])
async def test_entries_recovered_at_start_reach_the_policies_tail_first(tmp_path, policy):
    """Every batch reaches the policies tail first (``index.tail_first``) so that a sequence loses its tail
    before its head, but the start-up rebuild (and a shared tier's adoption, the same ``adopt``) indexed
    entries in the order of their record keys, i.e. of their hashes: after a restart the SSD tier's
    policy could take a sequence's head first, leaving the rest of it unreachable."""
    w = World(tmp_path, policy=policy, ssd={"admit_after": 1})
    try:
        hs, _ = await w.store_seq(7, chunks=6)
        await w.step()
        assert await w.restart() == 6
        lv = w.store.index.by_name["ssd"]
        order = [e.start_token for e in w.store.pipeline.space.victims(lv, 1 << 40, partial=True)]
        assert order == [1280, 1024, 768, 512, 256, 0], order
    finally:
        w.close()


async def test_a_head_map_change_waits_for_the_entries_being_stored_under_the_old_map(tmp_path):
    """A model's head map may change only while no entry follows the old one. The registry asked
    ``Index.has_entries`` (indexed entries only), where ``Index.in_use`` (made for forgetting models)
    also counts entries being stored: a map changed between a reserve and its commit, and the commit then
    indexed entries whose extents follow the old map under the new one (readers and the start-up
    rebuild match extents against the model's map)."""
    s = make_store(tmp_path)
    try:
        req = P.RegisterModelRequest(model_id="toy", num_layers=2, num_kv_heads=2, head_dim=64, head_map=HM)
        s.fp = s.register_model(req).fingerprint
        r = await reserve(s, hashes(1))
        with pytest.raises(Conflict, match="another head map"):
            s.register_model(req.model_copy(update={"head_map": HeadMap.all_global("toy", 2, 2)}))
        await commit(s, r.reservation_id)
        assert s.registry.models[s.fp].head_map == HM
    finally:
        s.host.close()
