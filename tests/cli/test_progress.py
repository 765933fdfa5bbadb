"""Progress bars of flush and compact: bytes, rate and ETA on stderr, nothing on stdout."""

from __future__ import annotations

import json
import subprocess
import sys

from kvd.client import prefix as kvio
from kvd.core.headmap import HeadMap
from tests.cli.conftest import CHUNK, SPEC, _kv


def _kvctl(live, *args):
    return subprocess.run([sys.executable, "-m", "kvd.cli.kvctl", "--socket", live.socket, *args],
                          capture_output=True, text=True, timeout=120)


def _last_bar(stderr: str, desc: str) -> str:
    return [x for x in stderr.replace("\r", "\n").splitlines() if x.startswith(desc)][-1]


def test_flush_bar_counts_bytes_with_rate_and_eta(live):
    with live.client() as c:  # fresh entries: on the host only (admission to SSD needs two sightings)
        h = kvio.register(c, SPEC, HeadMap.from_classes("toy", [[True, False]] * 2, sink=4, window=64),
                          namespace="flushme")
        kvio.store_prefix(h, list(range(70_000, 70_000 + 4 * CHUNK)), _kv(4 * CHUNK))
    r = _kvctl(live, "flush", "--namespace", "flushme", "--progress", "always", "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["count"] == doc["asked"] == 4 and doc["nbytes"] == 4 * 131072
    final = _last_bar(r.stderr, "flush to ssd")
    # e.g. "flush to ssd: 100%|##########| 512k/512k [00:00<00:00, 3.1MB/s]": done/total bytes, elapsed<ETA, rate
    assert "100%" in final and "512k/512k" in final and "<" in final and "B/s" in final, final


def test_compact_bar_shows_the_tier_size_and_never_prints_with_never(live):
    r = _kvctl(live, "compact", "--progress", "always")
    assert r.returncode == 0 and "compacted the ssd tier" in r.stdout
    assert "100%" in _last_bar(r.stderr, "compact ssd") and "B/s" in _last_bar(r.stderr, "compact ssd")
    r = _kvctl(live, "compact", "--progress", "never")
    assert r.returncode == 0 and r.stderr == ""
