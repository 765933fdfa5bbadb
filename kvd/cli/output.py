"""What kvctl prints: human tables and sizes, JSON documents, short hashes, and failures.

Every line goes through ``emit`` (stdout) or ``fail`` (stderr), so ``--json`` and the exit-code rules
live in one place. Hashes and fingerprints are shown abbreviated as git shows object ids: at least
``ABBREV`` characters, more where that is needed to tell the shown values apart, and every command
that takes a hash or a fingerprint accepts any unique prefix of it (``kvd.cli.resolve``).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

ABBREV = 12  # hex characters shown by default: 48 bits, unique among millions of entries
_INTERNAL_PATH = re.compile(r"(^|: )/v1/\S*: ")  # the client prefixes daemon errors with the route it called


class Failure(Exception):
    """A command failed for a reason the user can act on; ``code``: 1 failed, 2 usage."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def size(n: float) -> str:
    """Bytes for people: ``size(3 << 20)`` -> ``'3.0 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def abbrev_len(values: Iterable[str], minimum: int = ABBREV) -> int:
    """The shortest length >= ``minimum`` at which the distinct ``values`` have distinct prefixes.

    >>> abbrev_len(["abcdef01", "abcdef02"], minimum=4)
    8
    """
    distinct = sorted(set(values))
    n = minimum
    for a, b in zip(distinct, distinct[1:]):
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        n = max(n, common + 1)
    return n


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def emit(as_json: bool, doc: Any, human: str) -> None:
    """Print ``doc`` as JSON (a pydantic model or plain data) or the ``human`` text."""
    if as_json:
        if hasattr(doc, "model_dump"):
            doc = doc.model_dump(mode="json")
        print(json.dumps(doc, indent=1))
    else:
        print(human)


def fail(message: str) -> None:
    """One line on stderr: ``kvctl: <message>``, without the daemon route the client names."""
    print(f"kvctl: {_INTERNAL_PATH.sub(lambda m: m.group(1), message)}", file=sys.stderr)
