"""Lookups answered from the shared index (``kvd.core.index_file``) instead of a round trip.

``KvdClient.lookup_compact`` asks here first; ``None`` means "ask the daemon", which it does for:

- anything but an exact, lossless prefix lookup by hashes under exact attention (token ids, chunk
  hashes, head-aware readers, ``accept_lossy``, another ``computed_under``);
- a namespace and model this client has not yet looked up through the daemon: the first lookup of
  each pair goes over the socket, where the tenant's right to the namespace and the model's
  registration are checked (a 403 or 404 stays a 403 or 404);
- an answer that needs the daemon to act: a found entry on a record tier (SSD, remote) when the
  lookup asks to prefetch, or a prefix that is not all hits while a shared tier (the remote store)
  is configured (the daemon asks it);
- a table the daemon changed during the probe three times running, a tag two keys share, a daemon
  that stopped (the file says ``CLOSED``) or was killed (nobody holds the file's flock), or an
  index of another arena than the one mapped.

What a socket lookup also does in the daemon (hit counters, each found entry's sighting for
admission and recency) is sent later: answers are noted here in O(1) and a background thread sends
them as one ``POST /v1/lookup/report`` per ``REPORT_INTERVAL_S`` (``kvd.core.protocol_lookup``). So
``kvd_lookup_tokens_total`` and admission lag a local lookup by at most that long; the answer itself
is as current as the table. (A socket lookup's hit also holds the daemon's write-backs off for a
moment, ``kvd.store.background.LOAD_QUIET_S``, because a lease usually follows; a local one does not:
the lease itself holds them off once it comes.)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from kvd.core import index_file as F
from kvd.core import protocol as P
from kvd.core.keys import EXACT
from kvd.core.lookup_wire import LookupAnswer, LookupRow
from kvd.core.protocol_lookup import LookupReport, Noted, reports_of

logger = logging.getLogger(__name__)
REPORT_INTERVAL_S = 1.0
REOPEN_S = 1.0  # a lost mapping is tried again at most this often
# The daemon's liveness (its flock on the index) is asked at most this often: an answer within this
# long of a check is an answer the living daemon could have given that long ago, as a socket answer
# still in flight when the daemon dies is. Asked on every lookup it cost 2-5 us of a 30-45 us lookup.
ALIVE_S = 0.001
MAX_NOTED = 1 << 14  # distinct lookups noted between reports; past it, the lookup itself sends one
# (namespace, model) pairs vouched for, least recently used forgotten first. A vLLM request's cache_salt is
# part of its namespace, so an engine salting per user met a new pair per user: kept until the daemon
# restarted, the set grew by about 200 bytes per salt for the engine's life. A pair forgotten costs
# one lookup through the daemon, which vouches for it again.
MAX_VOUCHED = 1 << 12
_DEFAULTS = {name: f.get_default(call_default_factory=True) for name, f in P.LookupRequest.model_fields.items()}
_FREE = frozenset({"fingerprint", "namespace", "prefix_hashes", "prefetch", "max_tokens"})


_LOW = np.uint64(0xFFFFFFFF)
_ARANGE = np.arange(4096)  # the indices of an answer that found every hash (read only)
_ARANGE.flags.writeable = False


def _uniform_flags(vals: bytes, n: int) -> bool:
    """Whether the ``n`` little-endian u64 values in ``vals`` share their flags (bits 0-31: level,
    class set, present, ask, complete). On the bytes: one numpy call fewer than viewing and comparing,
    and the lookup's time is mostly the count of numpy calls."""
    return (vals[0::8] == vals[0:1] * n and vals[1::8] == vals[1:2] * n and vals[2::8] == vals[2:3] * n
            and vals[3::8] == vals[3:4] * n)


def _run(found: np.ndarray) -> int:
    """How many of the sorted indices ``found`` are 0, 1, 2, ...: the leading hits."""
    n = found.size
    if n == 0 or found[-1] == n - 1:
        return n
    return int(np.argmax(found != np.arange(n)))


class _Rows(Sequence):
    """An answer's rows, built on first use: an engine that reads the hit count and the leading
    hits' tiers (``LookupAnswer.leading_tiers``) never pays for 128 row objects."""

    __slots__ = ("_hashes", "_found", "_vals", "_tiers", "_sets", "_level", "_rows")

    def __init__(self, hashes: list[str], found: np.ndarray, vals: np.ndarray, tiers: list[str],
                 sets: list[tuple[str, ...]], level: int | None) -> None:
        self._hashes, self._found, self._vals, self._tiers, self._sets = hashes, found, vals, tiers, sets
        self._level = level  # the one tier of every row, when they share it
        self._rows: list[LookupRow] | None = None

    def leading_tiers(self, n: int) -> list[str]:
        if self._level is not None:
            return [self._tiers[self._level]] * n
        levels = (self._vals[:n] & np.uint64(0xFF)).tolist()
        return [self._tiers[lv] for lv in levels]

    def _built(self) -> list[LookupRow]:
        if self._rows is None:
            v, found = self._vals, self._found.tolist()
            self._rows = list(map(LookupRow._make, zip(
                found, [self._hashes[i] for i in found], [self._tiers[x] for x in (v & np.uint64(0xFF)).tolist()],
                [self._sets[x] for x in ((v >> np.uint64(8)) & np.uint64(0xFF)).tolist()],
                ((v & np.uint64(F.V_COMPLETE)) != 0).tolist(), (v >> np.uint64(32)).tolist(), strict=True)))
        return self._rows

    def __len__(self) -> int:
        return self._found.size

    def __getitem__(self, i):
        return self._built()[i]

    def __eq__(self, other: object) -> bool:
        return list(self._built()) == list(other) if isinstance(other, Sequence) else NotImplemented

    def __repr__(self) -> str:
        return repr(self._built())


def _eligible_any(req: P.LookupRequest) -> bool:
    """An exact, lossless prefix lookup by hashes: every other field at its default."""
    if not req.prefix_hashes:
        return False
    return all(getattr(req, k) == v for k, v in _DEFAULTS.items() if k not in _FREE)


def _eligible_known(req: P.LookupRequest) -> bool:
    """``_eligible_any`` for the request model's fields as this module knows them, without the loop."""
    return bool(req.prefix_hashes) and req.token_ids is None and req.chunk_hashes is None \
        and req.chunk_num_tokens is None and not req.accept_lossy and req.computed_under == EXACT \
        and req.reader == "exact" and req.head_map is None


_KNOWN_FIELDS = frozenset({"fingerprint", "namespace", "computed_under", "accept_lossy", "reader", "head_map",
                           "token_ids", "prefix_hashes", "chunk_hashes", "chunk_num_tokens", "prefetch", "max_tokens"})
# A field added to LookupRequest later is never ignored: the general check runs until this module knows it.
_eligible = _eligible_known if set(_DEFAULTS) == _KNOWN_FIELDS and all(
    _DEFAULTS[k] == v for k, v in (("token_ids", None), ("chunk_hashes", None), ("chunk_num_tokens", None),
                                   ("accept_lossy", False), ("computed_under", EXACT), ("reader", "exact"),
                                   ("head_map", None))) else _eligible_any


class LocalLookups:
    """The mapped index of one arena, the pairs vouched for, and the answers not yet reported."""

    def __init__(self, send: Callable[[LookupReport], None]) -> None:
        self._send = send
        self._lock = threading.Lock()  # the noted answers
        self._map_lock = threading.Lock()  # the mapping and its fd (the report thread may detach)
        self._m: F.Mapped | None = None
        self._fd = -1  # the index file, open: its flock says whether the daemon lives
        self._retry_at = 0.0  # monotonic time before which a lost mapping is not tried again
        self._alive_until = 0.0  # monotonic time before which the daemon is not asked about again
        self._path: str | None = None
        self._arena_id: str | None = None
        self._meta_gen = -1
        self._tiers: list[str] = []
        self._records: frozenset[int] = frozenset()
        self._sets: list[tuple[str, ...]] = []
        self._shared = False
        self._vouched: OrderedDict[tuple[str, str], None] = OrderedDict()  # bounded: MAX_VOUCHED
        self._noted: dict[tuple, Noted] = {}  # (namespace, model, tags, max_tokens) -> count and answer
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.answered = 0  # lookups answered here (tests and benchmarks read it)

    # ---- the mapping -----------------------------------------------------------------------------

    def attach(self, info: P.ArenaInfo) -> None:
        """The daemon named its arena (registration, restart): map that arena's index, if it has one.
        Another arena (a restarted daemon) vouches for nothing yet."""
        path = info.index_path if F.SUPPORTED else None
        if (path, info.arena_id) != (self._path, self._arena_id):
            with self._map_lock:
                self._unmap_locked()
                self._vouched.clear()
                self._path, self._arena_id = path, info.arena_id
        if self._m is None:
            self._reopen(force=True)

    def _reopen(self, *, force: bool = False) -> None:
        """Map the index at the arena's path if it is that arena's (a killed daemon's file stays
        there until the next daemon replaces it: the answers check its flock). Without ``force``, at
        most once per ``REOPEN_S``: a client whose daemon is gone does not retry on every lookup."""
        now = time.monotonic()
        if self._path is None or (not force and now < self._retry_at):
            return
        self._retry_at = now + REOPEN_S
        with self._map_lock:
            self._unmap_locked()
            try:
                m, fd = F.map_file(self._path, writable=False)
            except (OSError, ValueError) as e:
                logger.info("lookup index %s not mapped (%s): lookups ask the daemon", self._path, e)
                return
            if m.arena_id != self._arena_id:  # a newer daemon's (or an older one's): not this arena's
                os.close(fd)
                return
            self._m, self._fd, self._meta_gen = m, fd, -1

    def detach(self) -> None:
        """Stop answering from the index (the daemon could not be reached); the next lookup the daemon
        answers maps it again (``vouch``), if it is still this arena's and its daemon's."""
        with self._map_lock:
            self._unmap_locked()

    def _unmap_locked(self) -> None:
        self._m = None
        self._alive_until = 0.0
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _daemon_alive(self) -> bool:
        """The daemon holds an exclusive flock on its index while it lives; the kernel drops it when
        the daemon dies, even by SIGKILL. A shared lock we can take means nobody keeps this table.
        (Checked at most every ``ALIVE_S``.)"""
        now = time.monotonic()
        if now < self._alive_until:
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            self._alive_until = now + ALIVE_S
            return True
        except OSError:
            return False
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def vouch(self, req: P.LookupRequest) -> None:
        """The daemon answered a lookup of this namespace and model: later ones may be answered here."""
        if not _eligible(req):
            return
        if self._m is None:
            self._reopen()
        if self._m is not None:
            self._vouched[(req.namespace, req.fingerprint)] = None
            while len(self._vouched) > MAX_VOUCHED:
                self._vouched.popitem(last=False)

    # ---- answers ---------------------------------------------------------------------------------

    def answer(self, req: P.LookupRequest) -> LookupAnswer | None:
        m, pair = self._m, (req.namespace, req.fingerprint)
        if m is None or pair not in self._vouched or not _eligible(req):
            return None
        with contextlib.suppress(KeyError):  # forgotten by another thread meanwhile: still answered, once
            self._vouched.move_to_end(pair)
        if m.words[F.W_STATE] != F.OPEN or not self._daemon_alive():
            # Moved (a bigger table at the same path), closed (the daemon stopped) or nobody's (the
            # daemon was killed): the path may hold this daemon's current table; else ask the daemon
            # (and learn it is gone) instead of answering from a dead one's.
            self._reopen(force=True)
            m = self._m
            if m is None or m.words[F.W_STATE] != F.OPEN or not self._daemon_alive():
                self.detach()
                return None
        hashes = req.prefix_hashes
        want = F.tags_of(F.salt_u64(req.namespace, req.fingerprint), hashes)
        key = want.tobytes()  # the probe's compare, and the key the answer is noted under
        head = m.words
        for _ in range(3):
            v = head[F.W_VERSION]
            if v & 1:
                continue
            gen = head[F.W_META_GEN]
            meta = None
            if gen != self._meta_gen:
                try:
                    meta = m.meta()
                except ValueError:  # written under us: the version check below says so
                    continue
            vals = m.probe(want, key)
            if head[F.W_VERSION] == v:
                if meta is not None:  # taken only from a read no write overlapped
                    self._use_meta(meta, gen)
                break
        else:
            return None
        return self._answer(req, hashes, key, vals, head[F.W_CHUNK])

    def _answer(self, req: P.LookupRequest, hashes: list[str], key: bytes, vals: np.ndarray,
                chunk: int) -> LookupAnswer | None:
        n = vals.size
        uniform = _uniform_flags(b := vals.tobytes(), n)
        f0 = int.from_bytes(b[:4], "little")
        if uniform and f0 & F.V_PRESENT:  # every hash found, one tier and one class set: most answers
            if f0 & F.V_ASK:
                return None
            return self._found(req, hashes, key, vals, chunk, _ARANGE[:n] if n <= _ARANGE.size else np.arange(n),
                               f0 & 0xFF, n if f0 & F.V_COMPLETE else 0)
        if uniform and not f0:  # nothing found (a published value has V_PRESENT): a new prompt
            if self._shared:
                return None  # the remote tier may hold it: the daemon asks it
            self._note(req, key, chunk, vals[:0], _ARANGE[:0])
            self.answered += 1
            return LookupAnswer(chunk_tokens=chunk, num_prefix_hits=0, prefix=[], chunks=[])
        found = np.flatnonzero(vals)
        fv = vals[found]
        flags = fv & _LOW
        if (flags == flags[0]).all():  # one tier, one class set
            f0 = int(flags[0])
            if f0 & F.V_ASK:
                return None
            return self._found(req, hashes, key, fv, chunk, found, f0 & 0xFF, _run(found) if f0 & F.V_COMPLETE else 0)
        if (flags & np.uint64(F.V_ASK)).any():
            return None
        complete = (flags & np.uint64(F.V_COMPLETE)) != 0
        lead = _run(found)
        if not complete[:lead].all():
            lead = int(np.argmin(complete[:lead]))
        return self._found(req, hashes, key, fv, chunk, found, None, lead)

    def _found(self, req: P.LookupRequest, hashes: list[str], key: bytes, fv: np.ndarray, chunk: int,
               found: np.ndarray, level: int | None, lead: int) -> LookupAnswer | None:
        """The answer for the found hashes ``found`` (their values ``fv``; ``level``: the one tier of
        them all, or None) whose first ``lead`` are the leading hits, unless the daemon must act."""
        if req.prefetch and self._records:  # a found entry on a record tier: the daemon starts the promotion
            levels = (level,) if level is not None else np.unique(fv & np.uint64(0xFF)).tolist()
            if not self._records.isdisjoint(levels):
                return None
        if self._shared and lead < len(hashes):
            return None  # the remote tier may hold the rest: the daemon asks it
        self._note(req, key, chunk, fv if lead == fv.size else fv[:lead], found)
        self.answered += 1
        return LookupAnswer(chunk, lead, _Rows(hashes, found, fv, self._tiers, self._sets, level), ())

    def _use_meta(self, meta: dict, gen: int) -> None:
        self._tiers = meta["tiers"]
        self._records = frozenset(meta.get("records", []))
        self._sets = [tuple(s) for s in meta["sets"]]
        self._shared = bool(meta.get("shared"))
        self._meta_gen = gen

    # ---- reports ---------------------------------------------------------------------------------

    def _note(self, req: P.LookupRequest, tags: bytes, chunk: int, lead_vals: np.ndarray,
              found: np.ndarray) -> None:
        """What the daemon would have counted for this answer, kept for the next report. The same
        lookup again (an engine asks about a waiting request each step) only counts one more."""
        key = (req.namespace, req.fingerprint, tags, req.max_tokens)
        with self._lock:
            rec = self._noted.get(key)
            if rec is None:
                self._noted[key] = Noted(req.namespace, req.fingerprint, chunk, req.max_tokens, req.prefix_hashes,
                                         lead_vals, found, self._tiers)
            else:  # the latest answer stands for all of them
                rec.times += 1
                rec.lead_vals, rec.found, rec.tiers = lead_vals, found, self._tiers
            full = len(self._noted) >= MAX_NOTED
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvd-lookup-report", daemon=True)
            self._thread.start()
        if full:
            self.flush()

    def _run(self) -> None:
        while not self._stop.wait(REPORT_INTERVAL_S):
            self.flush()

    def flush(self) -> None:
        """Send what was noted since the last report (a failure loses the counts, never an answer)."""
        with self._lock:
            noted, self._noted = self._noted, {}
        if not noted:
            return
        try:
            for report in reports_of(noted.values()):
                self._send(report)
        except Exception as e:  # noqa: BLE001 - the daemon may be gone: ask it again from now on
            logger.info("lookup report not sent (%s): lookups ask the daemon until it names its index again", e)
            self.detach()

    def close(self) -> None:
        """Stop the report thread and send what is left (a client used again starts another)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread, self._stop = None, threading.Event()
        self.flush()
        self.detach()
        self._path = self._arena_id = None
