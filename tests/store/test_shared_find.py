"""Finds in a shared tier, coalesced (``kvd.store.shared_find``): at most one in flight per level, the
keys asked meanwhile sent together next, errors to every caller, callers' deadlines their own."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from kvd.core.errors import TierUnavailable
from kvd.store.shared_find import SharedFinds

REMOTE = SimpleNamespace(name="remote")


def key(i: int):
    return ("default", "fp", f"{i:032x}")


class Held:
    """A find that records its keys and waits for ``gate`` (the cluster's round trip)."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[list] = []
        self.gate = asyncio.Event()
        self.fail = fail

    async def __call__(self, lv, keys):
        self.calls.append(list(keys))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return len(keys)


async def test_a_lone_find_goes_at_once_and_finds_asked_meanwhile_go_together_next():
    find = Held()
    finds = SharedFinds(find)
    first = asyncio.create_task(finds.find(REMOTE, [key(0), key(1)]))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert find.calls == [[key(0), key(1)]]  # no waiting for company
    later = [asyncio.create_task(finds.find(REMOTE, [key(i), key(9)])) for i in (2, 3, 4)]
    await asyncio.sleep(0)
    assert len(find.calls) == 1 and finds.waiting("remote") == 4  # keys 2, 3, 4 and 9 (asked thrice, sent once)
    find.gate.set()
    assert await first == 2
    assert await asyncio.gather(*later) == [4, 4, 4]  # each caller hears its batch's count
    assert find.calls == [[key(0), key(1)], [key(2), key(9), key(3), key(4)]]
    assert finds.waiting("remote") == 0 and finds._runners == {}  # idle again: the next find goes at once


async def test_an_error_of_the_batch_reaches_every_caller_in_it():
    find = Held(fail=TierUnavailable("cluster down"))
    finds = SharedFinds(find)
    calls = [asyncio.create_task(finds.find(REMOTE, [key(i)])) for i in range(3)]
    await asyncio.sleep(0)
    find.gate.set()
    for c in calls:
        with pytest.raises(TierUnavailable):
            await c
    find.fail = None  # the cluster is back: the next find is sent
    assert await finds.find(REMOTE, [key(7)]) == 1


async def test_a_caller_past_its_deadline_stops_waiting_but_the_batch_runs_to_the_end():
    find = Held()
    finds = SharedFinds(find)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await finds.find(REMOTE, [key(1)])
    runner = finds._runners["remote"]
    assert not runner.done()  # still sending the batch: its entries are indexed for the next lookup
    find.gate.set()
    await runner
    assert find.calls == [[key(1)]]


async def test_closing_cancels_the_batches_in_flight_and_waiting():
    find = Held()
    finds = SharedFinds(find)
    first = asyncio.create_task(finds.find(REMOTE, [key(1)]))
    await asyncio.sleep(0)
    second = asyncio.create_task(finds.find(REMOTE, [key(2)]))
    await asyncio.sleep(0)
    finds.close()
    for c in (first, second):
        with pytest.raises(asyncio.CancelledError):
            await c
    assert finds._runners == {} and finds.waiting("remote") == 0  # nothing left running or waiting
