"""SSD tier: round trips through every codec, restart, corruption detection, foreign files, capacity,
batched writes, compaction, the directory lock, and kill -9 during writes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from kvd.codecs import Codecs, raw_nbytes
from kvd.core.config import SsdSettings
from kvd.core.errors import ConfigError, CorruptData, InvalidRequest, StorageFormatError
from kvd.tiers.base import ExtentName, Location
from kvd.tiers.record import (
    RECORD_HEAD,
    RECORD_MAGIC,
    check_record,
    decode_record_into,
    encode_record,
    name_key,
    parse_key,
)
from kvd.tiers.ssd import SsdFull, SsdTier

FP = "0123456789abcdef0123456789abcdef"
SHAPE = (4, 64, 32)  # 4 segments of 64 tokens × head_dim 32, bf16: 32 KiB raw
CODECS = Codecs()


def kv_bytes(seed: int, shape=SHAPE) -> bytes:
    """bf16 bit patterns of KV-like data (normal values, a few outlier channels)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(raw_nbytes("bfloat16", shape) // 2).astype(np.float32)
    x[::29] *= 16
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def name(h: str, shape=SHAPE) -> ExtentName:
    return ExtentName("default", FP, h, "global", "prefix", 0, shape[1], shape[1], "exact")


def make_tier(path: Path, **kw) -> SsdTier:
    settings = SsdSettings(capacity_bytes=kw.pop("capacity_bytes", 64 << 20), **kw)
    return SsdTier(path, settings)


def record(h: str, raw: bytes, codec: str = "lossless", shape=SHAPE):
    return encode_record(CODECS, name(h, shape), raw, dtype="bfloat16", shape=shape, codec=codec)


def put(tier: SsdTier, h: str, raw: bytes, codec: str = "lossless", shape=SHAPE):
    rec = record(h, raw, codec, shape)
    loc = tier.reserve(len(rec.data), name(h, shape))
    assert loc is not None
    tier.write(loc, rec.data)
    return loc


def get(tier: SsdTier, loc) -> bytes:
    """Read a record back and decode it, verifying every checksum (what the pipeline does)."""
    value = tier.read(loc)
    out = bytearray(raw_nbytes("bfloat16", _shape(value, loc.key)))
    decode_record_into(CODECS, value, loc.key, out)
    return bytes(out)


def _shape(value, key):
    from kvd.tiers.record import unpack_header

    return unpack_header(value, key)[0].shape


@pytest.fixture
def tier(tmp_path):
    t = make_tier(tmp_path / "ssd")
    yield t
    t.close()


@pytest.mark.parametrize("codec", ["raw", "lossless", "fp8", "int8"])
def test_round_trip_through_every_codec(tier, codec):
    raw = kv_bytes(1)
    rec = record("k-" + codec, raw, codec)
    loc = tier.reserve(len(rec.data), name("k-" + codec))
    tier.write(loc, rec.data)
    assert tier.read(loc) == rec.data and rec.codec == codec
    out = get(tier, loc)
    if codec in ("raw", "lossless"):
        assert out == raw
    else:  # exactly what the codec itself decodes (its error bounds are tested in test_codecs)
        c = CODECS.get(codec)
        assert out == c.decode(c.encode(raw, dtype="bfloat16", shape=SHAPE), dtype="bfloat16", shape=SHAPE)
    assert loc.key == name_key(name("k-" + codec)) and loc.nbytes == tier.stats().used_bytes


def test_lossless_record_is_smaller_than_raw(tier):
    raw = kv_bytes(2)
    assert put(tier, "a", raw, "lossless").nbytes < 0.85 * put(tier, "b", raw, "raw").nbytes


def test_large_record_round_trips_through_the_read_ahead_hint(tier):
    shape = (8, 256, 64)  # 512 KiB: large enough for the WILLNEED hint
    raw = kv_bytes(9, shape)
    loc = put(tier, "big", raw, shape=shape)
    assert get(tier, loc) == raw


def test_reserve_needs_an_extent_name(tier):
    with pytest.raises(InvalidRequest, match="extent name"):
        tier.reserve(100)


def test_a_second_tier_on_the_same_directory_is_refused(tmp_path):
    """Regression (issue 11): two daemons on one SSD path lost acknowledged writes. The directory is
    locked for the tier's lifetime; the second opener is told who holds it."""
    t = make_tier(tmp_path / "ssd")
    with pytest.raises(ConfigError, match=f"in use by another kvd \\(pid {os.getpid()}\\)"):
        make_tier(tmp_path / "ssd")
    t.compact()  # compaction swaps data.mdb under the lock, never releasing it
    with pytest.raises(ConfigError, match="in use"):
        make_tier(tmp_path / "ssd")
    t.close()
    make_tier(tmp_path / "ssd").close()  # free again once closed


def test_restart_keeps_records_headers_and_meta(tmp_path):
    t = make_tier(tmp_path / "ssd")
    raws = {f"key-{i}": kv_bytes(i) for i in range(5)}
    for key, raw in raws.items():
        put(t, key, raw)
    t.put_meta("models", b'{"smollm2": 1}')
    before = t.stats()
    t.close()

    t = make_tier(tmp_path / "ssd")  # as after a daemon restart
    assert t.stats() == before
    assert t.get_meta("models") == b'{"smollm2": 1}' and t.get_meta("absent") is None
    infos = {info.name.hash: info for info in t.scan()}
    assert set(infos) == set(raws)
    for key, info in infos.items():
        assert info.name == name(key) and info.codec == "lossless" and info.raw_nbytes == len(raws[key])
        assert get(t, info.location) == raws[key]
    t.close()


# ---- corruption ---------------------------------------------------------------------------------


def _record_spans(data_file: Path) -> dict[bytes, tuple[int, int, int]]:
    """key -> (header start, payload start, payload length) of every record in the LMDB file."""
    blob = data_file.read_bytes()
    spans = {}
    pos = blob.find(RECORD_MAGIC)
    while pos >= 0:
        fields = RECORD_HEAD.unpack_from(blob, pos)
        npay, klen, fplen = fields[9], fields[12], fields[13]
        key = blob[pos + RECORD_HEAD.size : pos + RECORD_HEAD.size + klen]
        spans[key] = (pos, pos + RECORD_HEAD.size + klen + fplen + 8, npay)
        pos = blob.find(RECORD_MAGIC, pos + 1)
    return spans


def _flip(data_file: Path, offset: int) -> None:
    with open(data_file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_flipped_bytes_in_lmdb_file_are_detected_and_never_served(tmp_path):
    t = make_tier(tmp_path / "ssd")
    raws = {f"rec-{i}": kv_bytes(10 + i) for i in range(6)}
    locs = {key: put(t, key, raw, "lossless" if i % 2 else "raw") for i, (key, raw) in enumerate(raws.items())}
    t.close()
    data_file = tmp_path / "ssd" / "data.mdb"
    spans = {parse_key(k).hash: v for k, v in _record_spans(data_file).items()}
    assert set(spans) == set(raws)
    # Damage: rec-0 payload start (codec header), rec-1 middle of payload, rec-2 last payload byte,
    # rec-3 header (shape field); rec-4 and rec-5 untouched.
    _flip(data_file, spans["rec-0"][1] + 2)
    _flip(data_file, spans["rec-1"][1] + spans["rec-1"][2] // 2)
    _flip(data_file, spans["rec-2"][1] + spans["rec-2"][2] - 1)
    _flip(data_file, spans["rec-3"][0] + 10)

    t = make_tier(tmp_path / "ssd")
    # The corrupt header is found while opening: the record is removed and never listed.
    assert t.num_dropped_at_open == 1
    assert {i.name.hash for i in t.scan()} == set(raws) - {"rec-3"}
    for key in ("rec-0", "rec-1", "rec-2"):
        with pytest.raises(CorruptData, match="checksum"):
            get(t, locs[key])  # read, then verified as it is decoded: never served
        with pytest.raises(CorruptData, match="checksum"):
            check_record(t.read(locs[key]), locs[key].key)  # or as it is passed on to another tier
        t.drop(locs[key])  # what the store does with it
    for key in ("rec-4", "rec-5"):
        assert get(t, locs[key]) == raws[key]
    t.close()


def test_read_of_a_missing_key_is_corrupt_data(tier):
    loc = put(tier, "k", kv_bytes(5))
    tier.drop(loc)
    with pytest.raises(CorruptData, match="not in"):
        tier.read(loc)


# ---- foreign and corrupt files ------------------------------------------------------------------


def test_foreign_lmdb_is_a_clear_format_error(tmp_path):
    env = lmdb.open(str(tmp_path / "other"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    with pytest.raises(StorageFormatError, match="not a kvd SSD store"):
        make_tier(tmp_path / "other")


def test_lmdb_with_our_db_names_but_no_marker_is_a_format_error(tmp_path):
    env = lmdb.open(str(tmp_path / "other"), map_size=1 << 20, max_dbs=2)
    env.open_db(b"meta")
    env.open_db(b"extents")
    env.close()
    with pytest.raises(StorageFormatError, match="no kvd format marker"):
        make_tier(tmp_path / "other")


def test_other_format_version_is_a_format_error(tmp_path):
    make_tier(tmp_path / "ssd").close()
    env = lmdb.open(str(tmp_path / "ssd"), map_size=1 << 20, max_dbs=2)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"format", b"kvd-ssd/9", db=meta)
    env.close()
    with pytest.raises(StorageFormatError, match="format kvd-ssd/9"):
        make_tier(tmp_path / "ssd")


@pytest.mark.parametrize("content", [b"not an lmdb file at all" * 100, bytes(4096 * 3)])
def test_garbage_data_file_is_a_format_error_not_a_crash(tmp_path, content):
    (tmp_path / "ssd").mkdir()
    (tmp_path / "ssd" / "data.mdb").write_bytes(content)
    with pytest.raises(StorageFormatError, match="data.mdb"):
        make_tier(tmp_path / "ssd")


# ---- capacity, reservations, batches ------------------------------------------------------------


def test_reserve_returns_none_when_over_capacity_and_changes_nothing(tmp_path):
    t = make_tier(tmp_path / "ssd", capacity_bytes=100_000)
    a = t.reserve(60_000, name("a"))
    assert a is not None
    before = t.stats()
    assert t.reserve(50_000, name("b")) is None  # 60k reserved + 50k > 100k
    assert t.stats() == before
    t.drop(a)  # a reservation never written is released
    assert t.stats().used_bytes == 0
    assert t.reserve(50_000, name("b")) is not None
    t.close()


def test_capacity_counts_encoded_bytes(tier):
    loc = put(tier, "k", kv_bytes(6))
    assert tier.stats().used_bytes == loc.nbytes < len(kv_bytes(6))


def test_drop_twice_is_a_bug(tier):
    loc = put(tier, "k", kv_bytes(7))
    tier.drop(loc)
    with pytest.raises(AssertionError):
        tier.drop(loc)


def test_write_needs_a_reservation_and_a_record(tier):
    rec = record("k", kv_bytes(8), "raw").data
    loc = tier.reserve(len(rec), name("k"))
    with pytest.raises(InvalidRequest, match="no reservation"):
        tier.write(loc.__class__("ssd", 0, len(rec), b"other"), rec)
    with pytest.raises(InvalidRequest, match="not a record"):
        tier.write(loc, b"x" * 100)
    other = tier.reserve(len(rec), name("other"))
    with pytest.raises(InvalidRequest, match="not a record of that key"):
        tier.write(other, rec)  # a record names its own key


def test_write_many_commits_all_batches(tmp_path):
    t = make_tier(tmp_path / "ssd", write_batch=2)
    items = []
    for i in range(5):
        rec = record(f"b{i}", kv_bytes(i)).data
        items.append((t.reserve(len(rec), name(f"b{i}")), rec))
    t.write_many(items)
    assert t.stats().num_records == 5
    assert all(get(t, loc) == kv_bytes(i) for i, (loc, _) in enumerate(items))
    t.close()


def test_write_batch_changed_in_place_by_a_reload_is_followed(tmp_path):
    """SIGHUP changes ``ssd.write_batch`` in the running settings (kvd.daemon.service.reload_settings):
    the tier's transactions follow it (it kept the start value before; audit 7's suspicion)."""
    t = make_tier(tmp_path / "ssd", write_batch=2)

    def write(tag: str) -> int:  # LMDB write transactions taken by one write_many of 5 records
        items = []
        for i in range(5):
            rec = record(f"{tag}{i}", kv_bytes(i)).data
            items.append((t.reserve(len(rec), name(f"{tag}{i}")), rec))
        before = t._env.info()["last_txnid"]
        t.write_many(items)
        return t._env.info()["last_txnid"] - before

    assert write("x") == 3
    object.__setattr__(t.settings, "write_batch", 5)  # as reload_settings copies a reloaded value
    assert write("y") == 1
    t.close()


def test_lmdb_map_full_raises_ssd_full_and_keeps_earlier_batches(tmp_path):
    # Capacity accounting thinks there is room, but the LMDB map is tiny: the second batch cannot fit.
    t = make_tier(tmp_path / "ssd", capacity_bytes=64 << 20, map_size_bytes=256 << 10, write_batch=2)
    items = []
    for i in range(8):
        rec = record(f"m{i}", kv_bytes(i), "raw").data
        items.append((t.reserve(len(rec), name(f"m{i}")), rec))
    with pytest.raises(SsdFull) as err:
        t.write_many(items)
    done = err.value.num_written
    assert 0 < done < 8 and done % 2 == 0
    assert t.stats().num_records == done
    for loc, _ in items[done:]:
        t.drop(loc)  # their reservations stay until the caller gives them back
    assert t.stats().used_bytes == sum(loc.nbytes for loc, _ in items[:done])
    t.close()


def test_compact_keeps_live_records_and_shrinks_the_file(tmp_path):
    t = make_tier(tmp_path / "ssd")
    locs = [put(t, f"c{i}", kv_bytes(i), "raw") for i in range(20)]
    for loc in locs[:15]:
        t.drop(loc)
    before, after = t.compact()
    assert after < before
    assert {i.name.hash for i in t.scan()} == {f"c{i}" for i in range(15, 20)}
    assert all(get(t, loc) == kv_bytes(i + 15) for i, loc in enumerate(locs[15:]))
    t.close()


def test_concurrent_reads_and_writes_from_threads(tier):
    raws = {f"t{i}": kv_bytes(i) for i in range(8)}
    locs = {k: put(tier, k, r) for k, r in list(raws.items())[:4]}
    errors: list[str] = []

    def reader() -> None:
        for _ in range(20):
            for k, loc in list(locs.items())[:4]:
                if get(tier, loc) != raws[k]:
                    errors.append(k)

    def writer() -> None:
        for k in list(raws)[4:]:
            put(tier, k, raws[k])

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and tier.stats().num_records == 8


# ---- kill -9 ------------------------------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from tests.tiers.test_ssd import kv_bytes, make_tier, put
    from pathlib import Path
    t = make_tier(Path({path!r}))
    start = len(t.scan())
    for i in range(start, start + 100000):
        put(t, "w%06d" % i, kv_bytes(i))
        print(i, flush=True)  # acknowledged: write() returned
""")


def test_kill_9_during_writes_loses_nothing_acknowledged(tmp_path):
    path = tmp_path / "ssd"
    root = str(Path(__file__).resolve().parents[2])
    rng = random.Random(1234)
    acknowledged: set[int] = set()
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=root, path=str(path))],
                                stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        target = len(acknowledged) + rng.randint(3, 25)
        while len(acknowledged) < target and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acknowledged.add(int(line))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        t = make_tier(path)
        stored = {int(info.name.hash[1:]): info.location for info in t.scan()}
        assert acknowledged <= set(stored), f"lost acknowledged writes {sorted(acknowledged - set(stored))}"
        for i, loc in stored.items():  # acknowledged or not, whatever is there is whole
            assert get(t, loc) == kv_bytes(i)
        t.close()
    assert len(acknowledged) >= 9



def test_directory_and_files_are_private_whatever_the_umask(tmp_path):
    """SSD files were created 0644 and the directory 0755 outside systemd: another user read data.mdb."""
    old = os.umask(0o022)
    try:
        (tmp_path / "ssd").mkdir(mode=0o755)
        (tmp_path / "ssd" / "stray").write_text("x")  # a file an earlier kvd left readable
        t = make_tier(tmp_path / "ssd")
        put(t, "k", kv_bytes(1))
        t.close()
    finally:
        os.umask(old)
    assert oct((tmp_path / "ssd").stat().st_mode & 0o777) == "0o700"
    for f in (tmp_path / "ssd").iterdir():
        assert f.stat().st_mode & 0o077 == 0, f"{f.name} is readable by others"


def test_compaction_keeps_the_data_file_private_whatever_the_umask(tmp_path):
    """kvctl compact swapped in LMDB's copy, created 0644 under the usual umask: data.mdb was readable by
    every user (through a directory opened to them) until the next start tightened it (audit 37)."""
    old = os.umask(0o022)
    try:
        t = make_tier(tmp_path / "ssd")
        put(t, "k", kv_bytes(1))
        t.compact()
        put(t, "k2", kv_bytes(2))
    finally:
        os.umask(old)
    for f in (tmp_path / "ssd").iterdir():
        assert f.stat().st_mode & 0o077 == 0, f"{f.name} is readable by others after compaction"
    t.close()


def test_reads_reuse_a_buffer_once_given_back_and_stay_right(tier):
    """``read`` copies the record out of LMDB into a pooled buffer; once its reader gives it back
    (``recycle``, as the promotion does after decoding) the next read reuses it, with its own bytes."""
    raws = {h: kv_bytes(i) for i, h in enumerate(("r1", "r2"))}
    locs = {h: put(tier, h, raw, "raw") for h, raw in raws.items()}  # raw: records of one size
    first = tier.read(locs["r1"])
    held = tier.read(locs["r1"])
    assert first.obj is not held.obj
    tier.recycle(first)
    second = tier.read(locs["r2"])
    assert second.obj is first.obj and get(tier, locs["r2"]) == raws["r2"]
    out = bytearray(len(raws["r2"]))
    decode_record_into(CODECS, second, locs["r2"].key, out)
    assert bytes(out) == raws["r2"] and bytes(held) == bytes(tier.read(locs["r1"]))


def test_compaction_keeps_the_accounting_for_reserves_and_drops_meanwhile(tmp_path):
    """``compact`` emptied the capacity accounting and rebuilt it by walking every header after the swap;
    reserve and drop do not wait for compaction, so meanwhile a full tier reported 0 bytes used and took
    reservations past ``capacity_bytes``, and a drop of a live record failed its "dropped twice" check
    (the record stayed on disk, counted, owned by no entry, and its key could never be reserved again)."""
    shape = (1, 16, 32)  # small records: many of them, so the rebuild takes a while
    size = len(record("c0000", kv_bytes(0, shape), "raw", shape).data)  # every record's size
    t = make_tier(tmp_path / "ssd", capacity_bytes=1500 * size, map_size_bytes=64 << 20)
    locs = [put(t, f"c{i:04d}", kv_bytes(i, shape), "raw", shape) for i in range(1500)]
    assert t.reserve(size, name("extra", shape)) is None  # full

    def while_compacting(action) -> None:
        compacting = threading.Thread(target=t.compact)
        compacting.start()
        while compacting.is_alive():
            action()
        compacting.join()

    over: list[Location] = []  # reservations a full tier granted
    while_compacting(lambda: (loc := t.reserve(size, name(f"x{len(over)}", shape))) and over.append(loc))
    assert over == [], f"a full tier took {len(over)} reservations past capacity_bytes during compaction"
    failed: list[BaseException] = []

    droppers: list[threading.Thread] = []

    def drop(loc: Location) -> None:
        try:
            t.drop(loc)
        except AssertionError as e:
            failed.append(e)

    def drop_one() -> None:  # each on a thread of its own: a drop waits while compaction holds the file
        if locs:
            droppers.append(threading.Thread(target=drop, args=(locs.pop(),)))
            droppers[-1].start()
        time.sleep(0.0005)

    while_compacting(drop_one)
    for th in droppers:
        th.join()
    assert failed == [], f"drops of live records failed during compaction: {failed[:1]}"
    on_disk = t.scan()
    assert t.stats().num_records == len(on_disk) == len(locs)
    assert t.stats().used_bytes == sum(r.location.nbytes for r in on_disk)
    t.close()
