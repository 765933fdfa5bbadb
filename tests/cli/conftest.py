"""One live daemon for the kvctl tests, holding a toy model's entries.

Besides three entries of one 768-token prompt, it holds two one-chunk entries whose hashes share
their first ``MIN_PREFIX`` hex characters (found by searching token contents; hashing is cheap), so an
ambiguous prefix exists for real, and ``spare`` entries that the tests may delete.
"""

from __future__ import annotations

import pytest
import torch

from kvd.cli.resolve import MIN_PREFIX
from kvd.client import prefix as kvio
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("toy", num_layers=2, num_kv_heads=2, head_dim=32, kv_dtype="bfloat16")
CHUNK = 256


def _kv(num_tokens: int) -> torch.Tensor:
    return torch.zeros(2, 2, 2, num_tokens, 32, dtype=torch.bfloat16) + 1


def _twins(h, start: int) -> tuple[list[int], list[int]]:
    """Two one-chunk prompts whose entry hashes share their first MIN_PREFIX characters."""
    seen: dict[str, list[int]] = {}
    for s in range(start, start + 20_000):
        tokens = [s] + list(range(1, CHUNK))
        key = h.hashes(tokens)[0][:MIN_PREFIX]
        if key in seen:
            return seen[key], tokens
        seen[key] = tokens
    raise AssertionError("no two hashes share a prefix in 20,000 tries")


@pytest.fixture(scope="package")
def live(tmp_path_factory):
    d = DaemonProc(tmp_path_factory.mktemp("kvctl")).start()
    with d.client() as c:
        h = kvio.register(c, SPEC, HeadMap.from_classes("toy", [[True, False]] * 2, sink=4, window=64))
        kvio.store_prefix(h, list(range(768)), _kv(768))
        d.hashes = h.hashes(list(range(768)))
        d.fp = h.fingerprint
        a, b = _twins(h, 10_000)
        for tokens in (a, b):
            kvio.store_prefix(h, tokens, _kv(CHUNK))
        d.twins = (h.hashes(a)[0], h.hashes(b)[0])
        d.spare = []
        for s in range(50_000, 50_006):
            tokens = [s] + list(range(1, CHUNK))
            kvio.store_prefix(h, tokens, _kv(CHUNK))
            d.spare.append(h.hashes(tokens)[0])
    yield d
    d.kill()
