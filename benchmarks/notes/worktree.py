"""A base commit checked out beside this tree for the A/B scripts in this folder (removed afterwards)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def commit_of(tree: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                          check=True).stdout.strip()


@contextlib.contextmanager
def worktree(commit: str, where: Path) -> Iterator[Path]:
    """``commit`` checked out (detached) at ``where``, a path that must not exist yet."""
    subprocess.run(["git", "worktree", "add", "-f", "--detach", str(where), commit], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, capture_output=True)
