"""The Lil guard: notice when head-aware decoding starts to loop, then restore full KV or stop.

Lil (arXiv 2601.03043, "Less is Less"): decoding with sparse or truncated KV can make outputs *longer*
— the model loses what it said and repeats itself or rambles, so the compute saved per token is lost
to tokens that should never have been generated. kvd's transformers adapter decodes under a head map
(local heads keep only sink + window), so it watches for this.

**Signal.** The compression ratio of the last ``window`` generated token ids (``compression_ratio``:
raw bytes over zlib-compressed bytes, zlib being LZ77 + Huffman): a loop is an LZ77 back-reference
repeated, so a window that holds one compresses far better than fresh text, whatever the tokens
mean, at a few microseconds per step and with no model call. The thresholds (``GuardConfig``
defaults) were chosen on generations of SmolLM2 under full KV and under an aggressive map on
calibration prompts (seeds < 1000), never on the benchmark's held-out prompts:
``benchmarks/head_aware.py --only lil-calibrate`` and docs/transformers.md give the data. Second
signal, where the caller knows it (``expect(tokens)``): the full-KV length; decoding past
``length_slack`` times it trips too.

**Actions** (``GuardConfig.action``):

- ``restore`` (default): every local head gets its full KV back (``kvd.connectors.hf.restore``: the
  prompt's chunks from the daemon, the rest from a host stash of trimmed pages) and decoding goes on
  *exact*: from the trip on, the continuation is the one a cache that had kept full KV for the local
  heads would give. If the restore cannot find every page, the guard stops instead; if a whole window
  of exact tokens after the restore still loops (``stop_if_still_looping``: the loop now feeds on its
  own text in the context, and full KV continues it too), it stops then.
- ``rerun``: decode the request again from the end of its prompt with every head global (a fresh
  exact cache, ``KvdCache.exact``), and return that output. Whenever the guard trips, the answer is
  the one full KV gives (the same cache an unmapped ``attach`` gives, so the same bits); the price is
  the head-aware tokens decoded before the trip, spent for nothing. Why it exists: a restore keeps the
  text decoded under the map, and by the time a loop shows in the tokens that text has already gone
  astray (the held-out benchmark: +29 % mean length under ``restore``, most restored generations
  still looping); only decoding again undoes it (there: −14 %, every tripped request's output equal
  to full KV's, at 23 % more tokens decoded than full KV). Needs ``kvd.connectors.hf.generate`` (below):
  transformers' ``generate`` cannot take tokens back, so under a plain ``model.generate`` the guard
  only stops at the trip and logs that a rerun is due.
- ``stop``: end the request early (the Lil paper's remedy).

``generate`` ends a request only through a stopping criterion: pass ``stopping_criteria=[cache.guard]``
(the guard is one) for it to stop, or call ``generate`` of this module, which adds it and carries out
the rerun. Without it the forward hook still watches and restores (same trip point), but a stop is
only logged and counted, and decoding goes on (exact after a restore).

Counters (``LilGuard.stats``): trips, restores, reruns, stops (after a trip or a restore), restore
failures, tokens decoded head-aware and exact, where and why it tripped. Each trip and its outcome is logged (INFO, ``kvd.connectors.hf.guard``).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from transformers.generation.stopping_criteria import StoppingCriteria

logger = logging.getLogger(__name__)


def compression_ratio(tokens: Sequence[int]) -> float:
    """``len(raw) / len(zlib(raw))`` of token ids as little-endian uint32 (any vocabulary fits).

    Example: 64 tokens of fresh text give about 1.6-2.0 (the high zero bytes compress); the same
    8 tokens repeated 8 times give about 7.
    """
    raw = np.asarray(tokens, dtype="<u4").tobytes()
    return len(raw) / len(zlib.compress(raw, 9)) if raw else 1.0


@dataclass(slots=True, frozen=True)
class GuardConfig:
    """How the guard watches and what it does (module docstring; defaults chosen as it says)."""

    action: Literal["restore", "rerun", "stop"] = "restore"
    # From benchmarks/head_aware.py --only lil-calibrate (12 calibration prompts, 2026-12-05): for each
    # window, 10 % above the highest ratio any full-KV generation that ended by itself reached; 96 is
    # the window whose threshold caught all 4 runaway generations earliest (124 tokens on average).
    window: int = 96  # generated tokens the ratio is taken over
    ratio: float = 2.51  # trip when the window compresses this well or better
    expected_tokens: int | None = None  # full-KV length where known (per request: LilGuard.expect)
    length_slack: float = 1.5  # trip when decoding passes this times the expected length
    keep_prompt: bool = False  # stash the prompt's trimmed pages too (the daemon may drop local extents)
    # After a restore, a window of exact tokens that still compresses this well means the loop now
    # feeds itself from the context (full KV continues it too): stop rather than spend tokens on it.
    stop_if_still_looping: bool = True

    def __post_init__(self) -> None:
        if self.action not in ("restore", "rerun", "stop"):
            raise ValueError(f"action={self.action!r}: use 'restore', 'rerun' or 'stop'")
        if self.window < 8 or self.ratio <= 1.0 or self.length_slack < 1.0:
            raise ValueError(f"window={self.window} (≥ 8), ratio={self.ratio} (> 1), length_slack="
                             f"{self.length_slack} (≥ 1)")


@dataclass(slots=True)
class GuardStats:
    trips: int = 0
    restores: int = 0
    reruns: int = 0  # requests decoded again with full KV after a trip (action="rerun", through generate)
    stops: int = 0
    restore_failures: int = 0
    tokens_head_aware: int = 0  # tokens decoded (one forward each) under the head map
    tokens_exact: int = 0  # tokens decoded with full KV after a restore, or generated by the rerun
    trip_position: int | None = None  # tokens in the cache when it tripped (the first exact forward's position)
    trip_generated: int | None = None  # generated tokens seen when it tripped
    trip_reason: str | None = None  # "ratio 4.12" or "length 301 > 1.5 x 200"
    restored_from_daemon: int = 0  # positions whose local-head KV came from the daemon
    restored_from_stash: int = 0  # pages put back from the host stash


Mode = Literal["head_aware", "exact", "stopped"]


class LilGuard(StoppingCriteria):
    """One request's guard (one per ``KvdCache``). ``restore`` is the cache's restore callback: it
    returns None on success or the reason it could not restore."""

    def __init__(self, config: GuardConfig, restore: Callable[[], str | None]) -> None:
        self.config = config
        self._restore = restore
        self.stats = GuardStats()
        self.mode: Mode = "head_aware"
        self.prompt_tokens: int | None = None
        self.generated: list[int] = []
        self.expected_tokens = config.expected_tokens
        self.rerun_due = False  # tripped under action="rerun": generate decodes the request again

    def expect(self, tokens: int | None) -> None:
        """The full-KV length of this request's output, where known (None: unknown)."""
        self.expected_tokens = tokens

    @property
    def stopped(self) -> bool:
        return self.mode == "stopped"

    # ---- what the cache tells it -----------------------------------------------------------------

    def start(self, prompt_tokens: int) -> None:
        """The first forward: the prompt (loaded and computed) is ``prompt_tokens`` long."""
        self.prompt_tokens = prompt_tokens

    def count(self, tokens: int) -> None:
        """A decode forward of ``tokens`` tokens is about to run."""
        if self.stats.restores:  # exact since the restore (also if a stop was only logged)
            self.stats.tokens_exact += tokens
        else:
            self.stats.tokens_head_aware += tokens

    def see(self, sequence: Sequence[int] | torch.Tensor) -> None:
        """Watch ``sequence`` (prompt + generated so far, request 0); trips at most once."""
        if self.prompt_tokens is None or self.mode == "stopped":
            return
        new = sequence[self.prompt_tokens + len(self.generated):]
        if len(new) == 0:
            return
        self.generated.extend(new.tolist() if isinstance(new, torch.Tensor) else list(new))
        if self.mode == "head_aware":
            why = self._why()
            if why is not None:
                self._trip(why)
        elif self.config.stop_if_still_looping:
            self._watch_after_restore()

    def _watch_after_restore(self) -> None:
        c = self.config
        if len(self.generated) - self.stats.trip_generated >= c.window:
            r = compression_ratio(self.generated[-c.window:])
            if r >= c.ratio:
                self._stop(f"still looping {c.window} tokens after the restore (ratio {r:.2f})")

    def _stop(self, why: str) -> None:
        self.stats.stops += 1
        self.mode = "stopped"
        logger.info("kvd lil guard: stopping early after %d generated tokens (%s)", len(self.generated), why)

    def _why(self) -> str | None:
        c, n = self.config, len(self.generated)
        if self.expected_tokens and n > c.length_slack * self.expected_tokens:
            return f"length {n} > {c.length_slack} x {self.expected_tokens}"
        if n >= c.window:
            r = compression_ratio(self.generated[-c.window:])
            if r >= c.ratio:
                return f"ratio {r:.2f}"
        return None

    def _trip(self, why: str) -> None:
        st = self.stats
        st.trips += 1
        st.trip_generated = len(self.generated)
        st.trip_position = self.prompt_tokens + len(self.generated) - 1  # the newest token is not in the cache yet
        st.trip_reason = why
        if self.config.action == "rerun":
            self.rerun_due = True
            self.mode = "stopped"
            logger.info("kvd lil guard: tripped after %d generated tokens (%s); the request is decoded again "
                        "with full KV (through kvd.connectors.hf.generate; a plain model.generate stops here)",
                        st.trip_generated, why)
            return
        if self.config.action == "restore":
            failed = self._restore()
            if failed is None:
                st.restores += 1
                self.mode = "exact"
                logger.info("kvd lil guard: tripped after %d generated tokens (%s); local heads restored to "
                            "full KV, decoding exact from position %d", st.trip_generated, why, st.trip_position)
                return
            st.restore_failures += 1
            logger.warning("kvd lil guard: tripped (%s) but could not restore full KV (%s)", why, failed)
        self._stop(why)

    # ---- as a transformers stopping criterion ------------------------------------------------------

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if input_ids.shape[0] == 1:
            self.see(input_ids[0])
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)


def generate(model, input_ids: torch.Tensor, cache, **kwargs) -> torch.Tensor:
    """``model.generate(input_ids, past_key_values=cache, **kwargs)`` under ``cache``'s Lil guard: adds
    the guard to the stopping criteria and, when it tripped under ``action="rerun"``, decodes the
    request again from the end of its prompt with ``cache.exact()`` (same ``kwargs``: the same budget
    of new tokens) and returns that. Without a guard, or for a batch of several requests (which the
    guard does not watch), it is plain ``generate``.

    Example: ``out = generate(model, ids, hf.attach(model, head_map=m, guard=GuardConfig(action="rerun")),
    max_new_tokens=256, do_sample=False)``.
    """
    guard: LilGuard | None = cache.guard
    if guard is None or input_ids.shape[0] != 1:  # the guard watches one request (batches: a warning)
        return model.generate(input_ids, past_key_values=cache, **kwargs)
    mine = list(kwargs.pop("stopping_criteria", None) or [])
    out = model.generate(input_ids, past_key_values=cache, stopping_criteria=[*mine, guard], **kwargs)
    if not guard.rerun_due:
        return out
    out = model.generate(input_ids, past_key_values=cache.exact(), stopping_criteria=mine or None, **kwargs)
    generated = (out if isinstance(out, torch.Tensor) else out.sequences).shape[1] - input_ids.shape[1]
    guard.rerun_due = False
    guard.stats.reruns += 1
    guard.stats.tokens_exact += generated
    logger.info("kvd lil guard: rerun with full KV gave %d tokens (%d decoded under the map before the trip)",
                generated, guard.stats.trip_generated)
    return out


__all__ = ["GuardConfig", "GuardStats", "LilGuard", "compression_ratio", "generate"]
