"""Unique-prefix hashes and fingerprints, as git resolves abbreviated object ids.

Tables show abbreviated hashes (``kvd.cli.output.abbrev_len``); commands take them back. A prefix of
at least ``MIN_PREFIX`` hex characters names the one entry (or model) it starts; no match and several
matches are errors that say so and what to do. A model may also be named by its model id when one
registered model has it. Entries are found by listing the daemon's index (``/v1/entries``), so
``--namespace`` is needed only to choose between entries of one hash in several namespaces.
"""

from __future__ import annotations

import re
from collections import defaultdict

from kvd.cli.output import Failure
from kvd.client.client import KvdClient
from kvd.core import protocol as P

MIN_PREFIX = 4  # as git: shorter prefixes are too easily ambiguous to type into scripts
MAX_LISTED = 1_000_000  # the daemon's largest /v1/entries answer
_HEX = re.compile(r"^[0-9a-f]+$")


def _check_prefix(prefix: str, what: str) -> str:
    p = prefix.lower()
    if not _HEX.match(p) or len(p) < MIN_PREFIX:
        raise Failure(f"{what} {prefix!r} is not a hex prefix of at least {MIN_PREFIX} characters "
                      f"(copy one from `kvctl {'ls' if what == 'hash' else 'models'}`)", code=2)
    return p


def _ambiguous(what: str, prefix: str, candidates: list[str]) -> Failure:
    shown = ", ".join(sorted(candidates)[:5]) + (", ..." if len(candidates) > 5 else "")
    return Failure(f"{what} prefix {prefix!r} is ambiguous: {len(candidates)} match ({shown}); "
                   "give more characters", code=2)


def resolve_model(c: KvdClient, name: str | None) -> str | None:
    """The fingerprint ``name`` stands for: a full fingerprint, a unique prefix of one, or the model id
    of exactly one registered model. None stays None (every model)."""
    if name is None:
        return None
    models = c.models().models
    by_id = [m.fingerprint for m in models if m.model_id == name]
    if len(by_id) == 1:
        return by_id[0]
    if len(by_id) > 1:
        raise _ambiguous("model id", name, by_id)
    p = _check_prefix(name, "fingerprint")
    found = [m.fingerprint for m in models if m.fingerprint.startswith(p)]
    if not found:
        known = ", ".join(f"{m.fingerprint[:12]} ({m.model_id})" for m in models) or "none registered"
        raise Failure(f"no registered model has fingerprint {name!r} or that model id; models: {known}")
    if len(found) > 1:
        raise _ambiguous("fingerprint", name, found)
    return found[0]


def resolve_entries(c: KvdClient, prefixes: list[str], *, namespace: str | None,
                    fingerprint: str | None) -> dict[tuple[str, str], list[str]]:
    """``(namespace, fingerprint) -> full hashes`` for ``prefixes``, each naming exactly one entry
    among those matching ``namespace`` and ``fingerprint`` (None: any)."""
    checked = [_check_prefix(p, "hash") for p in prefixes]
    listing = c.entries(model=fingerprint, namespace=namespace, limit=MAX_LISTED)
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for prefix, given in zip(checked, prefixes):
        found = [e for e in listing.entries if e.hash.startswith(prefix)]
        if not found:
            raise Failure(_not_found(given, namespace, fingerprint, listing))
        if len(found) > 1:
            raise _ambiguous("hash", given, [_entry_name(e) for e in found])
        e = found[0]
        if e.hash not in out[(e.namespace, e.fingerprint)]:  # two prefixes of one entry name it once
            out[(e.namespace, e.fingerprint)].append(e.hash)
    return dict(out)


def _entry_name(e: P.EntryInfo) -> str:
    return f"{e.hash} in namespace {e.namespace}"


def _not_found(prefix: str, namespace: str | None, fingerprint: str | None, listing: P.EntriesResponse) -> str:
    scope = [f"namespace {namespace}"] if namespace else ["every namespace"]
    if fingerprint:
        scope.append(f"model {fingerprint[:12]}")
    more = " (the listing was cut at its limit)" if listing.truncated else ""
    return (f"no entry has hash {prefix!r} in {' and '.join(scope)}: {len(listing.entries)} entries "
            f"searched{more}; `kvctl ls` lists them")
