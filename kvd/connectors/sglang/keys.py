"""The kvd key of each SGLang page.

SGLang names a page by a 64-hex SHA-256 chained over the page's token ids from the previous page's
key (seeded by the request's ``extra_key`` / ``cache_salt``): the key already says "these tokens
behind exactly this prefix", which is what a kvd prefix entry means. It carries no model, rank or
layout, and it is all a storage backend receives: SGLang 0.5.23 never passes token ids to
``batch_exists`` / ``batch_get_v1`` / ``batch_set_v1``. So the kvd entry of a page is keyed by the
page key itself, in kvd's namespace and under the model fingerprint:

    entry hash = BLAKE2b-128("kvd-sglang-page" ‖ namespace ‖ fingerprint ‖ SGLang page key)

Consequences (docs/sglang.md, "Keys and cross-engine reuse"): two SGLang instances of one model,
page size and namespace share pages, whatever their host layout or process; a prompt stored by
another engine (vLLM keys chunks by ``kvd.core.keys.prefix_hashes`` over the token ids) cannot be
found, because neither key can be computed from the other without the tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

_DOMAIN = b"kvd-sglang-page\0"


def page_entry_hash(page_key: str, *, namespace: str, fingerprint: str) -> str:
    """32 hex chars: the kvd entry hash of one SGLang page key."""
    h = hashlib.blake2b(_DOMAIN, digest_size=16)
    h.update(f"{namespace}\0{fingerprint}\0".encode())
    h.update(page_key.encode())
    return h.hexdigest()


def page_entry_hashes(page_keys: Sequence[str], *, namespace: str, fingerprint: str) -> list[str]:
    return [page_entry_hash(k, namespace=namespace, fingerprint=fingerprint) for k in page_keys]
