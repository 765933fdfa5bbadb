"""The systemd notify protocol, spoken by the daemon itself (no dependency).

systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) to a
``Type=notify`` service; the service sends newline-separated ``KEY=VALUE`` datagrams: ``READY=1`` once
it serves, ``STOPPING=1`` when it begins to shut down, ``WATCHDOG=1`` at least every
``$WATCHDOG_USEC / 2`` microseconds when the unit sets ``WatchdogSec``, and ``STATUS=...`` for
``systemctl status``. Without ``$NOTIFY_SOCKET`` every call is a no-op.

A reload (SIGHUP) is bracketed: ``RELOADING=1`` with ``MONOTONIC_USEC`` (the clock systemd compares
to tell this reload from an earlier one; ``Type=notify-reload`` units require it), then ``READY=1``.
A failed reload still ends in ``READY=1`` (the daemon keeps serving on its previous configuration) but
carries ``ERRNO=22`` (EINVAL) and a STATUS that says why; the next good reload clears it (``ERRNO=0``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` as one datagram. Returns False (and logs at DEBUG) when it cannot."""
        if not self._addr:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self._addr)
                s.sendall("\n".join(fields).encode())
            return True
        except OSError:
            logger.debug("sd_notify to %r failed", self._addr, exc_info=True)
            return False

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self, status: str = "shutting down") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def reloading(self, status: str = "reloading the configuration") -> bool:
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                           f"STATUS={status}")

    def reloaded(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", "ERRNO=0")

    def reload_failed(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"ERRNO={errno.EINVAL}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")
