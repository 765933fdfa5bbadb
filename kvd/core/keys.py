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
from pathlib import Path
from typing import Any, NewType

import numpy as np

from kvd.core.dtypes import DTYPE_BYTES
from kvd.core.errors import InvalidRequest

Fingerprint = NewType("Fingerprint", str)  # 32 lowercase hex chars
EntryHash = NewType("EntryHash", str)  # 32 lowercase hex chars
Namespace = NewType("Namespace", str)
AttentionTag = NewType("AttentionTag", str)  # "exact" or "hm-<16 hex>": see attention_tag

HASH_HEX_CHARS = 32
DEFAULT_NAMESPACE = Namespace("default")
_HEX_RE = re.compile(r"^[0-9a-f]{32}$")
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.:@/-]{1,128}$")



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
        if self.kv_dtype not in DTYPE_BYTES:
            raise InvalidRequest(
                f"kv_dtype={self.kv_dtype!r} is not supported; use one of {sorted(DTYPE_BYTES)}"
            )

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.kv_dtype]

    def segment_bytes(self, num_tokens: int) -> int:
        """Bytes of one (entry, layer, KV head) segment: K and V of ``[num_tokens, head_dim]``."""
        return 2 * num_tokens * self.head_dim * self.dtype_bytes

    def fingerprint(self) -> Fingerprint:
        return fingerprint(self)

    @classmethod
    def from_hf_config(cls, config: Any, *, model_id: str | None = None, kv_dtype: str = "bfloat16",
                       revision: str = "") -> ModelSpec:
        """The spec of a transformers model from its config (duck-typed: transformers is not imported).

        ``model_id`` defaults to the config's ``name_or_path`` basename. RoPE comes from
        ``config.rope_parameters`` (transformers 5.x) or the older ``rope_theta``/``rope_scaling``.
        """
        num_heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
        rope = getattr(config, "rope_parameters", None)
        if not rope:
            rope = {"rope_theta": getattr(config, "rope_theta", None),
                    "rope_scaling": getattr(config, "rope_scaling", None)}
        mid = model_id or Path(str(getattr(config, "name_or_path", "") or "model")).name or "model"
        return cls(
            model_id=mid,
            num_layers=int(config.num_hidden_layers),
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or num_heads),
            head_dim=head_dim,
            kv_dtype=kv_dtype,
            revision=revision,
            rope=dict(rope),
        )


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


def chunk_spans(num_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every *full* chunk. A trailing partial chunk gets no prefix entry.

    Example: 600 tokens, chunk 256 -> [(0, 256), (256, 512)]; tokens 512..599 are not cached.
    """
    return [(i * chunk_tokens, (i + 1) * chunk_tokens) for i in range(num_tokens // chunk_tokens)]


EXACT = AttentionTag("exact")
_ATTENTION_RE = re.compile(r"^(exact|hm-[0-9a-f]{16})$")


def check_attention(value: str) -> AttentionTag:
    if not isinstance(value, str) or not _ATTENTION_RE.match(value):
        raise InvalidRequest(f"computed_under={value!r} is not 'exact' or 'hm-' + 16 hex characters "
                             "(kvd.core.keys.attention_tag of the head map the KV was computed under)")
    return AttentionTag(value)


def attention_tag(sinks: Sequence[Sequence[int]], windows: Sequence[Sequence[int]]) -> AttentionTag:
    """What KV was computed under: ``exact`` (every head attends to every earlier token) or
    ``hm-<16 hex>`` naming the per-head visibility (sink, window; window 0 = global) it was computed
    with. KV computed under windowed attention differs from exact KV from the second layer on (the
    hidden states differ), so the tag is part of every key (``_seed``) and of every entry, and an
    exact reader never gets KV of another tag. Only visibility counts: two head maps with the same
    grids but other scores or names give one tag.

    Example: one layer, heads (global, local sink 4 window 64) -> sinks [[0, 4]], windows [[0, 64]].
    """
    if all(w == 0 for row in windows for w in row):
        return EXACT
    blob = json.dumps([list(map(int, r)) for r in sinks]) + json.dumps([list(map(int, r)) for r in windows])
    return AttentionTag("hm-" + hashlib.blake2b(blob.encode(), digest_size=8).hexdigest())


def _seed(namespace: str, fp: str, computed_under: str = EXACT) -> bytes:
    # Exact KV keeps the seed it always had (stored keys stay valid); other tags are mixed in so that
    # KV computed under a head map never shares a key with exact KV of the same tokens.
    tag = "" if computed_under == EXACT else f"{computed_under}\0"
    return f"kvd-prefix\0{namespace}\0{fp}\0{tag}".encode()


def prefix_hashes(
    token_ids: Sequence[int] | np.ndarray,
    *,
    chunk_tokens: int,
    namespace: str,
    fingerprint: str,
    max_chunks: int | None = None,
    computed_under: str = EXACT,
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
    parent = _seed(namespace, fingerprint, computed_under)
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
    computed_under: str = EXACT,
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
    seed = _seed(namespace, fingerprint, computed_under) if parent is None else bytes.fromhex(parent)
    return EntryHash(_digest(seed, arr[full * chunk_tokens : full * chunk_tokens + tail_tokens].tobytes()))


def prefix_aliases(
    token_ids: Sequence[int] | np.ndarray,
    hashes: Sequence[str],
    *,
    chunk_tokens: int,
    block_tokens: int,
    namespace: str,
    fingerprint: str,
    computed_under: str = EXACT,
    first_chunk: int = 0,
) -> list[list[tuple[EntryHash, int]]]:
    """For each full chunk ``first_chunk + i`` (key ``hashes[i]``), the keys of its block-aligned
    proper prefixes: ``(key, tokens)`` for ``tokens = block, 2 block, ..., chunk - block``.

    The key of a chunk's first ``n`` tokens is exactly the ``prefix_tail_hash`` of a prompt that
    ends ``n`` tokens into that chunk, so a stored chunk registered under these aliases serves such
    a prompt (a strict prefix of the stored one) down to its last block, as vLLM's own block-level
    cache does. Example: chunk 256, block 16 -> 15 aliases per chunk (16, 32, ..., 240 tokens).
    One hashing pass per chunk: the digest state is copied at each block boundary.
    """
    if block_tokens <= 0 or chunk_tokens % block_tokens:
        raise InvalidRequest(f"block_tokens={block_tokens} must divide chunk_tokens={chunk_tokens}")
    arr = as_token_array(token_ids)
    if arr.size < (first_chunk + len(hashes)) * chunk_tokens:
        raise InvalidRequest(f"{arr.size} tokens do not cover chunks {first_chunk}..{first_chunk + len(hashes) - 1}")
    out = []
    for i in range(len(hashes)):
        c = first_chunk + i
        parent = (_seed(namespace, fingerprint, computed_under) if c == 0
                  else bytes.fromhex(hashes[i - 1] if i > 0 else _chain_parent(arr, c, chunk_tokens, namespace,
                                                                             fingerprint, computed_under)))
        h = hashlib.blake2b(parent, digest_size=16)
        raw = arr[c * chunk_tokens : (c + 1) * chunk_tokens].tobytes()
        step = block_tokens * 8
        aliases = []
        for j in range(1, chunk_tokens // block_tokens):
            h.update(raw[(j - 1) * step : j * step])
            aliases.append((EntryHash(h.copy().hexdigest()), j * block_tokens))
        out.append(aliases)
    return out


def _chain_parent(arr: np.ndarray, chunk: int, chunk_tokens: int, namespace: str, fingerprint: str,
                  computed_under: str) -> str:
    return prefix_hashes(arr[: chunk * chunk_tokens], chunk_tokens=chunk_tokens, namespace=namespace,
                         fingerprint=fingerprint, computed_under=computed_under)[-1]


def content_hash(token_ids: Sequence[int] | np.ndarray, *, namespace: str, fingerprint: str,
                 computed_under: str = EXACT) -> EntryHash:
    """Hash of a token run on its own: the key of a chunk entry (KV computed at positions [0, n))."""
    arr = as_token_array(token_ids)
    if arr.size == 0:
        raise InvalidRequest("a chunk entry needs at least one token")
    tag = "" if computed_under == EXACT else f"{computed_under}\0"
    return EntryHash(_digest(f"kvd-content\0{namespace}\0{fingerprint}\0{tag}".encode(), arr.tobytes()))


@dataclass(slots=True, frozen=True)
class SegmentKey:
    """One (entry, layer, KV head) segment: the unit of placement, compression and accounting."""

    entry: EntryHash
    layer: int
    head: int

    def __str__(self) -> str:
        return f"{self.entry}/L{self.layer}/H{self.head}"
