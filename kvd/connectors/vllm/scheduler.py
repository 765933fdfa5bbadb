"""The scheduler side of the vLLM connector: which chunks each step loads and stores.

Runs in vLLM's EngineCore process and never touches KV bytes. It keys each request's prompt into
chained chunk hashes (``kvd.core.keys``; the same keys any engine computes for the same tokens, model and
namespace), asks the daemon how many leading chunks it holds, and turns vLLM's scheduling decisions
into a picklable ``StepPlan`` for the workers:

- **load**: tokens ``[start, end)`` of a new (or resumed) request that vLLM agreed to take from kvd
  (``get_num_new_matched_tokens`` → ``update_state_after_alloc`` → ``build``). ``start`` is vLLM's own
  prefix hit (block-aligned, possibly inside a chunk); ``end`` is the end of the last hit entry or, when
  that entry holds the last prompt token, that token (vLLM must compute at least one token to sample,
  and a chunk entry serves any prefix of its tokens): the last block is then loaded in part and vLLM
  computes one token, where its own prefix cache recomputes the whole last block.
- **save**: the prompt's full chunks that become complete in this step, saved by the workers in the
  same step (synchronously, see ``kvd.connectors.vllm.worker``), and the prompt's **tail entry**: the
  block-aligned tokens after its last full chunk, all but the last prompt token, so that a rerun of a
  prompt of any length loads all but its last block. Each saved entry carries its **prefix aliases**
  (``kvd.core.keys.prefix_aliases``): the keys of its block-aligned leading tokens, which are the tail
  keys of shorter prompts ending inside it, so a strict prefix of a stored prompt loads down to its
  last block too. Entries the daemon held at lookup time are skipped (a request vLLM's own cache
  covers is still looked up, for that).
- **save, decode** (``save_decode``, on by default): the full chunks of prompt + generated tokens that
  decode steps complete, keyed by the same chain over the request's ``all_token_ids``, so the next
  turn of a conversation (prompt, answer, new message) finds the answer's chunks too, as vLLM's own
  prefix cache keeps generated blocks. Only tokens whose ids are final are keyed: a step's KV covers
  ``computed + scheduled`` positions, but under async scheduling or speculative decoding the ids of
  the last ones are placeholders or drafts until the step's output is processed, so a chunk is saved
  once ``all_token_ids`` covers it (its blocks stay allocated while the request runs; a chunk still
  open when the request finishes is not stored, nor is an answer's last partial chunk).

- **wait unscheduled** (``wait_unscheduled``, on by default): a request whose leading hits include
  chunks held only on SSD or the remote store is not offered to vLLM yet. The first lookup asks the
  daemon to promote them into the arena; until they are there, ``num_new_matched_tokens`` answers
  None, which vLLM's scheduler takes as "ask again later" and skips the request for this step, so the
  rest of the batch keeps running while the daemon reads. Each later step looks again (at most every
  ``POLL_S``, asking again for the promotion); once every hit is in the arena the request is
  offered them and loads at arena speed. After ``load_wait_s`` it is offered the leading chunks that
  arrived and vLLM computes the rest. Without it the load waits for the promotion inside the step's
  lease, and every request of the batch waits with it (vLLM's own offloading connector defers the
  same way for its slower tiers).

Lifecycle of a tracked request: created at its first lookup → block ids and progress follow each
step's scheduler output → dropped at ``finished``. Requests kvd must not key are not tracked: LoRA
(the adapter changes KV), multimodal inputs or prompt embeddings (token ids do not name the content).
A request's ``cache_salt`` becomes part of its namespace, so salted tenants never share entries.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvd.client.handle import ModelHandle
from kvd.client.session import DaemonSession
from kvd.connectors.vllm.failures import BlockGuard
from kvd.connectors.vllm.plan import LoadSpec, SaveSpec, StepPlan
from kvd.connectors.vllm.settings import ConnectorSettings
from kvd.core import protocol as P
from kvd.core.keys import as_token_array, prefix_aliases, prefix_hashes, prefix_tail_hash
from kvd.core.lookup_wire import LookupAnswer

logger = logging.getLogger(__name__)
ARENA_TIERS = frozenset({"host", "gpu"})  # tiers a lease maps directly: a hit there loads without waiting
# A request waiting unscheduled is asked about every step (every few ms in an idle batch); the daemon
# at most this often (a lookup RPC, ~0.1-0.3 ms of its time; one chunk's promotion takes milliseconds).
POLL_S = 0.01


@dataclass
class _Tracked:
    namespace: str
    token_ids: np.ndarray  # the prompt's, as int64
    hashes: list[str]  # full chunks of the prompt
    hits: int = 0  # leading chunks the daemon held at the last lookup
    lookup_at: float = float("-inf")
    hit_tiers: list[str] = field(default_factory=list)  # fastest tier of each hit chunk
    offer_end: int = 0  # end of the tokens last offered to vLLM
    pending_load: int = 0  # external tokens vLLM accepted, not yet planned
    block_ids: list[int] = field(default_factory=list)
    computed: int = 0
    next_save: int = 0  # first chunk not stored yet (nor known to be stored)
    # The tail entry: the block-aligned tokens after the last full chunk that a rerun of this prompt
    # could load (all but the last prompt token), keyed by ``kvd.core.keys.prefix_tail_hash``.
    tail: str | None = None
    tail_tokens: int = 0
    tail_hit: bool = False  # the daemon held it (behind every full chunk) at the last lookup
    tail_saved: bool = False
    request: Any = None  # vLLM's Request: its ``all_token_ids`` grow with the generated tokens
    next_decode: int = 0  # first chunk past the prompt's full chunks not stored yet (save_decode)
    waiting_since: float | None = None  # held unscheduled since (wait_unscheduled), else None
    epoch: int = 0  # load failures learnt of (``on_load_errors``): ``SaveSpec.epoch``

    @property
    def num_prompt(self) -> int:
        return len(self.token_ids)

    @property
    def found(self) -> int:  # leading entries held at the last lookup: the full chunks, then the tail
        return self.hits + (1 if self.tail_hit and self.hits == len(self.hashes) else 0)

    def keys(self, first: int, last: int) -> tuple[tuple[str, ...], int]:
        """Keys of entries ``first..last-1`` (index ``len(hashes)`` is the tail) and the tail's
        token count when it is among them (else 0)."""
        keys = self.hashes + ([self.tail] if self.tail else [])
        return tuple(keys[first:last]), self.tail_tokens if self.tail and first <= len(self.hashes) < last else 0


def salted_namespace(base: str, cache_salt: str | None) -> str:
    if not cache_salt:
        return base
    return f"{base}:salt-{hashlib.blake2b(cache_salt.encode(), digest_size=8).hexdigest()}"


class SchedulerPlanner:
    """Per-request lookup cache and the step plans. ``block_size`` is vLLM's (manager) block size."""

    def __init__(self, session: DaemonSession, settings: ConnectorSettings, *, block_size: int, can_load: bool,
                 can_save: bool, clock: Callable[[], float] = time.monotonic,
                 shards: Sequence[DaemonSession] = ()) -> None:
        self.session = session  # tensor-parallel rank 0's model (or the only one): it seeds the keys
        self.shards = tuple(shards)  # the other ranks' models: a chunk is a hit when every rank holds it
        self.settings = settings
        self.block_size = block_size
        self.can_load = can_load
        self.can_save = can_save
        self.clock = clock
        self.requests: dict[str, _Tracked] = {}  # request id -> state
        self.guard = BlockGuard(block_size)  # failed blocks until recomputed (kvd.connectors.vllm.failures)

    def _track(self, request, h: ModelHandle) -> _Tracked | None:
        t = self.requests.get(request.request_id)
        if t is not None:
            return t
        if (getattr(request, "lora_request", None) is not None or getattr(request, "mm_features", None)
                or getattr(request, "prompt_embeds", None) is not None or request.prompt_token_ids is None):
            self.session.counters["requests_not_keyed"] += 1
            return None
        ns = salted_namespace(h.namespace, getattr(request, "cache_salt", None))
        ids, c = as_token_array(request.prompt_token_ids), h.chunk_tokens  # converted once: keyed many times
        hashes = prefix_hashes(ids, chunk_tokens=c, namespace=ns, fingerprint=h.fingerprint)
        t = self.requests[request.request_id] = _Tracked(ns, ids, hashes, request=request,
                                                         next_decode=len(hashes))
        tail = (t.num_prompt - 1 - len(hashes) * c) // self.block_size * self.block_size
        if tail > 0:
            t.tail, t.tail_tokens = prefix_tail_hash(ids, chunk_tokens=c, tail_tokens=tail, namespace=ns,
                                                     fingerprint=h.fingerprint,
                                                     parent=hashes[-1] if hashes else None), tail
        return t

    def _lookup(self, t: _Tracked, *, max_tokens: int, prefetch: bool, ttl_s: float | None = None) -> None:
        """Refresh what the daemon holds of ``t``'s entries (chunks, then the tail) unless the cached
        answer is younger than ``ttl_s`` (default ``lookup_ttl_s``); a failed lookup counts as no hit.
        ``max_tokens``: the most tokens it can load (the daemon's hit counters count no more)."""
        keys = list(t.keys(0, len(t.hashes) + 1)[0])
        now = self.clock()
        if not keys or now - t.lookup_at < (self.settings.lookup_ttl_s if ttl_s is None else ttl_s):
            return
        t.lookup_at = now

        def ask(session: DaemonSession, hashes: list[str], most: int) -> LookupAnswer | None:
            return session.call("lookup", lambda h: h.client.lookup_compact(P.LookupRequest(  # compact: every
                fingerprint=h.fingerprint, namespace=t.namespace, prefix_hashes=hashes,  # request's path
                prefetch=prefetch, max_tokens=most, accept_lossy=self.settings.accept_lossy)))

        resp = ask(self.session, keys, max_tokens)
        self.session.counters["lookups"] += resp is not None  # answered (skipped, failed: lookup_skipped, ...)
        found, tiers = (resp.num_prefix_hits, resp.leading_tiers()) if resp is not None else (0, [])
        for shard in self.shards:  # a hit is a chunk every rank holds; counted once, in rank 0's lookup
            other = ask(shard, keys[:found], 0) if found else None
            found = min(found, other.num_prefix_hits) if other is not None else 0
            # each chunk's slowest rank's tier: what loading it waits for
            tiers = [a if a not in ARENA_TIERS else b for a, b in zip(tiers, other.leading_tiers())] if other else []
        t.hits = min(found, len(t.hashes))
        t.tail_hit = found > len(t.hashes)
        t.hit_tiers = tiers[:found]
        t.next_save = max(t.next_save, t.hits)
        t.tail_saved = t.tail_saved or t.tail_hit

    # ---- vLLM scheduler hooks -------------------------------------------------------------------

    def num_new_matched_tokens(self, request, num_computed: int) -> int | None:
        """Tokens kvd can supply beyond vLLM's own ``num_computed`` (block-aligned) prefix hit; None
        while the request waits unscheduled for its chunks to reach the arena (``_arena_ready``)."""
        h = self.session.handle()
        if h is None:
            return 0
        t = self._track(request, h)
        if t is None:
            return 0
        c = h.chunk_tokens
        # vLLM computes at least the last prompt token: the offer ends right before it when the chunk
        # holding it is stored (a stored chunk is exact for any prefix of its tokens; the last block is
        # then loaded in part, ``kvd.connectors.vllm.copy``), else at the end of the tail entry (block-
        # aligned), so a prompt whose entries are all stored recomputes one token, or less than a block.
        # vLLM's own prefix cache stops at the last whole block before the last token.
        limit = min(len(t.hashes) * c + t.tail_tokens, t.num_prompt - 1)
        if not self.can_load or limit <= num_computed:
            # Nothing to load (vLLM's own cache may cover the prompt): still learn which entries are
            # stored, so that saving does not send them again.
            if self.can_save:
                self._lookup(t, max_tokens=0, prefetch=False)
            return 0
        self._lookup(t, max_tokens=limit, prefetch=True)
        ready = self._arena_ready(t)
        if ready is None:
            return None
        hits = min(t.hits, ready)
        tail = t.tail_tokens if t.tail_hit and hits == len(t.hashes) and ready > hits else 0
        t.offer_end = min(hits * c + tail, limit)
        return max(t.offer_end - num_computed, 0)  # counted once vLLM takes it (``after_alloc``)

    def _arena_ready(self, t: _Tracked) -> int | None:
        """How many of ``t``'s leading hit entries (the tail is entry ``len(hashes)``) to offer, or None:
        ask again later (vLLM skips the request this step) while some are still coming up from SSD or
        the remote store, for up to ``load_wait_s``; then the leading ones that arrived."""
        found, slow = t.found, self._first_slow(t)
        if not self.settings.wait_unscheduled:
            return found
        counters = self.session.counters
        if slow < found:
            now = self.clock()
            if t.waiting_since is None:
                t.waiting_since = now
                counters["promote_waits"] += 1
            if now - t.waiting_since < self.settings.load_wait_s:
                # Asks the daemon to promote what is still below the arena (again: the cached answer may
                # come from a lookup without prefetch, or a promotion may have found no room), counting
                # no hits a second time (max_tokens=0).
                self._lookup(t, max_tokens=0, prefetch=True, ttl_s=POLL_S)
                found, slow = t.found, self._first_slow(t)
                if slow < found:
                    return None
            else:
                counters["promote_wait_timeouts"] += 1
        if t.waiting_since is not None:
            counters["promote_wait_s"] += self.clock() - t.waiting_since
            t.waiting_since = None
        return slow

    @staticmethod
    def _first_slow(t: _Tracked) -> int:
        """Index of the first leading hit held outside the arena (``t.found``: none)."""
        return next((i for i, tier in enumerate(t.hit_tiers[:t.found]) if tier not in ARENA_TIERS), t.found)

    def after_alloc(self, request, num_external: int) -> None:
        t = self.requests.get(request.request_id)
        if t is not None and num_external > 0:
            t.pending_load = num_external
            self.session.counters["lookup_hit_tokens"] += num_external

    def hit_sources(self, request, num_external: int) -> dict[str, int]:
        """``{"host"|"disk": tokens}`` of the planned load, by the tier each chunk was found in."""
        t = self.requests.get(request.request_id)
        h = self.session.handle()
        if t is None or h is None or num_external <= 0:
            return {}
        c, end = h.chunk_tokens, t.offer_end
        out: dict[str, int] = {}
        for i in range((end - num_external) // c, -(-end // c)):
            n = min((i + 1) * c, end) - max(i * c, end - num_external)  # the tail is entry len(hashes)
            key = "host" if i < len(t.hit_tiers) and t.hit_tiers[i] in ARENA_TIERS else "disk"
            out[key] = out.get(key, 0) + n
        return out if sum(out.values()) == num_external else {}

    def build(self, so) -> StepPlan:
        """The step's loads and saves from vLLM's ``SchedulerOutput`` (read only)."""
        h = self.session.handle()
        finished = tuple(so.finished_req_ids)
        self.guard.allocated(so, {rid: t.pending_load for rid, t in self.requests.items() if t.pending_load})
        if h is None or not self.requests:
            return StepPlan((), (), finished, *self.guard.plan_fields())
        loads: list[LoadSpec] = []
        for nr in so.scheduled_new_reqs:
            t = self.requests.get(nr.req_id)
            if t is not None:
                t.block_ids = list(nr.block_ids[0])
                self._progress(t, nr.req_id, nr.num_computed_tokens, h, loads)
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            t = self.requests.get(rid)
            if t is None:
                continue
            new = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:  # after preemption: the full new block list
                t.block_ids = list(new[0]) if new else []
            elif new:
                t.block_ids.extend(new[0])
            self._progress(t, rid, cached.num_computed_tokens[i], h, loads)
        for rid, n in so.num_scheduled_tokens.items():  # recomputed in this step, before anything reads them
            if (t := self.requests.get(rid)) is not None:
                self.guard.reached(rid, t.computed, t.computed + n)
        saves = [s for rid, n in so.num_scheduled_tokens.items() if (s := self._save(rid, n, h)) is not None]
        return StepPlan(tuple(loads), tuple(saves), finished, *self.guard.plan_fields())

    def _progress(self, t: _Tracked, rid: str, num_computed: int, h: ModelHandle, loads: list[LoadSpec]) -> None:
        t.computed = num_computed
        if not t.pending_load:
            return
        c = h.chunk_tokens
        start, end = num_computed - t.pending_load, num_computed
        t.pending_load = 0
        first, last = start // c, -(-end // c)
        if start % self.block_size or end > len(t.hashes) * c + t.tail_tokens or start < 0:
            # Not a range this plan can express; the worker reports it failed, vLLM recomputes it.
            logger.warning("kvd: load of tokens [%d, %d) of %s does not start on a block or ends past the "
                           "stored entries; recomputing", start, end, rid)
        keys, last_tokens = t.keys(first, last)
        loads.append(LoadSpec(rid, t.namespace, first, keys, start, end, tuple(t.block_ids), last_tokens, t.epoch))
        t.next_save = max(t.next_save, min(last, len(t.hashes)))
        t.tail_saved = t.tail_saved or last > len(t.hashes)

    def _save(self, rid: str, num_scheduled: int, h: ModelHandle) -> SaveSpec | None:
        t = self.requests.get(rid)
        if t is None or not self.can_save:
            return None
        reached = t.computed + num_scheduled
        spec = self._save_prompt(t, rid, min(reached, t.num_prompt), h)
        if spec is None and reached > t.num_prompt and self.settings.save_decode:
            # A prompt chunk due in the same step goes first; a decode chunk then waits one step (its
            # blocks stay allocated while the request runs).
            spec = self._save_decode(t, rid, reached, h)
        return spec

    def _save_prompt(self, t: _Tracked, rid: str, reached: int, h: ModelHandle) -> SaveSpec | None:
        c = h.chunk_tokens
        done = reached // c
        # The tail goes with (or after) the last full chunk, once its tokens are computed.
        with_tail = (t.tail is not None and not t.tail_saved and done >= len(t.hashes)
                     and reached >= len(t.hashes) * c + t.tail_tokens)
        if done <= t.next_save and not with_tail:
            return None
        first = min(t.next_save, len(t.hashes))
        t.next_save = max(t.next_save, done)
        last = len(t.hashes) + 1 if with_tail else done
        keys, last_tokens = t.keys(first, last)
        t.tail_saved = t.tail_saved or with_tail
        if not keys:
            return None
        return SaveSpec(rid, t.namespace, first, keys, tuple(t.block_ids), t.num_prompt, last_tokens,
                        self._aliases(t, h, first, last), t.epoch)

    def _save_decode(self, t: _Tracked, rid: str, reached: int, h: ModelHandle) -> SaveSpec | None:
        """Chunks past the prompt's full chunks that hold only computed tokens with final ids."""
        ids = getattr(t.request, "all_token_ids", None)
        if ids is None:
            return None
        c = h.chunk_tokens
        done = min(reached, len(ids)) // c
        first = t.next_decode
        if done <= first:
            return None
        t.next_decode = done
        seq = as_token_array(ids[: done * c])
        hashes = prefix_hashes(seq, chunk_tokens=c, namespace=t.namespace, fingerprint=h.fingerprint)
        aliases = prefix_aliases(seq, hashes[first:done], chunk_tokens=c, block_tokens=self.block_size,
                                 namespace=t.namespace, fingerprint=h.fingerprint, first_chunk=first)
        self.session.counters["decode_chunks_planned"] += done - first
        return SaveSpec(rid, t.namespace, first, tuple(hashes[first:done]), tuple(t.block_ids),
                        max(len(ids), done * c), 0, tuple(tuple(a) for a in aliases), t.epoch)

    def _aliases(self, t: _Tracked, h: ModelHandle, first: int, last: int) -> tuple[tuple[tuple[str, int], ...], ...]:
        """Per entry ``first..last-1`` (index ``len(hashes)`` is the tail), ``(key, tokens)`` of its
        block-aligned proper prefixes: the tail keys of shorter prompts that end inside it.
        Example: chunk 256, block 128: one alias per chunk (its first 128 tokens); a 128-token tail: none."""
        c, b, full = h.chunk_tokens, self.block_size, min(last, len(t.hashes))
        out = [tuple(a) for a in prefix_aliases(t.token_ids, t.hashes[first:full], chunk_tokens=c, block_tokens=b,
                                                 namespace=t.namespace, fingerprint=h.fingerprint, first_chunk=first)]
        if last > len(t.hashes):  # the tail's leading blocks, chained after the last full chunk like it
            parent = t.hashes[-1] if t.hashes else None
            out.append(tuple((prefix_tail_hash(t.token_ids, chunk_tokens=c, tail_tokens=n, namespace=t.namespace,
                                               fingerprint=h.fingerprint, parent=parent), n)
                             for n in range(b, t.tail_tokens, b)))
        return tuple(out)

    def on_load_errors(self, invalid_block_ids: Iterable[int]) -> None:
        """Chunks whose blocks failed to load are recomputed by vLLM; save them again once they are."""
        bad = set(invalid_block_ids)
        self.guard.failed(bad, {rid: t.block_ids for rid, t in self.requests.items()})
        if not bad or self.session.handle() is None:
            return
        per_chunk = self.session.handle().chunk_tokens // self.block_size
        for t in self.requests.values():
            idx = [i for i, b in enumerate(t.block_ids) if b in bad]
            if idx:
                t.epoch += 1  # saves planned from now on come after vLLM's recompute of those blocks
                t.next_save = min(t.next_save, idx[0] // per_chunk)
                t.next_decode = min(t.next_decode, max(len(t.hashes), idx[0] // per_chunk))
                t.hits = min(t.hits, idx[0] // per_chunk)
                t.tail_hit = t.tail_saved = False  # it comes after the failed blocks: recomputed, saved again

    def finished(self, req_id: str) -> None:
        if (t := self.requests.pop(req_id, None)) is not None and t.waiting_since is not None:  # aborted waiting
            self.session.counters["promote_wait_s"] += self.clock() - t.waiting_since
