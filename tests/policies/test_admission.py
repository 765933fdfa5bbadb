"""SSD admission: the sighting threshold, pinning, the caller's own count, the bounded table."""

from __future__ import annotations

import pytest

from kvd.policies.admission import SsdAdmission


def test_entry_is_admitted_once_seen_admit_after_times():
    a = SsdAdmission(admit_after=2)
    assert a.record("e") == 1  # stored once
    assert not a.admit("e")  # one sighting: refused
    assert a.record("e") == 2  # a lookup hit on it
    assert a.admit("e")


def test_pinned_entry_is_admitted_on_first_sight():
    a = SsdAdmission(admit_after=5)
    assert a.admit("system-prompt", pinned=True)


@pytest.mark.parametrize("admit_after", [0, 1])
def test_threshold_zero_or_one_admits_everything(admit_after):
    a = SsdAdmission(admit_after)
    a.record("e")
    assert a.admit("e")
    assert a.admit("never-recorded") is (admit_after == 0)


def test_callers_count_is_used_when_larger():
    a = SsdAdmission(admit_after=3)
    a.record("e")
    assert a.admit("e", seen=3)  # the store's Entry.seen says 3
    assert not a.admit("e", seen=1)  # ours (1) and theirs (1): refused


def test_table_is_bounded_and_forgets_least_recently_seen():
    a = SsdAdmission(admit_after=2, max_tracked=3)
    for k in "abc":
        a.record(k)
    a.record("a")  # a is now the most recent; b the least
    a.record("d")  # over the bound: b is forgotten
    assert a.seen("b") == 0 and a.seen("a") == 2 and a.seen("d") == 1
    a.forget("a")
    assert a.seen("a") == 0


def test_bad_threshold_is_rejected():
    with pytest.raises(ValueError, match="admit_after"):
        SsdAdmission(-1)
