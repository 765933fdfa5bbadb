"""Eviction policies: which entries leave a tier when it needs room.

A policy decides from metadata only (sizes, counts, times, position, head-class make-up); it never
touches bytes and never removes anything itself. The store tells it what happens and asks it whom to
evict; one policy instance serves one tier:

- ``on_insert(key, meta, now=None)``: the key now lives in the tier (again: its meta is replaced and
  its place kept; the index re-inserts whenever an entry's size there changes, which is not a use).
- ``on_access(key, now)``: a hit (a lease was taken on it).
- ``on_remove(key)``: the key left the tier, whatever the reason (eviction, delete, corruption).
- ``victims(nbytes_needed, *, now, can_evict)``: keys, in eviction order, whose sizes sum to at least
  ``nbytes_needed`` (fewer if the tier cannot free that much). Pinned keys and keys ``can_evict``
  rejects (leased, busy) are skipped. Pure: nothing changes until the store calls ``on_remove``.

Keys are opaque and hashable. Unknown keys in ``on_access``/``on_remove`` are ignored (an entry may
be removed while a hit on it is in flight). ``now`` is the store's clock (seconds); ``on_insert``
without ``now`` uses the latest ``now`` the policy has seen.

Policies (``policy.eviction``; ``make_eviction``): ``lru``, ``arc`` and ``cost_aware`` (the default).
"""

from __future__ import annotations

import heapq
import itertools
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

from kvd.core.config import PolicySettings
from kvd.core.errors import ConfigError

Key = Hashable
CanEvict = Callable[[Key], bool]

# Context length at which a token's attention FLOPs equal its projection + MLP FLOPs. Per token and
# layer, a Llama block spends ~24·h² FLOPs in matmuls (h = hidden size) and ~4·h per earlier token in
# attention (QKᵀ and AV), so the two match at ~6·h tokens: 3,456 for SmolLM2-135M (h = 576), 24,576
# for an 8B model (h = 4096). 4,096 sits at the small-model end, where kvd is measured.
ATTENTION_SCALE_TOKENS = 4096.0
# How much a local-head share of an entry counts against its global share. A local head reads a
# chunk only while the chunk is inside some later token's sink or window; a global head reads it from
# every later token, and the head-aware reuse path recomputes only global heads. So losing local-head
# KV costs less than losing global-head KV of the same entry; by how much depends on the workload, so
# this is a plain default (0.5), passed to CostAwareEviction where another is wanted.
LOCAL_HEAD_WEIGHT = 0.5


@dataclass(slots=True, frozen=True)
class EntryMeta:
    """What a policy knows of an entry (or extent) in a tier."""

    nbytes: int  # bytes it occupies in this tier
    num_tokens: int = 0
    num_layers: int = 1
    start_token: int = 0  # position of its first token in the sequence it was computed in
    end_token: int = 0  # a prefix entry's sequence end at store time (0: none, a chunk entry)
    global_fraction: float = 1.0  # share of its bytes that belong to global heads (0..1)
    pinned: bool = False  # never a victim


def recompute_cost(num_tokens: int, num_layers: int, start_token: int, global_fraction: float = 1.0, *,
                   attention_scale_tokens: float = ATTENTION_SCALE_TOKENS,
                   local_weight: float = LOCAL_HEAD_WEIGHT) -> float:
    """Relative prefill FLOPs lost if the entry is evicted, in token-layers of matmul work.

    Prefill of tokens ``[s, s + n)`` costs, per layer, ``n`` tokens of matmul work plus attention over
    the ``s + i`` earlier tokens for token ``i``, i.e. ``n·(s + (n − 1)/2)`` token pairs; a token pair
    costs ``1 / attention_scale_tokens`` of a token's matmul work. Scaled by the head-class make-up:
    ``global_fraction + (1 − global_fraction) · local_weight``.

    Example: 256 tokens × 30 layers at start 0 → 30·256·(1 + 127.5/4096) ≈ 7,919; the same chunk at
    start 8,192 → 30·256·(1 + 8,319.5/4096) ≈ 23,279, about 3× dearer to recompute.
    """
    n = max(0, num_tokens)
    per_layer = n * (1.0 + (max(0, start_token) + (n - 1) / 2.0) / attention_scale_tokens) if n else 0.0
    g = min(1.0, max(0.0, global_fraction))
    return max(1, num_layers) * per_layer * (g + (1.0 - g) * local_weight)


class EvictionPolicy(ABC):
    """Decides eviction order for one tier. Four methods; see the module docstring for the contract."""

    name: str

    def __init__(self) -> None:
        self._now = 0.0  # the latest time the store told us

    def _at(self, now: float | None) -> float:
        if now is not None and now > self._now:
            self._now = now
        return self._now if now is None else now

    @abstractmethod
    def on_insert(self, key: Key, meta: EntryMeta, now: float | None = None) -> None: ...

    @abstractmethod
    def on_access(self, key: Key, now: float) -> None: ...

    @abstractmethod
    def on_remove(self, key: Key) -> None: ...

    @abstractmethod
    def victims(self, nbytes_needed: int, *, now: float, can_evict: CanEvict) -> list[Key]: ...

    @staticmethod
    def _take(candidates: Iterator[tuple[Key, EntryMeta]], nbytes_needed: int, can_evict: CanEvict) -> list[Key]:
        out, freed = [], 0
        for key, meta in candidates:
            if freed >= nbytes_needed:
                break
            if not meta.pinned and can_evict(key):
                out.append(key)
                freed += meta.nbytes
        return out


class LruEviction(EvictionPolicy):
    """Least recently inserted or accessed first."""

    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self._order: OrderedDict[Key, EntryMeta] = OrderedDict()  # key -> meta, least recent first

    def __len__(self) -> int:
        return len(self._order)

    def on_insert(self, key: Key, meta: EntryMeta, now: float | None = None) -> None:
        self._at(now)
        self._order[key] = meta  # a new key comes last; a known one keeps its place

    def on_access(self, key: Key, now: float) -> None:
        self._at(now)
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victims(self, nbytes_needed: int, *, now: float, can_evict: CanEvict) -> list[Key]:
        self._at(now)
        return self._take(iter(self._order.items()), nbytes_needed, can_evict)


class ArcEviction(EvictionPolicy):
    """Adaptive replacement (Megiddo & Modha), counted in bytes because entries differ in size.

    ``T1``: resident keys seen once since they came in; ``T2``: resident keys hit again (or re-inserted
    after a recent eviction). ``B1``/``B2``: ghosts (key -> bytes) of keys recently evicted from T1/T2.
    ``p`` is the target size of T1 in bytes. A key re-inserted while in B1 means T1 was too small:
    ``p += max(1, |B2|/|B1|) × its bytes``; while in B2, T2 was too small: ``p -= max(1, |B1|/|B2|) ×
    its bytes`` (|X| = bytes of X). Victims come from T1's LRU end while T1 holds more than ``p`` bytes,
    else from T2's (falling back to the other list when one has nothing evictable).

    ``c``, the cache size that bounds ``p`` and the ghost lists (``|T1| + |B1| ≤ c``, all four ≤ 2c),
    is ``capacity_bytes`` when given, else the largest resident total seen so far: a tier fills up
    before it evicts, so that is its capacity in practice and the policy needs no tier knowledge.
    Every removal leaves a ghost, including deletes and corruption drops (rare; a ghost only nudges p).
    """

    name = "arc"

    def __init__(self, capacity_bytes: int | None = None) -> None:
        super().__init__()
        self.t1: OrderedDict[Key, EntryMeta] = OrderedDict()  # key -> meta, LRU first
        self.t2: OrderedDict[Key, EntryMeta] = OrderedDict()
        self.b1: OrderedDict[Key, int] = OrderedDict()  # key -> bytes it had, LRU first
        self.b2: OrderedDict[Key, int] = OrderedDict()
        self.t1_bytes = self.t2_bytes = self.b1_bytes = self.b2_bytes = 0
        self.p = 0.0
        self._fixed_c = capacity_bytes
        self.c = capacity_bytes or 0

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2)

    def on_insert(self, key: Key, meta: EntryMeta, now: float | None = None) -> None:
        self._at(now)
        for lst in (self.t1, self.t2):  # re-insert: new meta, same place
            if key in lst:
                self._add_bytes(lst, meta.nbytes - lst[key].nbytes)
                lst[key] = meta
                return
        if key in self.b1:
            self.p = min(float(self.c), self.p + max(1.0, self.b2_bytes / max(1, self.b1_bytes)) * meta.nbytes)
            self.b1_bytes -= self.b1.pop(key)
            target = self.t2
        elif key in self.b2:
            self.p = max(0.0, self.p - max(1.0, self.b1_bytes / max(1, self.b2_bytes)) * meta.nbytes)
            self.b2_bytes -= self.b2.pop(key)
            target = self.t2
        else:
            target = self.t1
        target[key] = meta
        self._add_bytes(target, meta.nbytes)
        if self._fixed_c is None:
            self.c = max(self.c, self.t1_bytes + self.t2_bytes)
        self._trim_ghosts()

    def _add_bytes(self, lst: OrderedDict, delta: int) -> None:
        if lst is self.t1:
            self.t1_bytes += delta
        else:
            self.t2_bytes += delta

    def on_access(self, key: Key, now: float) -> None:
        self._at(now)
        if key in self.t1:
            meta = self.t1.pop(key)
            self.t1_bytes -= meta.nbytes
            self.t2[key] = meta
            self.t2_bytes += meta.nbytes
        elif key in self.t2:
            self.t2.move_to_end(key)

    def on_remove(self, key: Key) -> None:
        if key in self.t1:
            n = self.t1.pop(key).nbytes
            self.t1_bytes -= n
            self.b1[key] = n
            self.b1_bytes += n
        elif key in self.t2:
            n = self.t2.pop(key).nbytes
            self.t2_bytes -= n
            self.b2[key] = n
            self.b2_bytes += n
        self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        while self.b1 and self.t1_bytes + self.b1_bytes > self.c:
            self.b1_bytes -= self.b1.popitem(last=False)[1]
        while (self.b1 or self.b2) and self.t1_bytes + self.t2_bytes + self.b1_bytes + self.b2_bytes > 2 * self.c:
            ghosts = self.b2 if self.b2 else self.b1
            n = ghosts.popitem(last=False)[1]
            if ghosts is self.b2:
                self.b2_bytes -= n
            else:
                self.b1_bytes -= n

    def victims(self, nbytes_needed: int, *, now: float, can_evict: CanEvict) -> list[Key]:
        self._at(now)
        lists = {1: iter(self.t1.items()), 2: iter(self.t2.items())}
        t1_left = self.t1_bytes  # T1's size as if the victims chosen so far were gone
        out: list[Key] = []
        freed = 0
        while freed < nbytes_needed and lists:
            side = 1 if (t1_left > self.p and 1 in lists) or 2 not in lists else 2
            key, meta = next(((k, m) for k, m in lists[side] if not m.pinned and can_evict(k)), (None, None))
            if meta is None:
                del lists[side]  # nothing more evictable on this side
                continue
            out.append(key)
            freed += meta.nbytes
            if side == 1:
                t1_left -= meta.nbytes
        return out


class CostAwareEviction(EvictionPolicy):
    """Lowest ``priority = (reuse_count + 1) × recompute_cost × 0.5 ** (age / half_life)`` first.

    ``reuse_count``: hits since insertion; ``age``: seconds since the last insert or hit;
    ``recompute_cost``: ``recompute_cost()`` of its tokens, a prefix entry's priced at its sequence's last
    chunk (so a sequence's entries are priced alike and it loses its tail first). Order is kept in a heap without re-scoring anything
    when time passes: for two entries the recency factors share ``0.5 ** (now / half_life)``, so the
    order of priorities equals the order of ``ln((reuse + 1) · cost) + last_access · ln 2 / half_life``,
    a number fixed between accesses. ``victims`` pops in that order (O(k log n)) and pushes back.
    """

    name = "cost_aware"

    def __init__(self, half_life_s: float = 300.0, *, attention_scale_tokens: float = ATTENTION_SCALE_TOKENS,
                 local_weight: float = LOCAL_HEAD_WEIGHT) -> None:
        super().__init__()
        if half_life_s <= 0:
            raise ConfigError(f"policy.recency_half_life_s = {half_life_s}; it must be > 0 seconds")
        self.half_life_s = half_life_s
        self._cost_kw = {"attention_scale_tokens": attention_scale_tokens, "local_weight": local_weight}
        self._entries: dict[Key, _Scored] = {}  # key -> its current score record
        self._heap: list[tuple[float, int, Key]] = []  # (static log-priority, version, key)
        self._version = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def _push(self, key: Key, s: _Scored) -> None:
        s.version = next(self._version)
        rank = math.log((s.reuse_count + 1) * max(s.cost, 1e-300)) + s.last_access * math.log(2) / self.half_life_s
        heapq.heappush(self._heap, (rank, s.version, key))
        if len(self._heap) > 2 * len(self._entries) + 1024:  # drop stale heap records
            self._heap = [r for r in self._heap if (e := self._entries.get(r[2])) and e.version == r[1]]
            heapq.heapify(self._heap)

    def on_insert(self, key: Key, meta: EntryMeta, now: float | None = None) -> None:
        t = self._at(now)
        # A prefix entry is priced as its sequence's last chunk (the dearest: attention over the longest
        # context), so a sequence's entries are priced alike and its order comes from recency and reuse,
        # the batches reaching the policy tail first (kvd.store.index.tail_first). Priced by its own
        # position, a sequence's head was its cheapest entry, evicted first, and everything after it
        # unreachable (a lookup stops at the first missing entry). Priced as all it cuts off (start to
        # end), cold sequences' heads outranked hot sequences' tails: a Zipf trace hit less than LRU.
        at = max(meta.start_token, meta.end_token - meta.num_tokens)
        cost = recompute_cost(meta.num_tokens, meta.num_layers, at, meta.global_fraction, **self._cost_kw)
        old = self._entries.get(key)  # known: a new size, same history (its score's recency too)
        s = _Scored(meta, cost, old.reuse_count, old.last_access) if old else _Scored(meta, cost, 0, t)
        self._entries[key] = s
        self._push(key, s)

    def on_access(self, key: Key, now: float) -> None:
        t = self._at(now)
        s = self._entries.get(key)
        if s is not None:
            s.reuse_count += 1
            s.last_access = t
            self._push(key, s)

    def on_remove(self, key: Key) -> None:
        self._entries.pop(key, None)  # its heap records go stale

    def priority(self, key: Key, now: float) -> float:
        """The formula, evaluated (for tests and ``kvctl``); ``KeyError`` if the key is not tracked."""
        s = self._entries[key]
        return (s.reuse_count + 1) * s.cost * 0.5 ** ((now - s.last_access) / self.half_life_s)

    def victims(self, nbytes_needed: int, *, now: float, can_evict: CanEvict) -> list[Key]:
        self._at(now)
        out: list[Key] = []
        popped: list[tuple[float, int, Key]] = []
        freed = 0
        while freed < nbytes_needed and self._heap:
            record = heapq.heappop(self._heap)
            s = self._entries.get(record[2])
            if s is None or s.version != record[1]:
                continue  # stale: removed or re-scored since
            popped.append(record)
            if not s.meta.pinned and can_evict(record[2]):
                out.append(record[2])
                freed += s.meta.nbytes
        for record in popped:  # nothing changes until the store calls on_remove
            heapq.heappush(self._heap, record)
        return out


@dataclass(slots=True)
class _Scored:
    meta: EntryMeta
    cost: float
    reuse_count: int
    last_access: float
    version: int = 0


POLICIES = ("lru", "arc", "cost_aware")


def make_eviction(settings: PolicySettings, *, capacity_bytes: int | None = None) -> EvictionPolicy:
    """The policy ``settings.eviction`` names. ``capacity_bytes``: the tier's size, for ARC's bounds."""
    name = settings.eviction
    if name == "lru":
        return LruEviction()
    if name == "arc":
        return ArcEviction(capacity_bytes)
    if name == "cost_aware":
        return CostAwareEviction(settings.recency_half_life_s)
    raise ConfigError(f"policy.eviction = {name!r} is not a policy; supported: {', '.join(POLICIES)}")
