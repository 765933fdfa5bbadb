"""Head profiler on a tiny calibration run: a valid, loadable map with scores and a trajectory."""

from __future__ import annotations

import pytest

from kvd.calibrate.profiler import ProfileConfig, main, profile, redknot_map, trajectory_maps
from kvd.core.headmap import HeadMap
from kvd.core.identity import model_identity
from kvd.core.keys import ModelSpec

pytestmark = pytest.mark.model

TINY = ProfileConfig(calib_tokens=160, kl_positions=48, windows=(16, 32), round_fraction=0.25,
                     max_fraction=0.6, checkpoints=(), kl_target=0.05, max_fraction_4k=0.5,
                     num_natural=1, num_recall=1, refine_tokens=0)


@pytest.fixture(scope="module")
def tiny_map(smollm2_dir, smollm2_fp32, tmp_path_factory):
    model, tok = smollm2_fp32
    out = tmp_path_factory.mktemp("heads") / "tiny.json"
    hm = profile(smollm2_dir, out, cfg=TINY, model=model, tok=tok, progress=False)
    return hm, out


def test_profile_writes_a_valid_map(tiny_map, smollm2_fp32, smollm2_dir):
    hm, out = tiny_map
    back = HeadMap.load(out)
    assert back == hm
    back.check_fits(30, 3)
    assert hm.method == "kl_greedy"
    # the fingerprint engines register for these weights: their content identity, served in bf16
    ident = model_identity(smollm2_dir).model_id
    assert hm.fingerprint == ModelSpec.from_hf_config(smollm2_fp32[0].config, model_id=ident).fingerprint()
    assert hm.model == smollm2_dir.name  # the map's name stays the directory's
    for name in ("edge_mass", "prefix_shift", "combined"):
        vals = [v for row in hm.scores[name] for v in row]
        assert len(vals) == 90 and all(0.0 <= v <= 1.0 + 1e-6 for v in vals), name
    assert {s.window for row in hm.heads for s in row if not s.is_global} <= {16, 32}
    assert hm.kv_fraction(4096) <= 0.5


def test_trajectory_buys_bytes_and_lowers_kl(tiny_map):
    hm, _ = tiny_map
    traj = trajectory_maps(hm)
    assert len(traj) >= 2
    fractions = [f for f, _, _ in traj]
    assert fractions == sorted(fractions)
    assert traj[-1][1] < traj[0][1], "upgrading heads must lower the measured calibration KL"
    assert traj[0][2].num_global == 0  # every head starts local with the smallest window


def test_redknot_baseline_marks_the_top_ratio_global(tiny_map):
    hm, _ = tiny_map
    base = redknot_map("m", hm.scores["edge_mass"], hm.scores["prefix_shift"], ProfileConfig())
    assert base.num_global >= round(0.15 * 90)
    forced = redknot_map("m", hm.scores["edge_mass"], hm.scores["prefix_shift"],
                         ProfileConfig(global_ratio=0.0, edge_threshold=0.0))
    assert forced.num_global == 90  # every head passes a zero absolute threshold


def test_main_rejects_missing_out(capsys):
    with pytest.raises(SystemExit):
        main(["somewhere"])


def test_swap_trades_bytes_without_crossing_the_bound():
    """Recall refinement: an upgrade is paid for by the cheapest downgrade, within the byte bound."""
    import torch

    from kvd.calibrate.refine import _swap

    costs = [0.25, 0.5, 1.0]  # window, bigger window, global
    choice = [[1, 1], [0, 0]]
    gains = torch.zeros(2, 2, 3, dtype=torch.float64)
    gains[1, 0, 2] = 0.9  # head (1,0) gains a lot from going global (+0.75 bytes)
    gains[0, 0, 0] = -0.01  # head (0,0) loses little when shrunk (-0.25 bytes)
    gains[0, 1, 0] = -0.5  # head (0,1) loses a lot
    moves = _swap(choice, gains, costs, room=0.5, max_moves=4)
    assert choice == [[0, 1], [2, 0]] and moves == 2
    assert sum(costs[c] for row in choice for c in row) <= sum([0.5, 0.5, 0.25, 0.25]) + 0.5


def test_select_holds_the_byte_bound_at_bound_tokens():
    """A map profiled for 8K is selected by its KV at 8K: a 2048-token window costs 0.25 there, 0.5 at 4K."""
    from kvd.calibrate.profiler import select

    cfg = ProfileConfig(windows=(64, 2048), max_fraction_4k=0.3, bound_tokens=8192)
    cheap = {"kl": 0.5, "fraction": 0.01, "choice": [[0, 0, 0]] * 30}
    wide = {"kl": 0.1, "fraction": 0.25, "choice": [[1, 1, 1]] * 30}  # every head window 2048
    assert select([cheap, wide], cfg, "m") == 1  # 0.25 of full KV at 8K: within 0.3
    assert select([cheap, wide], ProfileConfig(windows=(64, 2048), max_fraction_4k=0.3), "m") == 0  # 0.5 at 4K


@pytest.mark.parametrize("extra", [["--windows", "64,abc"], ["--windows", "0,64"], ["--num-natural", "0"],
                                   ["--num-natural", "0", "--num-recall", "0", "--no-baseline-scores"],
                                   ["--kl-positions", "0"], ["--checkpoints", "0.2,x"]])
def test_main_rejects_bad_options_before_loading(smollm2_dir, tmp_path, capsys, extra):
    """Bad options are an argparse error (exit 2, a message naming the option), not a traceback
    after the model has loaded (``--num-natural 0`` died in edge mass with a TypeError)."""
    with pytest.raises(SystemExit) as e:
        main([str(smollm2_dir), "--out", str(tmp_path / "m.json"), "--progress", "never", *extra])
    assert e.value.code == 2
    assert extra[0] in capsys.readouterr().err


def test_main_rejects_an_unwritable_out_before_profiling(smollm2_dir, tmp_path, capsys):
    """``--out`` naming a directory fails at once, not after the whole profile (minutes to hours)."""
    with pytest.raises(SystemExit) as e:
        main([str(smollm2_dir), "--out", str(tmp_path), "--progress", "never"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_reselect_of_a_refined_map_does_not_claim_the_refinement():
    """``reselect`` picks a trajectory state (before recall refinement): the map it returns must not
    keep the refined map's method and refinement record, which describe other heads."""
    from dataclasses import asdict

    from kvd.calibrate.profiler import map_from_choice, reselect

    cfg = ProfileConfig(windows=(64, 2048), max_fraction_4k=0.5)
    states = [{"kl": 0.5, "fraction": 0.04, "choice": [[0, 0, 0]] * 30},
              {"kl": 0.1, "fraction": 0.5, "choice": [[1, 1, 0]] * 30}]
    cal = {"config": asdict(cfg), "trajectory": states, "selected_round": 0, "calibration_kl": 0.5,
           "refine": {"bound_tokens": 4096, "rounds": []}}
    refined = map_from_choice("m", [[2, 0, 0]] * 30, cfg, method="kl_greedy+recall_refine", calibration=cal)
    again = reselect(refined, max_fraction_4k=0.3)
    assert again.windows == ((64, 64, 64),) * 30  # the trajectory's state 0, not the refined heads
    assert again.method == "kl_greedy" and "refine" not in again.calibration
