import json

import pytest

from kvd.core.errors import HeadMapError
from kvd.core.headmap import HeadMap, HeadSpec


def small_map() -> HeadMap:
    return HeadMap.from_classes("toy", [[True, False, False], [False, False, True]], sink=4,
                                window=[[0, 64, 128], [32, 64, 0]])


def test_round_trip_through_json(tmp_path):
    hm = small_map()
    p = tmp_path / "toy.json"
    hm.save(p)
    doc = json.loads(p.read_text())
    assert doc["heads"][0][1] == {"class": "local", "sink": 4, "window": 64}
    assert HeadMap.load(p) == hm


def test_queries():
    hm = small_map()
    assert hm.num_global == 2 and hm.global_ratio == pytest.approx(2 / 6)
    assert hm.global_heads(0) == [0] and hm.local_heads(1) == [0, 1]
    assert hm.max_window() == 132
    # 1000 tokens: 2 global heads keep 1000, locals keep 4+64, 4+128, 4+32, 4+64
    assert hm.kv_fraction(1000) == pytest.approx((2000 + 68 + 132 + 36 + 68) / 6000)
    assert hm.kv_fraction(10) == 1.0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["heads"].pop(), "heads lists 1 layers"),
        (lambda d: d["heads"][1].pop(), r"heads\[1\] lists 2 KV heads"),
        (lambda d: d["heads"][0][1].update(window=0), "window > 0"),
        (lambda d: d["heads"][0][1].update({"class": "medium"}), "heads.0.1"),
        (lambda d: d.update(format=9), "format 9"),
        (lambda d: d.update(extra=1), "extra"),
    ],
)
def test_invalid_maps_say_what_is_wrong(mutate, message):
    doc = json.loads(small_map().to_json())
    mutate(doc)
    with pytest.raises(HeadMapError, match=message):
        HeadMap.parse(doc)


def test_map_must_fit_the_model():
    with pytest.raises(HeadMapError, match="re-run the head profiler"):
        small_map().check_fits(30, 3, model="smollm2")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(HeadMapError, match="cannot read"):
        HeadMap.load(tmp_path / "nope.json")


def test_all_global_and_specs():
    hm = HeadMap.all_global("m", 2, 4)
    assert hm.num_global == 8 and hm.kv_fraction(500) == 1.0
    assert HeadSpec(head_class="local", sink=4, window=10).kept_tokens(100) == 14


def test_grids_mark_global_heads_with_window_zero():
    hm = small_map()
    assert hm.sinks == ((0, 4, 4), (4, 4, 0))
    assert hm.windows == ((0, 64, 128), (32, 64, 0))
    assert hm.global_heads(1) == [2] and hm.local_heads(0) == [1, 2]
    assert not hm.is_all_global and HeadMap.all_global("m", 2, 3).is_all_global
    assert HeadMap.all_global("m", 2, 3).windows == ((0, 0, 0), (0, 0, 0))


def test_grids_ignore_the_sink_and_window_a_global_head_carries_in_json():
    doc = json.loads(small_map().to_json())
    doc["heads"][0][0] = {"class": "global", "sink": 4, "window": 512}
    hm = HeadMap.parse(doc)
    assert hm.sinks[0][0] == 0 and hm.windows[0][0] == 0 and hm.global_heads(0) == [0]


def test_cached_views_are_computed_once_and_never_serialized(tmp_path):
    hm = small_map()
    assert hm.windows is hm.windows and hm.sinks is hm.sinks
    hm.global_heads(0).append(99)  # callers get a fresh list: the cache cannot be changed through it
    assert hm.global_heads(0) == [0]
    assert "windows" not in json.loads(hm.to_json())
    hm.save(tmp_path / "m.json")
    back = HeadMap.load(tmp_path / "m.json")
    assert back == hm and back.windows == hm.windows  # cached on one side only: still equal


def test_model_copy_drops_the_cached_views():
    hm = small_map()
    assert hm.windows[0] == (0, 64, 128)
    flipped = hm.model_copy(update={"heads": [hm.heads[1], hm.heads[0]]})
    assert flipped.windows == ((32, 64, 0), (0, 64, 128))
    assert hm.model_copy(update={"fingerprint": "f"}).sinks == hm.sinks


def test_shipped_smollm2_map_loads_with_its_grids():
    from pathlib import Path

    hm = HeadMap.load(Path(__file__).resolve().parents[2] / "config/heads/smollm2-135m.json")
    assert (hm.num_layers, hm.num_kv_heads) == (30, 3)
    assert all(len(row) == 3 for row in hm.windows)
    assert [h for h in range(3) if hm.windows[5][h] == 0] == hm.global_heads(5)


def test_shipped_8k_map_is_the_same_model_under_its_own_tag():
    """The two SmolLM2 maps (docs/head_aware.md, "Which head map"): one model fingerprint, the byte shares
    the docs state, and different attention tags, so KV stored under one is never read under the other."""
    from pathlib import Path

    from kvd.core.keys import attention_tag

    heads = Path(__file__).resolve().parents[2] / "config/heads"
    default, map_8k = HeadMap.load(heads / "smollm2-135m.json"), HeadMap.load(heads / "smollm2-135m-8k.json")
    assert map_8k.fingerprint == default.fingerprint and map_8k.model == default.model
    assert (map_8k.num_layers, map_8k.num_kv_heads, map_8k.num_global) == (30, 3, 19)
    assert map_8k.kv_fraction(8192) <= 0.35 < default.kv_fraction(8192)
    assert attention_tag(map_8k.sinks, map_8k.windows) != attention_tag(default.sinks, default.windows)


# ---- tensor parallelism: each rank's part of the map ------------------------------------------------


@pytest.mark.parametrize("total,size,want", [
    (8, 1, [list(range(8))]),
    (8, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (3, 3, [[0], [1], [2]]),
    (2, 4, [[0], [0], [1], [1]]),  # fewer heads than ranks: each replicated over consecutive ranks
    (1, 2, [[0], [0]]),
])
def test_tp_heads_split_as_vllm_does(total, size, want):
    from kvd.core.headmap import tp_heads

    got = [tp_heads(total, r, size) for r in range(size)]
    assert got == want
    # vLLM's own count per rank (ModelConfig.get_num_kv_heads) and replica rule (QKVParallelLinear)
    assert all(len(g) == max(1, total // size) for g in got)


@pytest.mark.parametrize("total,size", [(6, 4), (3, 2), (2, 3)])
def test_tp_heads_refuses_uneven_splits(total, size):
    from kvd.core.headmap import tp_heads

    with pytest.raises(HeadMapError, match="tensor-parallel"):
        tp_heads(total, 0, size)


def _rank_specs(total: int = 3, size: int = 3):
    from kvd.core.keys import ModelSpec

    whole = ModelSpec("smollm2", num_layers=30, num_kv_heads=total, head_dim=64)
    return whole, [ModelSpec(f"smollm2 [tp{r}/{size}]", num_layers=30, num_kv_heads=max(1, total // size), head_dim=64)
                   for r in range(size)]


def test_each_rank_gets_its_heads_column_with_its_own_fingerprint(tmp_path):
    from kvd.core.headmap import load_for_rank

    whole, ranks = _rank_specs()
    full = HeadMap.load("kvd/data/heads/smollm2-135m.json").model_copy(update={"fingerprint": whole.fingerprint()})
    full.save(tmp_path / "map.json")
    for r, spec in enumerate(ranks):
        part = load_for_rank(tmp_path / "map.json", spec, whole=whole, rank=r, size=3)
        assert (part.num_layers, part.num_kv_heads, part.fingerprint) == (30, 1, spec.fingerprint())
        assert part.class_grid() == [[row[r]] for row in full.class_grid()]
        assert part.windows == tuple((row[r],) for row in full.windows)
        assert all(len(g[0]) == 1 for g in part.scores.values())


def test_a_rank_refuses_a_map_of_another_model(tmp_path):
    from kvd.core.headmap import load_for_rank
    from kvd.core.keys import ModelSpec

    whole, ranks = _rank_specs()
    full = HeadMap.load("kvd/data/heads/smollm2-135m.json")  # its fingerprint is SmolLM2's, not "smollm2"'s here
    full.save(tmp_path / "map.json")
    with pytest.raises(HeadMapError, match="profiled for the model with fingerprint"):
        load_for_rank(tmp_path / "map.json", ranks[0], whole=whole, rank=0, size=3)
    # without a fingerprint the shape still has to be the whole model's: 6 heads over 3 ranks is not 3
    full.model_copy(update={"fingerprint": None}).save(tmp_path / "anon.json")
    six = ModelSpec("other", num_layers=30, num_kv_heads=6, head_dim=64)
    rank = ModelSpec("other [tp0/3]", num_layers=30, num_kv_heads=2, head_dim=64)
    with pytest.raises(HeadMapError, match="3 KV heads"):
        load_for_rank(tmp_path / "anon.json", rank, whole=six, rank=0, size=3)


def test_a_one_rank_engine_refuses_a_map_of_another_model_at_load(tmp_path):
    """load_for_rank refuses a map profiled for another model before anything registers, also without
    tensor parallelism: a one-rank vLLM or SGLang engine otherwise started, its registration was refused
    by the daemon (FingerprintMismatch) and it served without kvd, logging 'not reachable', retrying."""
    from kvd.core.headmap import load_for_rank
    from kvd.core.keys import ModelSpec

    spec = ModelSpec("smollm2", num_layers=30, num_kv_heads=3, head_dim=64)
    full = HeadMap.load("kvd/data/heads/smollm2-135m.json")  # SmolLM2's fingerprint, not "smollm2"'s here
    full.save(tmp_path / "map.json")
    with pytest.raises(HeadMapError, match="profiled for the model with fingerprint"):
        load_for_rank(tmp_path / "map.json", spec)
    mine = full.model_copy(update={"fingerprint": spec.fingerprint()})
    mine.save(tmp_path / "mine.json")
    assert load_for_rank(tmp_path / "mine.json", spec) == mine
    full.model_copy(update={"fingerprint": None}).save(tmp_path / "anon.json")
    assert load_for_rank(tmp_path / "anon.json", spec).fingerprint is None


def test_a_file_that_is_not_utf8_is_a_clear_error(tmp_path):
    """HeadMap.load read the file as UTF-8 text: one saved as UTF-16 (or any non-UTF-8 bytes) raised a
    bare UnicodeDecodeError from the engine's start-up instead of the HeadMapError naming the file."""
    p = tmp_path / "map.json"
    p.write_bytes(b"\xff\xfe{\x00")  # UTF-16 with its BOM, as some editors save
    with pytest.raises(HeadMapError, match="map.json.*Invalid JSON"):
        HeadMap.load(p)
