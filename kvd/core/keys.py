"""Keys: model fingerprints, namespaces, chunking and the 128-bit entry hashes.

Everything here is a pure function of its arguments, stable across processes, machines and Python
hash seeds (``hash()`` is never used): an engine process, the daemon and ``kvctl`` compute the same
keys for the same tokens.

- A **fingerprint** (32 hex chars) names everything that makes KV bytes meaningful. Two engines share
  KV only when their fingerprints are equal; the daemon never serves KV across fingerprints.
- A **prefix hash** names the KV of chunk ``i`` *in the context of chunks 0..i-1*: a chain
  ``h_i = H(h_{i-1} || tokens_i)`` seeded from the namespace and the fingerprint.
- A **content hash** names the KV of a run of tokens computed on its own at positions ``[0, n)``.

Hashes are BLAKE2b with a 16-byte digest: a keyed-free cryptographic hash, so that a tenant cannot
craft a prompt whose hash collides with another prompt's (the reason vLLM moved to SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NewType

import numpy as np

from kvd.core.errors import InvalidRequest

Fingerprint = NewType("Fingerprint", str)  # 32 lowercase hex chars
EntryHash = NewType("EntryHash", str)  # 32 lowercase hex chars
Namespace = NewType("Namespace", str)

HASH_HEX_CHARS = 32
DEFAULT_NAMESPACE = Namespace("default")
_HEX_RE = re.compile(r"^[0-9a-f]{32}$")
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.:@/-]{1,128}$")

# Supported KV dtypes and their sizes in bytes; the names are torch's.
KV_DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.hexdigest()


@dataclass(slots=True, frozen=True)
class ModelSpec:
    """What makes KV bytes meaningful. Its fingerprint is part of every key.

    ``layout`` names how the engine lays out one segment's bytes when that differs from kvd's
    canonical ``K[tokens, head_dim] | V[tokens, head_dim]`` (e.g. an ISA-specific vLLM CPU packing);
    ``canonical`` for everything that goes through kvd's gather/scatter.
    """

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str = "bfloat16"
    revision: str = ""
    rope: dict[str, Any] = field(default_factory=dict)
    layout: str = "canonical"

    def __post_init__(self) -> None:
        if not self.model_id:
            raise InvalidRequest("model_id is empty; pass the model's name or path")
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 < v <= 65536:
                raise InvalidRequest(f"{name}={v!r} is not a positive integer ≤ 65536")
        if self.kv_dtype not in KV_DTYPE_BYTES:
            raise InvalidRequest(
                f"kv_dtype={self.kv_dtype!r} is not supported; use one of {sorted(KV_DTYPE_BYTES)}"
            )

    @property
    def dtype_bytes(self) -> int:
        return KV_DTYPE_BYTES[self.kv_dtype]

    def segment_bytes(self, num_tokens: int) -> int:
        """Bytes of one (entry, layer, KV head) segment: K and V of ``[num_tokens, head_dim]``."""
        return 2 * num_tokens * self.head_dim * self.dtype_bytes

    def fingerprint(self) -> Fingerprint:
        return fingerprint(self)


def fingerprint(spec: ModelSpec) -> Fingerprint:
    """128-bit hash of the spec's canonical JSON (sorted keys, no whitespace)."""
    doc = {
        "v": 1,
        "model_id": spec.model_id,
        "revision": spec.revision,
        "num_layers": spec.num_layers,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "kv_dtype": spec.kv_dtype,
        "rope": spec.rope,
        "layout": spec.layout,
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()
    return Fingerprint(_digest(b"kvd-fingerprint\0", blob))


def check_hash(value: str, what: str = "hash") -> EntryHash:
    if not isinstance(value, str) or not _HEX_RE.match(value):
        raise InvalidRequest(f"{what}={value!r} is not 32 lowercase hex characters")
    return EntryHash(value)


def check_namespace(value: str) -> Namespace:
    if not isinstance(value, str) or not _NAMESPACE_RE.match(value):
        raise InvalidRequest(
            f"namespace={value!r} is invalid; use 1-128 characters from letters, digits and _.:@/-"
        )
    return Namespace(value)


def as_token_array(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as a little-endian int64 array (the byte form every hash is computed over)."""
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise InvalidRequest(f"token ids must be a flat sequence, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidRequest(f"token ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype("<i8", copy=False)
    if arr.size and int(arr.min()) < 0:
        raise InvalidRequest(f"token ids must be ≥ 0, got {int(arr.min())}")
    return arr


def num_full_chunks(num_tokens: int, chunk_tokens: int) -> int:
    return num_tokens // chunk_tokens


def chunk_spans(num_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every *full* chunk. A trailing partial chunk gets no prefix entry.

    Example: 600 tokens, chunk 256 -> [(0, 256), (256, 512)]; tokens 512..599 are not cached.
    """
    return [(i * chunk_tokens, (i + 1) * chunk_tokens) for i in range(num_tokens // chunk_tokens)]


def _seed(namespace: str, fp: str) -> bytes:
    return f"kvd-prefix\0{namespace}\0{fp}\0".encode()


def prefix_hashes(
    token_ids: Sequence[int] | np.ndarray,
    *,
    chunk_tokens: int,
    namespace: str,
    fingerprint: str,
    max_chunks: int | None = None,
) -> list[EntryHash]:
    """Chained hashes of the full chunks: ``h_i = H(h_{i-1} || le64(tokens of chunk i))``.

    The chain is seeded from the namespace and fingerprint, so equal tokens in two namespaces or two
    models never share a key. Returns one hash per full chunk (at most ``max_chunks``).
    """
    if chunk_tokens <= 0:
        raise InvalidRequest(f"chunk_tokens={chunk_tokens} must be positive")
    arr = as_token_array(token_ids)
    n = arr.size // chunk_tokens
    if max_chunks is not None:
        n = min(n, max_chunks)
    out: list[EntryHash] = []
    parent = _seed(namespace, fingerprint)
    raw = arr[: n * chunk_tokens].tobytes()
    step = chunk_tokens * 8
    for i in range(n):
        h = _digest(parent, raw[i * step : (i + 1) * step])
        out.append(EntryHash(h))
        parent = bytes.fromhex(h)
    return out


def prefix_tail_hash(
    token_ids: Sequence[int] | np.ndarray,
    *,
    chunk_tokens: int,
    tail_tokens: int,
    namespace: str,
    fingerprint: str,
    parent: str | None,
) -> EntryHash:
    """Key of a **tail entry**: the first ``tail_tokens`` tokens after the last full chunk, chained
    after ``parent`` (that chunk's hash, or None when the prompt has no full chunk). The same chain
    step as ``prefix_hashes``, over fewer tokens: a tail names the KV of exactly those tokens behind
    exactly that prefix. Engines choose block-aligned tails, so prompts of any length can be served
    down to a block (``kvd.connectors.vllm.scheduler``)."""
    arr = as_token_array(token_ids)
    full = arr.size // chunk_tokens
    if not 0 < tail_tokens <= arr.size - full * chunk_tokens:
        raise InvalidRequest(f"tail_tokens={tail_tokens}: a tail has 1..{arr.size - full * chunk_tokens} tokens here")
    if (parent is None) != (full == 0):
        raise InvalidRequest("parent must be the last full chunk's hash (None only without full chunks)")
    seed = _seed(namespace, fingerprint) if parent is None else bytes.fromhex(parent)
    return EntryHash(_digest(seed, arr[full * chunk_tokens : full * chunk_tokens + tail_tokens].tobytes()))


def content_hash(token_ids: Sequence[int] | np.ndarray, *, namespace: str, fingerprint: str) -> EntryHash:
    """Hash of a token run on its own: the key of a chunk entry (KV computed at positions [0, n))."""
    arr = as_token_array(token_ids)
    if arr.size == 0:
        raise InvalidRequest("a chunk entry needs at least one token")
    return EntryHash(_digest(f"kvd-content\0{namespace}\0{fingerprint}\0".encode(), arr.tobytes()))


@dataclass(slots=True, frozen=True)
class SegmentKey:
    """One (entry, layer, KV head) segment: the unit of placement, compression and accounting."""

    entry: EntryHash
    layer: int
    head: int

    def __str__(self) -> str:
        return f"{self.entry}/L{self.layer}/H{self.head}"
