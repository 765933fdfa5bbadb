"""Crash safety of the SSD tier through the real daemon: kill -9, flipped bytes, foreign files."""

import os
import random
import subprocess
import sys
import threading
import time

import torch

from kvd.client import prefix as kvio
from kvd.core import protocol as P
from kvd.core.errors import KvdError
from tests.daemon.test_service import HM, SPEC, kv_for
from tests.daemon_proc import DaemonProc

TOKENS = 512  # two chunks per sequence


def toks(i: int) -> list[int]:
    return [i * 1000 + t for t in range(TOKENS)]


def writer(d: DaemonProc, start: int, acked: dict, stop: threading.Event) -> None:
    """Store sequences and flush them; a sequence is acknowledged once its flush returned."""
    try:
        with d.client(timeout_s=5.0) as c:
            h = kvio.register(c, SPEC, HM)
            i = start
            while not stop.is_set():
                kvio.store_prefix(h, toks(i), kv_for(SPEC, TOKENS, i))
                hashes = h.hashes(toks(i))
                done = c.flush(P.FlushRequest(namespace="default", fingerprint=h.fingerprint, hashes=hashes))
                if done.count == len(hashes):  # acknowledged: both entries durably on SSD
                    acked[i] = hashes
                i += 1
    except KvdError:
        pass  # the daemon was killed under us: expected


def check_all(d: DaemonProc, acked: dict) -> tuple[int, int]:
    """Every acknowledged sequence reads back exactly or (after corruption) is missing: never wrong."""
    exact = missing = 0
    with d.client(timeout_s=30.0) as c:
        h = kvio.register(c, SPEC, HM)
        for i in sorted(acked):
            with kvio.load_prefix(h, toks(i), wait_s=10) as loaded:
                if loaded.num_chunks == 2:
                    assert torch.equal(loaded.to_tensor(), kv_for(SPEC, TOKENS, i)[:, :, :, :TOKENS]), i
                    exact += 1
                else:
                    missing += 1
    return exact, missing


def test_kill_9_at_random_moments_loses_nothing_acknowledged(tmp_path):
    # Room for everything the writer can produce, so that no SSD eviction hides (or excuses) a loss.
    d = DaemonProc(tmp_path, env_extra={"KVD_SSD__ADMIT_AFTER": "100", "KVD_SSD__CAPACITY_BYTES": "8GiB"})
    acked: dict[int, list[str]] = {}
    rng = random.Random(1234)
    try:
        for kill in range(10):
            d.start()
            stop = threading.Event()
            t = threading.Thread(target=writer, args=(d, kill * 10_000, acked, stop))
            t.start()
            time.sleep(rng.uniform(0.2, 1.2))
            d.kill()  # SIGKILL, mid-write
            stop.set()
            t.join(30)
        assert len(acked) >= 10, f"only {len(acked)} sequences acknowledged: the load was too light"
        d.start()
        exact, missing = check_all(d, acked)
        assert (exact, missing) == (len(acked), 0)
        with d.client() as c:
            assert c.stats().counters.get('kvd_evicted_entries_total{tier="ssd"}', 0) == 0
    finally:
        d.kill()


def _flip_payload_bytes(data_file, count: int) -> int:
    """Flip one byte inside the payload of ``count`` records (found by their header magic)."""
    blob = bytearray(data_file.read_bytes())
    flipped, pos = 0, 0
    while flipped < count:
        pos = blob.find(b"KVDS", pos + 1)
        if pos < 0:
            break
        blob[pos + 400] ^= 0x5A  # past the header, inside the codec payload
        flipped += 1
    data_file.write_bytes(bytes(blob))
    return flipped


def test_flipped_bytes_are_detected_and_never_served(tmp_path):
    d = DaemonProc(tmp_path, env_extra={"KVD_SSD__ADMIT_AFTER": "100"})
    acked: dict[int, list[str]] = {}
    try:
        d.start()
        stop = threading.Event()
        t = threading.Thread(target=writer, args=(d, 0, acked, stop))
        t.start()
        while len(acked) < 6:
            time.sleep(0.05)
        stop.set()
        t.join(30)
        assert d.stop() == 0
        assert _flip_payload_bytes(tmp_path / "ssd" / "data.mdb", 3) == 3
        d.start()
        exact, missing = check_all(d, acked)
        assert missing >= 1 and exact + missing == len(acked)
        with d.client() as c:
            assert c.stats().counters['kvd_checksum_failures_total{tier="ssd"}'] >= 1
        assert "not served" in d.log.read_text()
    finally:
        d.kill()


def test_corrupt_or_foreign_lmdb_gives_a_clear_startup_error(tmp_path):
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    (ssd / "data.mdb").write_bytes(os.urandom(64 * 1024))
    d = DaemonProc(tmp_path)
    env = d.env()
    r = subprocess.run([sys.executable, "-m", "kvd.daemon.service", "--socket", d.socket, "--metrics-addr", ""],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "ssd" in r.stderr.lower() and str(ssd) in r.stderr

    import lmdb

    other = tmp_path / "other"
    with lmdb.open(str(other), max_dbs=4) as env_other:  # a valid LMDB of some other program
        with env_other.begin(write=True) as txn:
            txn.put(b"hello", b"world")
    env["KVD_SSD__PATH"] = str(other)
    r = subprocess.run([sys.executable, "-m", "kvd.daemon.service", "--socket", d.socket, "--metrics-addr", ""],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "not a kvd" in r.stderr.lower()
