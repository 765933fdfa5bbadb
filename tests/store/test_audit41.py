"""Audit 41: interactions between the day's changes to the store (eviction order, model registration, SSD)."""

import pytest

from tests.store.test_pipeline import World


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
