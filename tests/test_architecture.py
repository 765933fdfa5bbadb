"""The tree keeps the architecture visible (ARCHITECTURE.md, "Dependency rules"; STYLE.md §1).

Checked from the source itself (imports are read with ``ast``, so lazy imports inside functions
count too): which packages may import which, and how large a module may grow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kvd"
MAX_LINES = 400  # STYLE.md §1; kernels aside

# package -> packages of kvd it must never import
FORBIDDEN = {
    "client": {"store", "tiers", "daemon", "connectors", "reuse", "calibrate", "policies", "testing"},
    "connectors": {"store", "tiers", "daemon", "testing"},
    "reuse": {"store", "tiers", "daemon", "connectors", "testing"},
    "tiers": {"policies", "daemon", "store", "client", "connectors", "reuse", "calibrate", "testing"},
    "policies": {"daemon", "store", "tiers", "client", "connectors", "reuse", "calibrate", "testing"},
    "core": {"daemon", "store", "tiers", "client", "connectors", "reuse", "calibrate", "policies", "codecs",
             "testing", "gpu_kernels"},
    "codecs": {"daemon", "store", "tiers", "client", "connectors", "reuse", "calibrate", "policies", "testing"},
    "store": {"client", "connectors", "reuse", "calibrate", "testing"},
    "daemon": {"client", "connectors", "reuse", "calibrate", "testing"},
    "cli": {"store", "tiers", "daemon", "testing"},
    "calibrate": {"store", "tiers", "daemon", "testing"},
}
# outside kvd: model code that policies (decisions from metadata) must never import
MODEL_CODE = {"transformers", "vllm", "sglang", "accelerate", "gguf", "torch"}


def modules():
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def imported(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            if node.module == "kvd":
                out |= {f"kvd.{a.name}" for a in node.names}
    return out


def package(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0] if len(rel) > 1 else ""


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_dependency_rules(path):
    pkg = package(path)
    bad = []
    for mod in imported(path):
        parts = mod.split(".")
        if parts[0] == "kvd" and len(parts) > 1 and parts[1] in FORBIDDEN.get(pkg, set()):
            bad.append(mod)
        if pkg == "policies" and parts[0] in MODEL_CODE:
            bad.append(mod)
        if pkg == "gpu_kernels" and parts[0] == "kvd" and not mod.startswith("kvd.gpu_kernels"):
            bad.append(mod)
    assert not bad, f"kvd/{path.relative_to(ROOT)} ({pkg or 'root'}) imports {sorted(bad)}"


@pytest.mark.parametrize("path", [p for p in modules() if package(p) != "gpu_kernels"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_over_400_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"kvd/{path.relative_to(ROOT)} has {n} lines; split it along a real seam (STYLE.md §1)"


def test_the_root_holds_no_modules_but_the_package_marker():
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["__init__.py"]
