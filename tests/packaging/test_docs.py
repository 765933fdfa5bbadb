"""docs/benchmarks.md is what benchmarks/report.py writes, with every section's plot embedded."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmarks_doc_is_generated_and_embeds_the_plots():
    text = _report().render()
    assert (ROOT / "docs" / "benchmarks.md").read_text() == text, "run python benchmarks/report.py"
    images = re.findall(r"!\[[^\]]*\]\(\.\./benchmarks/results/([\w.]+\.png)\)", text)
    assert len(images) >= 5 and all((ROOT / "benchmarks" / "results" / name).is_file() for name in images)
    for section in ("control_plane", "ssd_tier", "kernels", "vllm_e2e"):
        assert f"{section}.png" in images, section
