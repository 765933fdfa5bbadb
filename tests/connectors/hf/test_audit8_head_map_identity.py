"""Eighth audit: which head map ``attach`` takes (real SmolLM2, real daemon).

A head map names the weights it was profiled for (its ``fingerprint``: the model's fingerprint with the
KV dtype it was taken in). ``attach`` checked only the map's shape: a map made for other weights of the
same shape (a fine-tune) was used silently without a daemon, and with one the daemon refused the
registration, which the adapter logged as "daemon unavailable" and then ran on with the foreign map.
The shipped map (taken in bf16) on the fp32 model, the documented example, lost the daemon the same way.
"""

from __future__ import annotations

import pytest

from kvd.connectors.hf import cache as hf
from kvd.core.errors import HeadMapError
from kvd.core.headmap import HeadMap
from tests.daemon_proc import DaemonProc

pytestmark = pytest.mark.model
SHIPPED = "config/heads/smollm2-135m.json"


def test_a_head_map_made_for_other_weights_is_refused(model):
    other = HeadMap.load(SHIPPED).model_copy(update={"fingerprint": "0" * 32})
    with pytest.raises(HeadMapError, match="other weights"):
        hf.attach(model, head_map=other)


def test_the_shipped_map_on_the_fp32_model_registers_with_the_daemon(model, tmp_path):
    d = DaemonProc(tmp_path).start()
    try:
        with d.client() as client:
            cache = hf.attach(model, head_map=HeadMap.load(SHIPPED), client=client)
            assert cache.att.handle is not None  # registered: prefix and chunk entries go to the daemon
            assert cache.att.head_map.class_grid() == HeadMap.load(SHIPPED).class_grid()
    finally:
        d.kill()
