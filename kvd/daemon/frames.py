"""The control socket: HTTP for every call, and length-prefixed frames for the lookup hot path, on the
same Unix socket, told apart by a connection's first four bytes.

Why: a lookup is the call every engine request makes before it is scheduled. Over HTTP, aiohttp's
request parsing, middleware and response writing cost the daemon more than the lookup itself (about
0.3 ms a call on the 2-core benchmark box, against 0.28 ms for 128 hits), and with eight clients the
calls queue behind each other on the event loop. A framed connection carries only the compact lookup
(``kvd.core.lookup_wire``): no headers, no routing, the peer's credentials read once per connection.

A framed connection opens with the preface ``b"KVF1"``; anything else is HTTP and goes to aiohttp,
bytes and all, so HTTP clients (``curl``, the Python client's other calls) see no difference. Then,
little-endian::

    request   I length, then a compact lookup body (b"KVL1" ...)
    answer    I length, H status, then a compact answer (200) or a JSON ErrorBody (any other status)

One request at a time per connection, answered in order. Every rule of the HTTP lookup holds: the
body's size (``daemon.max_request_bytes``, a 413 that closes the connection), its arrival time
(``daemon.body_timeout_s``, a 408 that closes it), the idle time (``daemon.idle_timeout_s``), the
caller's namespace, 503 while shutting down, the same error codes and the same per-route metrics.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time

from aiohttp import web

from kvd.core.errors import InvalidRequest, RequestTimeout, RequestTooLarge, ShuttingDown
from kvd.daemon.api import METRICS, STATE, TENANTS, compact_lookup, error_json, failure, observe
from kvd.daemon.tenants import peer_credentials

logger = logging.getLogger(__name__)

PREFACE = b"KVF1"
REQUEST = struct.Struct("<I")
ANSWER = struct.Struct("<IH")
ROUTE = "/v1/lookup"  # frames are counted under the route they stand for


class _Sniffer(asyncio.Protocol):
    """A new connection until its first bytes say what it speaks: frames, or HTTP (handed to aiohttp)."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        idle = self.server.app[STATE]["settings"].daemon.idle_timeout_s
        self.timer = asyncio.get_running_loop().call_later(idle, transport.close)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) < len(PREFACE) and PREFACE.startswith(self.buf):
            return  # too few bytes to tell yet
        self.timer.cancel()
        if self.buf.startswith(PREFACE):
            proto: asyncio.Protocol = FrameConnection(self.server)
            rest = self.buf[len(PREFACE):]
        else:
            proto, rest = self.server.http(), self.buf
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        if rest:
            proto.data_received(rest)

    def eof_received(self) -> bool:
        return False  # closed before saying anything: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class FrameConnection(asyncio.Protocol):
    """One framed connection: reads a request, answers it, reads the next."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.app = server.app
        self.settings = self.app[STATE]["settings"].daemon
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.creds: tuple[int | None, int | None, int | None] = (None, None, None)
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.arriving = False  # a frame has begun and its body_timeout_s runs (from its first byte)
        self.paused = False  # reading, while requests wait in the buffer
        self.write_paused = False  # the client is not reading its answers: serve nothing more meanwhile

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.creds = peer_credentials(transport.get_extra_info("socket"))  # a connection's peer never changes
        self.server.frames.add(self)
        self._arm(self.settings.idle_timeout_s, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.frames.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.task is None and not self.write_paused:
            self._next()
        elif len(self.buf) > REQUEST.size + int(self.settings.max_request_bytes) and not self.paused:
            self.transport.pause_reading()  # a client that pipelines: hold it until we catch up
            self.paused = True

    def pause_writing(self) -> None:
        """The transport's write buffer is full: a client that sends without reading its answers
        gets nothing more served (and, once its requests fill the buffer, nothing more read) until
        it reads; what the daemon holds for it stays bounded."""
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.task is None and not self.transport.is_closing():
            self._next()

    def _arm(self, seconds: float, error: Exception | None) -> None:
        """Close the connection after ``seconds`` unless a request completes first; with ``error``
        answered first (a body that stalled), silently otherwise (idle)."""
        if self.timer is not None:
            self.timer.cancel()
        self.arriving = error is not None
        self.timer = asyncio.get_running_loop().call_later(seconds, self._expire, error)

    def _arriving(self) -> None:
        """Part of a frame is here: the whole frame must arrive within ``body_timeout_s`` of its first
        bytes, as an HTTP body must, however its bytes trickle in (re-arming at every read let a client
        sending a byte at a time hold its connection forever)."""
        if not self.arriving:
            self._arm(self.settings.body_timeout_s, RequestTimeout(
                f"the frame did not arrive within {self.settings.body_timeout_s} s (daemon.body_timeout_s)"))

    def _expire(self, error: Exception | None) -> None:
        if error is not None:
            self._fail(error)
        self.transport.close()

    def _error(self, e: Exception) -> tuple[int, bytes]:
        status, code, message = failure(e, "a framed lookup", self.app[METRICS])
        return status, error_json(code, message)

    def _fail(self, e: Exception) -> None:
        """Answer ``e`` for a frame that was never served (too large, too slow)."""
        status, body = self._error(e)
        self._write(status, body)
        observe(self.app[METRICS], "FRAME", ROUTE, status, 0.0)

    def _write(self, status: int, body: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(ANSWER.pack(len(body), status) + body)

    def _next(self) -> None:
        if self.paused and len(self.buf) <= REQUEST.size + int(self.settings.max_request_bytes):
            self.transport.resume_reading()  # the waiting requests fit the limit again: read more
            self.paused = False
        if len(self.buf) < REQUEST.size:
            if self.buf:
                self._arriving()
            else:
                self._arm(self.settings.idle_timeout_s, None)
            return
        (n,) = REQUEST.unpack_from(self.buf)
        if n > self.settings.max_request_bytes:
            self._fail(RequestTooLarge(f"a frame of {n} bytes; at most {int(self.settings.max_request_bytes)} "
                                       "(daemon.max_request_bytes)"))
            self.transport.close()
            return
        if len(self.buf) < REQUEST.size + n:
            self._arriving()
            return
        body = bytes(self.buf[REQUEST.size:REQUEST.size + n])
        del self.buf[:REQUEST.size + n]
        self.timer.cancel()
        self.arriving = False
        self.task = asyncio.get_running_loop().create_task(self._serve(body))

    def _caller(self):
        pid, uid, gid = self.creds
        return self.app[TENANTS].caller(pid or None, uid, gid)

    async def _serve(self, body: bytes) -> None:
        t0 = time.perf_counter()
        try:
            if self.app[STATE]["shutting_down"]:
                raise ShuttingDown("kvd is shutting down; retry against the restarted daemon")
            if not body:
                raise InvalidRequest("empty frame; a framed lookup carries a compact lookup body (b'KVL1' ...)")
            answer, status = await compact_lookup(self.app, self._caller(), body), 200
        except Exception as e:  # noqa: BLE001 - the boundary: answer, keep serving
            status, answer = self._error(e)
        self._write(status, answer)
        observe(self.app[METRICS], "FRAME", ROUTE, status, time.perf_counter() - t0)
        self.task = None
        if not self.transport.is_closing() and not self.write_paused:
            self._next()


class ControlServer:
    """The listening control socket: frames served here, HTTP by the app's aiohttp server."""

    def __init__(self, runner: web.AppRunner, app: web.Application) -> None:
        self.http = runner.server  # aiohttp's protocol factory: it tracks and shuts down its connections
        self.app = app
        self.frames: set[FrameConnection] = set()
        self.listener: asyncio.Server | None = None

    async def start(self, path: str, backlog: int) -> None:
        loop = asyncio.get_running_loop()
        self.listener = await loop.create_unix_server(lambda: _Sniffer(self), path, backlog=backlog)

    async def close(self, timeout_s: float) -> None:
        """Stop listening; let framed lookups in flight answer (at most ``timeout_s``), then close
        the framed connections. HTTP connections are the app runner's (``AppRunner.cleanup``)."""
        if self.listener is not None:
            self.listener.close()
        busy = [c.task for c in self.frames if c.task is not None]
        if busy:
            await asyncio.wait(busy, timeout=timeout_s)
        for c in list(self.frames):
            c.transport.close()
