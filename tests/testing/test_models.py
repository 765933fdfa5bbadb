"""kvd.testing.models: the SmolLM2 conversion is idempotent and atomic."""

from __future__ import annotations

import pytest

from kvd.core.errors import NotFound
from kvd.testing.models import fetch, is_complete

pytestmark = pytest.mark.model


def test_fetch_is_idempotent_when_model_present(smollm2_dir):
    # The session fixture converted it once; a second fetch must return at once and touch nothing.
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    again = fetch("smollm2", cache_dir=smollm2_dir, quiet=True)
    assert again == smollm2_dir and is_complete(again)
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == before
    assert not list(smollm2_dir.parent.glob(smollm2_dir.name + ".tmp-*")), "no temp dir may be left"


def test_fetch_rejects_unknown_model(tmp_path):
    with pytest.raises(NotFound, match="smollm2"):
        fetch("llama-70b", cache_dir=tmp_path / "m", quiet=True)


def test_incomplete_dir_is_not_complete(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not is_complete(tmp_path)

