"""A profiled-style head map (per-head windows, scores, calibration) survives save/load unchanged."""

from __future__ import annotations

from kvd.core.headmap import HeadMap


def test_headmap_round_trip_keeps_windows_scores_and_calibration(tmp_path):
    grid = [[h == 0 for h in range(3)] for _ in range(4)]
    windows = [[128, 256, 1024] for _ in range(4)]
    hm = HeadMap.from_classes("m", grid, sink=4, window=windows, method="kl_greedy",
                              scores={"edge_mass": [[0.1, 0.2, 0.3]] * 4},
                              calibration={"trajectory": [{"fraction": 0.2, "kl": 0.5, "choice": [[0]]}]},
                              fingerprint="0" * 32)
    path = tmp_path / "m.json"
    hm.save(path)
    back = HeadMap.load(path)
    assert back == hm
    assert back.spec(2, 2).window == 1024 and back.is_global(1, 0)
    assert back.kv_fraction(4096) == hm.kv_fraction(4096)
