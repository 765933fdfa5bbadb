"""``kvctl profile`` shows a bar for every phase (it was silent for minutes but for one phase)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvd.core.headmap import HeadMap

pytestmark = pytest.mark.model

TINY = ["--calib-tokens", "160", "--windows", "16,32", "--round-fraction", "0.25", "--max-fraction", "0.3",
        "--kl-target", "0.05", "--max-fraction-4k", "0.5", "--num-natural", "1", "--num-recall", "1",
        "--refine-tokens", "0"]
PHASES = ["load model", "calibration set", "edge mass", "prefix shift", "KL-greedy rounds"]


def test_every_phase_of_profile_has_a_bar(smollm2_dir, tmp_path):
    out = tmp_path / "map.json"
    r = subprocess.run([sys.executable, "-m", "kvd.cli.kvctl", "profile", str(smollm2_dir), "--out", str(out),
                        "--progress", "always", *TINY], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    finals = {}
    for line in r.stderr.replace("\r", "\n").splitlines():
        for phase in PHASES:
            if line.startswith(f"profile: {phase}:"):
                finals[phase] = line  # the bar's last state
    assert list(finals) == PHASES, list(finals)
    load = finals["load model"]
    assert "100%" in load and "B/s" in load and "M/" in load, load  # bytes of the weights, with a rate
    assert all("100%" in finals[p] or "round" in finals[p] for p in PHASES), finals
    HeadMap.load(out).check_fits(30, 3)

