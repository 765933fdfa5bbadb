"""A gate for a tier's operations: many at once, or one exclusive once none is in flight."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Gate:
    """Many operations at once (``with gate:``), or one exclusive (``with gate.exclusive():``, for
    ``compact``/``close``) once none is in flight; new operations wait while it runs."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive = False

    def __enter__(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._active += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._cond.wait_for(lambda: self._active == 0)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
