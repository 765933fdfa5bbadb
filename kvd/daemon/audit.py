"""Admin actions in the daemon's log: what was done, to what, with what result, and who asked.

pin, unpin, delete, evict, flush and compact change what the cache holds for every engine, so each
one leaves one INFO line under the ``kvd.admin`` logger, e.g.::

    admin: evict tier host (max 1048576 bytes) by pid 4242 uid 1000 gid 1000: 3 entries, 393216 bytes

Who asked is the Unix-socket peer's credentials (``SO_PEERCRED``: kernel-checked, not client-sent).
A request over TCP (tests) has none and says so.
"""

from __future__ import annotations

import logging
import socket
import struct

from aiohttp import web

logger = logging.getLogger("kvd.admin")


def peer(request: web.Request) -> tuple[int, int, int] | None:
    """``(pid, uid, gid)`` of the process on the other end of the Unix socket, or None."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return None


def who(request: web.Request) -> str:
    creds = peer(request)
    if creds is None:
        return "a peer without credentials (not the Unix socket)"
    pid, uid, gid = creds
    return f"pid {pid} uid {uid} gid {gid}"


def scope(namespace: str | None, fingerprint: str | None) -> str:
    parts = [f"namespace {namespace}" if namespace else "every namespace"]
    if fingerprint:
        parts.append(f"model {fingerprint[:12]}")
    return ", ".join(parts)


def admin_action(request: web.Request, action: str, result: str) -> None:
    """One INFO line: ``admin: <action> by <who>: <result>``."""
    logger.info("admin: %s by %s: %s", action, who(request), result)
