"""What a vLLM worker knows of failed loads, and which saves they spoil (``LoadFailures``).

A load that fails leaves blocks holding nothing; vLLM recomputes them (``kv_load_failure_policy:
"recompute"``), but KV computed over them before that must never be stored:

- **the loading request** is tainted until the scheduler has heard of the failure: its KV past the
  failure was computed over the empty blocks, in that step and, under vLLM's async scheduling, in the
  steps already planned before the failure reached the scheduler. Its saves are dropped while their
  ``epoch`` (``kvd.connectors.vllm.plan``) is not newer than the failed load's; the scheduler bumps the
  epoch when it learns of the failure (``on_load_errors``), so saves planned after vLLM's recompute go
  through. A finished request is forgotten (``StepPlan.finished``).
- **other requests** can read the failed blocks too: vLLM's prefix cache shares a block with later
  requests as soon as it is allocated, connector-loaded ones included. A save that reads a block whose
  load failed is dropped (its request tainted like the loader) in that step, and in the next one until
  the scheduler echoes the failed blocks it has heard of (``StepPlan.heard``; vLLM 0.32 runs at most
  one step ahead).
- **other tensor-parallel ranks**: each rank holds its own heads, but the layers mix heads across ranks
  (the attention output's row-parallel projection, the MLP's all-reduce), so a token computed over
  blocks one rank failed to fill is wrong on every rank. At the end of each step with loads, the ranks
  exchange the first token each failed to load, per planned load (``merge``: an all-reduce over vLLM's
  tensor-parallel group, the same call on every rank since every rank gets the same plan), and each
  rank fails what any rank failed, before any save of the step is committed.
- **until recomputed**: under the ``recompute`` policy vLLM keeps the failed blocks in its prefix cache
  and recomputes them in place as the loading request proceeds, so until then a request scheduled
  after the failure can still take them as a prefix hit. The scheduler guards each failed block
  (``BlockGuard``, sent in every plan as ``StepPlan.guarded``) until the loading request's recompute
  has reached its end, or vLLM allocates the block afresh to a request (its content is replaced);
  a save that reads a guarded block is dropped. A recompute starts at or before the block: progress
  past a block taken back as a prefix hit (the loader resumed after preemption) rewrites nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from kvd.connectors.vllm.plan import LoadSpec, SaveSpec, StepPlan

NO_FAILURE = 1 << 62  # ``merge``: a load no token of which failed


class LoadFailures:
    """``merge``: under tensor parallelism, this rank's first failed token per planned load -> every
    rank's smallest (None: one rank)."""

    def __init__(self, merge: Callable[[list[int]], list[int]] | None = None) -> None:
        self.merge = merge
        self.tainted: dict[str, int] = {}  # request -> epoch of its last failed load
        self.failed_before: set[int] = set()  # the last step's failed blocks the scheduler has not heard of
        self.first: dict[str, int] = {}  # this step: request -> first token not loaded
        self.guarded: frozenset[int] = frozenset()  # failed blocks not recomputed yet (``BlockGuard``)

    def begin_step(self, plan: StepPlan) -> None:
        self.first = {}
        self.guarded = frozenset(plan.guarded)
        self.failed_before.difference_update(plan.heard)
        for rid in plan.finished:
            self.tainted.pop(rid, None)

    def _taint(self, rid: str, epoch: int) -> None:
        self.tainted[rid] = max(self.tainted.get(rid, epoch), epoch)

    def failed(self, spec: LoadSpec, token: int) -> None:
        """Tokens from ``token`` on of ``spec`` were not loaded."""
        self._taint(spec.req_id, spec.epoch)
        self.first[spec.req_id] = min(self.first.get(spec.req_id, token), token)

    def from_other_ranks(self, loads: Iterable[LoadSpec]) -> list[tuple[LoadSpec, int]]:
        """The planned loads some other rank failed earlier than this one, with that token; every rank
        calls this at the same point of each step with loads (a collective)."""
        if self.merge is None:
            return []
        loads = list(loads)
        mine = [self.first.get(s.req_id, NO_FAILURE) for s in loads]
        return [(s, first) for s, own, first in zip(loads, mine, self.merge(mine)) if first < own]

    def spoils(self, spec: SaveSpec, failed_now: set[int]) -> bool:
        """Whether ``spec`` stores KV computed over blocks a load did not fill: its request's own failed
        load (until a newer epoch), or blocks that failed in this step (``failed_now``) or the last."""
        if failed_now.intersection(spec.block_ids):
            self._taint(spec.req_id, spec.epoch)
        epoch = self.tainted.get(spec.req_id)
        if epoch is not None and spec.epoch > epoch:
            del self.tainted[spec.req_id]
            epoch = None
        return (epoch is not None or bool(self.failed_before.intersection(spec.block_ids))
                or bool(self.guarded.intersection(spec.block_ids)))

    def end_step(self, failed_blocks: set[int]) -> None:
        """The step's failed blocks, as reported to vLLM: protected until the scheduler echoes them."""
        self.failed_before = set(failed_blocks)


class BlockGuard:
    """Scheduler side: the failed blocks vLLM has not recomputed or replaced yet (the module docstring).
    ``block_size``: vLLM's (manager) block size."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        # block -> (loading request, the block's first token (None once its recompute started), its end)
        self.blocks: dict[int, tuple[str, int | None, int]] = {}
        self.heard: set[int] = set()  # failed blocks learnt of since the last plan (``StepPlan.heard``)

    def failed(self, bad: set[int], block_lists: Mapping[str, Sequence[int]]) -> None:
        """vLLM reported ``bad``; ``block_lists``: each tracked request's blocks, in token order."""
        self.heard |= bad
        owned = set()
        for rid, blocks in block_lists.items():
            for i, b in enumerate(blocks):
                if b in bad:
                    self.blocks[b] = (rid, i * self.block_size, (i + 1) * self.block_size)
                    owned.add(b)
        for b in bad - owned:  # no tracked request recomputes it: guarded until allocated afresh
            self.blocks[b] = ("", NO_FAILURE, NO_FAILURE)

    def reached(self, rid: str, computed: int, token: int) -> None:
        """Request ``rid``, having computed ``computed`` tokens, computes in this step up to ``token``.
        A block is recomputed once its request computes it from its start: a request past its start
        (vLLM gave it back as a prefix hit, e.g. to the loader resumed after preemption, or it is one
        vLLM lets keep a block another request recomputes) never rewrites it."""
        for b, (owner, start, end) in list(self.blocks.items()):
            if owner == rid and (start is None or computed <= start):
                if end <= token:
                    del self.blocks[b]
                else:
                    self.blocks[b] = (owner, None, end)  # under way: later steps continue it

    def allocated(self, so, pending_load: Mapping[str, int]) -> None:
        """Let go of the blocks vLLM's ``SchedulerOutput`` ``so`` allocated anew: a request's blocks past
        its own prefix-cache hit (``num_computed_tokens`` less the tokens a connector loads into them,
        ``pending_load``), whose old content is being replaced; a running request's added blocks."""
        fresh: list[int] = []
        for nr in so.scheduled_new_reqs:
            hit = nr.num_computed_tokens - pending_load.get(nr.req_id, 0)
            fresh += nr.block_ids[0][hit // self.block_size:] if nr.block_ids else []
        c = so.scheduled_cached_reqs
        for rid, new, computed in zip(c.req_ids, c.new_block_ids, c.num_computed_tokens):
            if new:  # resumed after preemption: the whole list, its own cache hit first
                hit = computed - pending_load.get(rid, 0) if rid in c.resumed_req_ids else 0
                fresh += new[0][hit // self.block_size:]
        for b in fresh:
            self.blocks.pop(b, None)

    def plan_fields(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(heard, guarded)`` for the next plan; ``heard`` only once."""
        heard, self.heard = tuple(self.heard), set()
        return heard, tuple(self.blocks)
