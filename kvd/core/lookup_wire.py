"""The compact encoding of the lookup hot path: ``POST /v1/lookup`` with ``Content-Type:
application/x-kvd-lookup`` for the request and the answer, on the same socket; every other call, and a
lookup sent as JSON, stays JSON (``kvd.core.protocol``). Errors are JSON either way.

Why: a 128-chunk lookup is the call every request makes before it is scheduled. As JSON, with
pydantic on both sides, the daemon validated 128 hex strings against a pattern and wrote 128 JSON rows,
and the client validated those rows into 128 pydantic objects, which cost more than the daemon's
whole answer (measured per 128-hit lookup, docs/benchmarks.md). Here hashes travel as their 16 raw
bytes (any 16 bytes are a valid hash: nothing to check per hash), answer rows are fixed-size
records, and the client builds plain tuples. Token ids are not carried: a reader that sends token
ids uses JSON.

Request, little-endian::

    magic           4s   b"KVL1"
    flags           B    1 prefetch | 2 accept_lossy | 4 max_tokens given | 8 chunk_num_tokens given
    fingerprint     B length, then that many UTF-8 bytes (namespace and computed_under the same)
    namespace       B + bytes
    computed_under  B + bytes
    max_tokens      Q    only with flag 4
    prefix hashes   I count, then count x 16 bytes
    chunk hashes    I count, then count x 16 bytes
    chunk_num_tokens  count x I, one per chunk hash, only with flag 8

Answer::

    magic b"KVA1", chunk_tokens I, num_prefix_hits I
    names       B count, then each B length + ASCII: the tier and head-class names the rows use
    class sets  B count, then each B n + n x B (name index)
    rows        I prefix count, I chunk count, then each row: index I, tier B (name index),
                classes B (set index), complete B, num_tokens I
    A row's hash is not sent: it is the request's hash at the row's index.

Decoding a request checks every field and raises ``InvalidRequest`` naming it (the middleware answers
400), so the control API's rule holds for this encoding too: every bad input is a 4xx naming what was
wrong. Fingerprint, namespace and computed_under go through ``LookupRequest``'s own validators.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from kvd.core.errors import InvalidRequest
from kvd.core.protocol import LookupRequest

CONTENT_TYPE = "application/x-kvd-lookup"
REQUEST_MAGIC, ANSWER_MAGIC = b"KVL1", b"KVA1"
F_PREFETCH, F_LOSSY, F_MAX_TOKENS, F_CHUNK_TOKENS = 1, 2, 4, 8
_KNOWN_FLAGS = F_PREFETCH | F_LOSSY | F_MAX_TOKENS | F_CHUNK_TOKENS
HASH_BYTES = 16
_ROW = struct.Struct("<IBBBI")
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class LookupRow(NamedTuple):
    """One found entry, as ``protocol.EntryStatus`` (same fields), without pydantic's cost."""

    index: int
    hash: str
    tier: str
    classes: tuple[str, ...]
    complete: bool
    num_tokens: int


@dataclass(slots=True, frozen=True)
class LookupAnswer:
    """A lookup's answer (the fields of ``protocol.LookupResponse``), decoded from the compact form."""

    chunk_tokens: int
    num_prefix_hits: int
    prefix: Sequence[LookupRow]  # a list, or rows built on first use (``kvd.client.local_lookup``)
    chunks: Sequence[LookupRow]

    def leading_tiers(self) -> list[str]:
        """The tier of each leading hit (what an engine plans its load by), without building rows
        where the answer can say it directly."""
        fast = getattr(self.prefix, "leading_tiers", None)
        if fast is not None:
            return fast(self.num_prefix_hits)
        return [r.tier for r in self.prefix[: self.num_prefix_hits]]


class _Row(Protocol):  # the daemon's rows (kvd.store.answers.EntryRow); core imports no store
    index: int
    tier: str
    classes: tuple[str, ...]
    complete: bool
    num_tokens: int


class _Result(Protocol):
    chunk_tokens: int
    num_prefix_hits: int
    prefix: list[_Row]
    chunks: list[_Row]


# ---- request ----------------------------------------------------------------------------------------


def _short(name: str, value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"{name} is {len(raw)} bytes; the compact lookup carries at most 255")
    return bytes([len(raw)]) + raw


def _hashes(name: str, hashes: list[str] | None) -> bytes:
    hashes = hashes or []
    try:
        raw = bytes.fromhex("".join(hashes))
    except ValueError:
        raise ValueError(f"{name}: not all hex") from None
    if len(raw) != HASH_BYTES * len(hashes):
        raise ValueError(f"{name}: every hash must be 32 hex characters")
    return _U32.pack(len(hashes)) + raw


CARRIED = frozenset({"fingerprint", "namespace", "computed_under", "prefetch", "accept_lossy", "max_tokens",
                     "prefix_hashes", "chunk_hashes", "chunk_num_tokens", "token_ids"})


def encode_lookup(req: LookupRequest) -> bytes:
    """The compact body of ``req``. ``ValueError`` for what it cannot carry: token ids, and any other
    field of the request model not at its default (a field added later is never dropped silently)."""
    if req.token_ids is not None:
        raise ValueError("the compact lookup carries hashes, not token ids; send token ids as JSON")
    for name, f in type(req).model_fields.items():
        if name not in CARRIED and getattr(req, name) != f.get_default(call_default_factory=True):
            raise ValueError(f"the compact lookup does not carry {name}; send this lookup as JSON")
    flags = (F_PREFETCH * req.prefetch | F_LOSSY * req.accept_lossy | F_MAX_TOKENS * (req.max_tokens is not None)
             | F_CHUNK_TOKENS * (req.chunk_num_tokens is not None))
    parts = [REQUEST_MAGIC, bytes([flags]), _short("fingerprint", req.fingerprint), _short("namespace", req.namespace),
             _short("computed_under", req.computed_under)]
    if req.max_tokens is not None:
        parts.append(_U64.pack(req.max_tokens))
    parts += [_hashes("prefix_hashes", req.prefix_hashes), _hashes("chunk_hashes", req.chunk_hashes)]
    if req.chunk_num_tokens is not None:
        parts.append(struct.pack(f"<{len(req.chunk_num_tokens)}I", *req.chunk_num_tokens))
    return b"".join(parts)


class _Reader:
    """Reads fields off a body; every shortfall is an ``InvalidRequest`` naming the field."""

    def __init__(self, body: bytes) -> None:
        self.body, self.at = memoryview(body), 0

    def take(self, n: int, field: str) -> memoryview:
        if self.at + n > len(self.body):
            raise InvalidRequest(f"{field}: the compact lookup body ends {self.at + n - len(self.body)} bytes "
                                 f"short of it ({len(self.body)} bytes in all)")
        out = self.body[self.at : self.at + n]
        self.at += n
        return out

    def text(self, field: str) -> str:
        n = self.take(1, field)[0]
        try:
            return bytes(self.take(n, field)).decode()
        except UnicodeDecodeError:
            raise InvalidRequest(f"{field}: not UTF-8") from None

    def hashes(self, field: str) -> list[str]:
        n = _U32.unpack(self.take(4, field))[0]
        return list(map(self.take(n * HASH_BYTES, field).hex().__getitem__, _slices(n)))


_SLICES: dict[int, list[slice]] = {}


def _slices(n: int) -> list[slice]:
    """The slices cutting ``n`` hashes' hex out of one string (cached: counts repeat; map over them
    runs in C, a third faster than a comprehension for 128 hashes)."""
    out = _SLICES.get(n)
    if out is None:
        out = [slice(i, i + 2 * HASH_BYTES) for i in range(0, 2 * HASH_BYTES * n, 2 * HASH_BYTES)]
        if n <= 4096 and len(_SLICES) < 64:
            _SLICES[n] = out
    return out


def decode_lookup(body: bytes) -> LookupRequest:
    """The ``LookupRequest`` of a compact body; ``InvalidRequest`` (or pydantic's ``ValidationError``
    for fingerprint, namespace, computed_under and max_tokens) naming the bad field."""
    r = _Reader(body)
    magic = bytes(r.take(4, "magic"))
    if magic != REQUEST_MAGIC:
        raise InvalidRequest(f"magic: {magic!r} is not a compact lookup (b'KVL1'); send JSON with "
                             "Content-Type: application/json")
    flags = r.take(1, "flags")[0]
    if flags & ~_KNOWN_FLAGS:
        raise InvalidRequest(f"flags: unknown bits {flags & ~_KNOWN_FLAGS:#x}")
    small = {"fingerprint": r.text("fingerprint"), "namespace": r.text("namespace"),
             "computed_under": r.text("computed_under"), "prefetch": bool(flags & F_PREFETCH),
             "accept_lossy": bool(flags & F_LOSSY)}
    if flags & F_MAX_TOKENS:
        small["max_tokens"] = _U64.unpack(r.take(8, "max_tokens"))[0]
    req = LookupRequest.model_validate(small)  # the same validators as JSON for these fields
    prefix, chunks = r.hashes("prefix_hashes"), r.hashes("chunk_hashes")
    lengths = None
    if flags & F_CHUNK_TOKENS:
        lengths = list(struct.unpack(f"<{len(chunks)}I", r.take(4 * len(chunks), "chunk_num_tokens")))
        if any(n > 1 << 20 for n in lengths):
            raise InvalidRequest("chunk_num_tokens: a chunk of more than 1048576 tokens")
    if r.at != len(body):
        raise InvalidRequest(f"body: {len(body) - r.at} bytes after the last field of the compact lookup")
    # Hashes decoded from raw bytes are valid by construction: set without the per-hash pattern check.
    req.prefix_hashes, req.chunk_hashes, req.chunk_num_tokens = prefix or None, chunks or None, lengths
    return req


# ---- answer ------------------------------------------------------------------------------------------


def encode_answer(result: _Result) -> bytes:
    """The compact answer of the daemon's lookup result (``kvd.store.answers.LookupResult``). The rows
    are packed by one ``struct`` call (per-row packing was most of the encoding's time)."""
    names: dict[str, int] = {}
    sets: dict[tuple[str, ...], int] = {}
    flat: list = []
    for r in (*result.prefix, *result.chunks):
        tier = names.get(r.tier)
        if tier is None:
            tier = names[r.tier] = len(names)
        cls = sets.get(r.classes)
        if cls is None:
            for c in r.classes:
                names.setdefault(c, len(names))
            cls = sets[r.classes] = len(sets)
        flat += (r.index, tier, cls, r.complete, r.num_tokens)
    head = [ANSWER_MAGIC, struct.pack("<II", result.chunk_tokens, result.num_prefix_hits), bytes([len(names)])]
    head += [bytes([len(n)]) + n.encode() for n in names]
    head.append(bytes([len(sets)]))
    head += [bytes([len(k), *(names[c] for c in k)]) for k in sets]
    head.append(struct.pack("<II", len(result.prefix), len(result.chunks)))
    head.append(_rows_struct(len(flat) // 5).pack(*flat))
    return b"".join(head)


_ROWS: dict[int, struct.Struct] = {}


def _rows_struct(n: int) -> struct.Struct:
    """The struct of ``n`` rows (cached: row counts repeat)."""
    out = _ROWS.get(n)
    if out is None:
        out = struct.Struct("<" + _ROW.format[1:] * n)
        if n <= 4096 and len(_ROWS) < 64:
            _ROWS[n] = out
    return out


def decode_answer(body: bytes, req: LookupRequest) -> LookupAnswer:
    """The answer to ``req`` (whose hashes the rows' indexes name). ``ValueError`` if malformed."""
    r = _Reader(body)
    try:
        if bytes(r.take(4, "magic")) != ANSWER_MAGIC:
            raise ValueError("not a compact lookup answer")
        chunk_tokens, hits = struct.unpack("<II", r.take(8, "header"))
        names = [bytes(r.take(r.take(1, "names")[0], "names")).decode() for _ in range(r.take(1, "names")[0])]
        sets = [tuple(names[i] for i in r.take(r.take(1, "sets")[0], "sets")) for _ in range(r.take(1, "sets")[0])]
        n_prefix, n_chunk = struct.unpack("<II", r.take(8, "counts"))
        rows = list(_ROW.iter_unpack(r.take(_ROW.size * (n_prefix + n_chunk), "rows")))

        def built(part: list, keys: list[str]) -> list[LookupRow]:
            # tuple.__new__: without NamedTuple's Python-level __new__ (a third of the time)
            return [tuple.__new__(LookupRow, (i, keys[i], names[t], sets[c], complete != 0, n))
                    for i, t, c, complete, n in part]

        prefix, chunks = built(rows[:n_prefix], req.prefix_hashes or []), built(rows[n_prefix:], req.chunk_hashes or [])
    except (InvalidRequest, IndexError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"malformed compact lookup answer: {e}") from None
    if r.at != len(body):
        raise ValueError("malformed compact lookup answer: trailing bytes")
    return LookupAnswer(chunk_tokens, hits, prefix, chunks)
