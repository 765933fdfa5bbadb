"""``needed``, ``keep_span``, ``covers`` and ``trimmed_from`` against a brute-force reading of the
attention rule: a local head's query at ``s`` sees key ``p`` iff ``p <= s`` and (``p < sink`` or
``p > s - window``). A reader whose next query sits at ``s`` reads the stored keys ``p < s`` that query
sees (later queries see fewer of them). Entries may start anywhere and hold fewer than a chunk."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from kvd.core.extents import ExtentPlan, covers, keep_span, needed, trimmed_from


def reads(sink: int, window: int, s: int) -> set[int]:
    return {p for p in range(s) if p < sink or p > s - window}


cases = st.tuples(st.integers(0, 12), st.integers(2, 24), st.integers(1, 16), st.integers(0, 40))


@settings(max_examples=300, deadline=None)
@given(cases, st.integers(0, 90))
def test_needed_is_the_attention_rule(case, position):
    sink, window, n, start = case
    plan = ExtentPlan("local", ((0, 0),), n, 1, 1, sink=sink, window=window)
    if position > start:  # a reader loads an entry only if it starts before its position
        assert needed(plan, start, n, position) == bool(reads(sink, window, position) & set(range(start, start + n)))


@settings(max_examples=300, deadline=None)
@given(cases, st.integers(0, 30))
def test_keep_span_is_the_hull_of_what_the_stored_sequence_reads(case, extra):
    sink, window, n, start = case
    end = start + n + extra
    plan = ExtentPlan("local", ((0, 0),), n, 1, 1, sink=sink, window=window)
    read = sorted(p - start for p in (reads(sink, window, end) | reads(sink, window, end - 1))
                  if start <= p < start + n)
    assert keep_span(plan, start, n, end) == ((read[0], read[-1] + 1) if read else None)


@settings(max_examples=300, deadline=None)
@given(cases, st.integers(0, 30))
def test_covers_and_trimmed_from_against_brute_force(case, extra):
    sink, window, n, start = case
    end = start + n + extra
    plan = ExtentPlan("local", ((0, 0),), n, 1, 1, sink=sink, window=window)
    span = keep_span(plan, start, n, end)
    if span is None or span == (0, n):
        return
    trimmed = plan.trim(*span)
    held = set(range(start + span[0], start + span[1]))
    last = start + n + window + 2
    ok = {s: reads(sink, window, s) & set(range(start, start + n)) <= held for s in range(start + 1, last + 1)}
    for s, want in ok.items():
        if s > sink:  # covers may refuse a span lacking sink tokens the reader does not reach yet
            assert covers(trimmed, start, n, s) == want, s
    first = math.inf
    for s in range(last, start, -1):
        if not ok[s]:
            break
        first = s
    assert trimmed_from(trimmed, start, n) == first  # the least position from which it covers for good
