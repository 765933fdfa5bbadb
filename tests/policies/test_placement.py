"""Head-class placement: hot/cold by head class and position, and the SSD codec of each case."""

from __future__ import annotations

import pytest

from kvd.core.config import CodecSettings
from kvd.core.errors import InvalidRequest
from kvd.core.extents import ExtentPlan
from kvd.policies.placement import HeadClassPlacement, Placement

SINK, WINDOW = 4, 256
TAG = "sinkwindow:abc"  # any attention tag but exact


def place(head_class, start, n=256, end=4096, codec=None):
    policy = HeadClassPlacement(codec or CodecSettings())
    return policy.place(head_class, start_token=start, num_tokens=n, end_token=end, sink=SINK, window=WINDOW)


def test_global_extents_are_hot_and_lossless_by_default():
    assert place("global", 1024) == Placement(True, "lossless", "global")


def test_global_extents_are_lossy_only_when_configured():
    assert place("global", 1024, codec=CodecSettings(global_cold_codec="fp8")).ssd_codec == "fp8"
    # a lossy local cold codec never reaches global heads
    assert place("global", 1024, codec=CodecSettings(local_cold_codec="int8")).ssd_codec == "lossless"


def test_local_extent_overlapping_the_sink_is_hot():
    assert place("local", 0) == Placement(True, "lossless", "local_sink")


@pytest.mark.parametrize(("start", "n", "hot"), [
    (3840, 256, True),  # the last chunk: [3840, 4096) is the window
    (3584, 256, False),  # [3584, 3840) ends exactly where the window starts
    (3584, 257, True),  # one token into the window
    (1024, 256, False),  # the middle of the sequence
])
def test_local_extent_is_hot_only_inside_the_serving_window(start, n, hot):
    p = place("local", start, n)
    assert p.is_hot is hot
    assert p.reason == ("local_window" if hot else "local_cold")


def test_local_hot_extents_use_the_hot_codec_never_lossy():
    codec = CodecSettings(hot_codec="raw", local_cold_codec="fp8")
    assert place("local", 3840, codec=codec).ssd_codec == "raw"


@pytest.mark.parametrize("cold", ["lossless", "fp8", "int8"])
def test_local_cold_extent_gets_the_local_cold_codec(cold):
    p = place("local", 1024, codec=CodecSettings(local_cold_codec=cold))
    assert p == Placement(False, cold, "local_cold") and not p.is_dropped


def test_local_cold_drop_keeps_it_nowhere():
    p = place("local", 1024, codec=CodecSettings(local_cold_codec="drop"))
    assert p.ssd_codec is None and p.is_dropped


def test_entry_without_known_end_ends_the_sequence_so_is_in_the_window():
    assert place("local", 8192, end=None).is_hot


def test_bad_input_is_rejected():
    with pytest.raises(InvalidRequest, match="head class"):
        place("retrieval", 0)
    with pytest.raises(InvalidRequest, match="num_tokens"):
        place("local", 0, n=0)


def test_capacity_mode_trims_hot_local_extents_read_in_part():
    policy = HeadClassPlacement(CodecSettings(local_cold_codec="drop"))
    plans = {"local": ExtentPlan("local", ((0, 1),), 256, 64, 2, sink=SINK, window=WINDOW)}

    def keep(start, end, **kw):
        return policy.place_entry(plans, start_token=start, num_tokens=256, end_token=end, **kw)["local"].keep

    assert keep(0, 4096, computed_under=TAG) == (0, SINK)  # the sink chunk keeps the sink
    assert keep(3328, 3700, computed_under=TAG) == (116, 256)  # the window starts 116 tokens into the chunk
    assert keep(3584, 3900, computed_under=TAG) == (60, 256)
    assert keep(3584, 3841, computed_under=TAG) is None  # a window one token into the chunk: kept whole
    assert keep(0, 4096) is None  # exact KV: its readers read every token
    assert keep(0, 4096, computed_under=TAG, kind="chunk") is None  # chunks are reused at new positions
    lossless = HeadClassPlacement(CodecSettings()).place_entry(plans, start_token=0, num_tokens=256, end_token=4096,
                                                               computed_under=TAG)
    assert lossless["local"].keep is None  # only drop trims: other codecs keep the rest cold
