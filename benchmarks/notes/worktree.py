"""A base commit checked out beside this tree for the A/B scripts in this folder (removed afterwards)."""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
from collections.abc import Callable, Iterator
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


def alternate(base: Path, rounds: int, run: Callable[[str, Path, int], dict]) -> dict[str, list[dict]]:
    """``run(name, tree, round)`` for the base tree and this one in turn (base, this, base, this, ...),
    ``rounds`` times each: a VM whose speed swings within minutes hits both alike. Each run's figures,
    printed as they come and returned per tree."""
    runs: dict[str, list[dict]] = {"base": [], "this": []}
    for r in range(rounds):
        for name, tree in (("base", base), ("this", ROOT)):
            runs[name].append(run(name, tree, r))
            print(name, r, json.dumps(runs[name][-1]), flush=True)
    return runs


def medians(runs: dict[str, list[dict]], keys: list[str]) -> dict[str, dict[str, float]]:
    """Per tree, the median of each of ``keys`` over its runs."""
    return {n: {k: statistics.median(x[k] for x in rs) for k in keys} for n, rs in runs.items()}
