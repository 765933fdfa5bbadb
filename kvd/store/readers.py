"""What a reader reads of an entry: every extent (exact readers) or only what its head map attends to.

Two kinds of reader (``reader`` in lookup and lease requests, issue 12):

- **exact** (vLLM, SGLang): every head, every token. An entry is usable only if every extent has a
  copy it accepts; one whose far local extents were dropped (``local_cold_codec = drop``) or are held
  only lossy is a miss from that entry on, and the engine recomputes the rest (``accept_lossy``
  takes the lossy bytes instead, flagged).
- **head-aware** (the transformers adapter, chunk reuse), under a named head map that must be the
  registered model's: the global extent in full, and each local window group only where the entry's
  tokens overlap the group's sink or its window before the reader's ``position``
  (``kvd.core.extents.needed``). Only those extents are promoted, leased and copied; the rest stay
  where they are (cold stays cold), and their absence (dropped, lost) does not make the entry a miss.
  ``position`` applies to prefix entries; without one, and for chunk entries (reused at new
  positions), every token of the classes asked for is read. A trimmed extent (capacity mode, only in
  entries computed under a head map, so never an exact reader's) serves from the position where it
  holds all the reader reads (``trimmed_from``).

Head-aware prefix hits: a reader that loads ``K`` leading chunks sits at position ``P_K`` (their
tokens, or fewer when it loads only the leading tokens of the last: the same prompt again loads all
but its last token), and entry ``j < K`` must hold every extent needed at ``P_K``. An entry lacking local groups
becomes usable once the reader is far enough past it (``usable_from``), so the longest usable run is
not the first break: loading 16 chunks may work where loading 12 does not (the 12th's window heads
were dropped at store time because the stored sequence went on). ``head_aware_hits`` finds the
longest run in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvd.core import protocol as P
from kvd.core.errors import HeadMapError, InvalidRequest
from kvd.core.extents import covers, matches, needed, trimmed_from
from kvd.store.entries import Entry, ModelRecord


@dataclass(frozen=True, slots=True)
class Reader:
    head_aware: bool
    accept_lossy: bool
    classes: tuple[str, ...] | None  # a class filter (names or kinds); None: every class

    def wanted(self, e: Entry, position: int | None) -> list[str]:
        """The classes of ``e`` this reader reads when its next query sits at ``position``."""
        out = [c for c in e.extents if self.classes is None or any(matches(c, w) for w in self.classes)]
        if self.head_aware and e.kind == "prefix" and position is not None:
            out = [c for c in out if needed(e.extents[c].plan, e.start_token, e.num_tokens, position)]
        return out

    def serves(self, e: Entry, position: int | None) -> bool:
        """Every trimmed extent of ``e`` this reader reads at ``position`` holds all it reads there
        (``covers``): one read from an earlier position, or without a position (every token), would
        give the reader part of the tokens it attends to. An entry with no trimmed extent: always."""
        if not e.is_trimmed:
            return True
        return self.head_aware and e.kind == "prefix" and position is not None and all(
            covers(e.extents[c].plan, e.start_token, e.num_tokens, position) for c in self.wanted(e, position))

    def usable_from(self, e: Entry) -> float:
        """The least position at which this head-aware reader can load ``e`` (wholly or its leading
        tokens): anywhere inside it when nothing it reads is missing; else only once it sits past the
        window of every local group ``e`` lacks (``end + window - 1``), and never if it lacks a
        global extent or a group whose sink it overlaps, or is a chunk entry lacking anything."""
        end = e.start_token + e.num_tokens
        at = float(e.start_token + 1)
        for c, x in e.extents.items():
            if self.classes is not None and not any(matches(c, w) for w in self.classes):
                continue
            p = x.plan
            if x.usable(self.accept_lossy):
                if p.is_trimmed:
                    at = max(at, trimmed_from(p, e.start_token, e.num_tokens))
                continue
            if p.window == 0 or e.kind != "prefix" or e.start_token < p.sink:
                return math.inf
            at = max(at, end + p.window - 1)
        return at


#: An engine's reader (vLLM, SGLang): every head, every token, no lossy bytes; what the shared lookup
#: index describes (``kvd.store.published``).
EXACT_READER = Reader(head_aware=False, accept_lossy=False, classes=None)


def readable_by(reader: Reader, e: Entry, computed_under: str) -> bool:
    """Can ``reader``, computing under ``computed_under``, read ``e`` at all: KV computed under the same
    attention, and for an exact reader no trimmed extent (a miss, never part of the tokens)."""
    return e.computed_under == computed_under and (reader.head_aware or not e.is_trimmed)


def reader_of(model: ModelRecord, req: P.LookupRequest | P.LeaseRequest) -> Reader:
    """The request's reader, checked against the registered model: a class filter must name its
    classes or kinds, a head-aware reader's head map must be the model's (else 400 naming both)."""
    # Each name once: a filter is matched against every extent of every entry leased, and repeats
    # (a million, within the body limit) would hold the event loop that long for nothing.
    classes = tuple(dict.fromkeys(req.classes)) if isinstance(req, P.LeaseRequest) and req.classes is not None else None
    if classes is not None:
        known = set(model.plans(1))
        bad = [c for c in classes if not any(matches(k, c) for k in known)]
        if bad:
            raise InvalidRequest(f"classes {bad} unknown; this model's head classes are {sorted(known)} "
                                 f"(or the kinds 'global', 'local')")
    if req.reader == "head_aware":
        mine = model.attention
        if req.head_map != mine:
            raise HeadMapError(f"head-aware reader under head map {req.head_map}, but model "
                               f"{model.spec.model_id} is registered with head map {mine}: extents are laid "
                               f"out by that map; register the reader's map or read exact")
    return Reader(req.reader == "head_aware", req.accept_lossy, classes)


def head_aware_hits(reader: Reader, found: list[tuple[int, Entry, int]], max_tokens: int | None) -> tuple[int, int]:
    """``(K, P)``: the longest leading run of prefix entries a head-aware reader can load, and the
    position it then sits at: the run's tokens, or ``max_tokens`` when that ends inside the last
    entry (the reader loads its leading tokens and computes the rest, as for the same prompt again).
    ``found``: ``(request index, entry, tokens used)`` in request order."""
    best = (0, 0)
    need = 0.0  # the largest usable_from of the run so far
    tokens = 0
    for k, (i, e, n) in enumerate(found):
        if i != k or (max_tokens is not None and tokens >= max_tokens):
            break
        tokens += n
        pos = tokens if max_tokens is None else min(tokens, max_tokens)
        need = max(need, reader.usable_from(e))
        if need <= pos:
            best = (k + 1, pos)
    return best
