"""A model cast to another dtype after ``attach`` computes KV of that precision, while the cache's
fingerprint (taken at attach) names the old dtype: its prefix and chunk stores refuse that KV instead
of storing it, cast, under the old dtype's fingerprint as exact (audit 8's suspicion). Real SmolLM2,
real daemon."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from kvd.connectors.hf import cache as hf
from kvd.reuse.chunks import DaemonChunkStore
from tests.daemon_proc import DaemonProc

pytestmark = pytest.mark.model


def test_kv_of_a_model_cast_after_attach_is_not_stored_under_the_old_dtype(smollm2_fp32, tmp_path, caplog):
    model = copy.deepcopy(smollm2_fp32[0])
    d = DaemonProc(tmp_path).start()
    try:
        with d.client() as client:
            cache = hf.attach(model, client=client)
            assert cache.att.handle.spec.kv_dtype == "float32"
            model.to(torch.bfloat16)  # after attach: the cache still keys fp32
            ids = torch.randint(3, 40000, (1, 300), generator=torch.Generator().manual_seed(1))
            with caplog.at_level(logging.WARNING):
                with torch.no_grad():
                    model(ids, past_key_values=cache, use_cache=True)
                assert cache.store_prefix() == 0
                assert "not stored" in caplog.text
                store = DaemonChunkStore(cache.att.handle)
                assert not store.put("c" * 32, torch.zeros(30, 2, 3, 16, 64, dtype=torch.bfloat16))
            assert client.stats().num_entries == 0  # nothing stored under the fp32 fingerprint
    finally:
        hf.detach(model)
        d.kill()
