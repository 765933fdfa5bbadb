"""Closing the store, the tiers and the daemon's thread pools within the shutdown's bound.

A tier's I/O can stall (a disk or a network mount that stopped answering, an LMDB write waiting on
the device): closing the SSD tier waits for its operations in flight, and the pools wait for their
threads. Done on the event loop, a stuck write kept a SIGTERMed daemon alive for as long as the write
(docs/deploy.md: up to twice ``daemon.shutdown_timeout_s``). Here the waits end at the shutdown's
deadline; what is still stuck then is logged and left to the process's exit, which must then not
wait for the I/O threads either (``exit_now``). LMDB keeps every committed transaction, and the arena
and socket left behind are a dead daemon's, removed at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from concurrent.futures import Executor

logger = logging.getLogger("kvd")
MIN_CLOSE_S = 1.0  # the close's own time when the requests took the whole deadline (a normal one takes ms)


async def close_within(store, tiers: list, pools: list[Executor], deadline: float) -> bool:
    """Close ``store`` (may be None), ``tiers`` (last first) and ``pools`` by ``deadline``
    (``time.monotonic()``; at least ``MIN_CLOSE_S`` from now). False if I/O was still stuck then: the
    process must ``exit_now``."""
    loop = asyncio.get_running_loop()
    when = loop.time() + max(MIN_CLOSE_S, deadline - time.monotonic())
    closing = "the store's tasks"
    try:
        async with asyncio.timeout_at(when):
            if store is not None:
                try:
                    await store.background.close()
                    await store.admin.close()
                finally:
                    store.close()  # the shared lookup index says the daemon is gone, stuck or not
            closing = "the tiers"
            done = loop.create_future()

            def close() -> None:  # on a thread of its own: a tier's close may wait for stuck I/O
                try:
                    for tier in reversed(tiers):
                        tier.close()
                    for pool in pools:
                        pool.shutdown(wait=True, cancel_futures=True)
                finally:
                    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

            threading.Thread(target=close, name="kvd-close", daemon=True).start()
            await done
        return True
    except TimeoutError:
        logger.error("tier I/O still stuck at the shutdown's deadline (closing %s): exiting without waiting "
                     "for it (committed SSD records are kept; the arena is removed at the next start)", closing)
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        return False


def exit_now(code: int) -> None:
    """End the process at once: its I/O threads are stuck, and the interpreter's exit would join them."""
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
