"""Keeping a daemon hold alive: a lease or a reservation lives the daemon's TTL (``expires_in_s``)
unless renewed, and an engine may copy through one for longer (a forward on a slow CPU, layer by
layer). ``kvd.client.transfer``'s ``Lease`` and ``Reservation`` renew through this before each copy."""

from __future__ import annotations

import time

from kvd.client.handle import ModelHandle
from kvd.core import protocol as P
from kvd.core.errors import NotFound


class Renewal:
    """Renews a hold (lease or reservation) of ``ttl_s`` seconds a third of its TTL after it was taken
    or last renewed (timed before the request: the daemon's deadline is never earlier than ours)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.at = time.monotonic()

    def lapsed(self, handle: ModelHandle, hold_id: str | None) -> NotFound | None:
        """The daemon's ``NotFound`` if the hold is over (its views may have been reused), else None."""
        now = time.monotonic()
        if hold_id is not None and now - self.at >= self.ttl_s / 3:
            try:
                handle.client.renew(P.RenewRequest(hold_id=hold_id))
            except NotFound as e:
                return e
            self.at = now
        return None
