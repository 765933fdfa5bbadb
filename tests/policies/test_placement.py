"""Head-class placement: hot/cold by head class and position, and the SSD codec of each case."""

from __future__ import annotations

import pytest

from kvd.core.config import CodecSettings
from kvd.core.errors import InvalidRequest
from kvd.policies.placement import HeadClassPlacement, Placement

SINK, WINDOW = 4, 256


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
