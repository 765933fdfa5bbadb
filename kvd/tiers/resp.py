"""A RESP ``GET`` that receives a large value straight into one buffer, for the remote tier's reads,
and pipelined ``HGETALL`` of many manifests, for its finds.

Why: redis-py receives a bulk string in socket-sized chunks and joins them, in Python; a 4 MB value
came in at 0.26 GB/s per thread on the benchmark machine (0.37 with hiredis), while the same GETs by
``redis-benchmark`` ran at 1 GB/s over 2 connections. Reading the ``$<n>`` header and then
``recv_into`` one preallocated buffer moves the value at memcpy speed.

A find (a lookup's remote round trip) asks for a few manifests: redis-py's cluster pipeline spent
about 0.3 ms of the daemon's CPU on 8 of them (per-command slot and node routing, connection
checkout, response callbacks), a third of a remote-hit lookup. Here the keys are grouped by the node
redis-py says owns them, every node gets one write, and the replies are parsed as they come.

Values are received into buffers of a ``kvd.tiers.buffers.BufferPool``, which the value's reader
gives back (``recycle``) for a later GET.

Scope: plain ``GET`` of one key, ``HGETALL`` of keys, on the node redis-py's cluster client says owns its slot, over
per-thread sockets (each I/O thread its own connection per node), with ACL ``AUTH`` when configured.
Anything unusual — a ``-MOVED``/``-ASK`` redirection during a resharding or failover, an error
reply, TLS — is left to redis-py (``FastGetUnavailable``), which knows how to follow it.
"""

from __future__ import annotations

import socket
import threading

from kvd.tiers.buffers import BufferPool


class FastGetUnavailable(Exception):
    """This GET cannot take the fast path (redirection, error reply, TLS): use the client."""


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out += [b"$%d\r\n" % len(p), p, b"\r\n"]
    return b"".join(out)


class FastGet:
    def __init__(self, *, username: str | None, password: str | None, timeout_s: float) -> None:
        self.username, self.password, self.timeout_s = username, password, timeout_s
        self._local = threading.local()  # (host, port) -> socket, per thread
        self._open: set[socket.socket] = set()  # every thread's, for ``close``
        self._open_lock = threading.Lock()
        self._buffers = BufferPool()  # receive buffers, given back by the values' readers (``recycle``)

    def _socket(self, host: str, port: int) -> socket.socket:
        socks = self._local.__dict__.setdefault("socks", {})
        s = socks.get((host, port))
        if s is None:
            s = socket.create_connection((host, port), timeout=self.timeout_s)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.password:
                auth = [b"AUTH"] + ([self.username.encode()] if self.username else []) + [self.password.encode()]
                s.sendall(_command(*auth))
                reply = s.recv(256)
                if not reply.startswith(b"+OK"):
                    s.close()
                    raise FastGetUnavailable(f"AUTH refused: {reply[:80]!r}")
            socks[(host, port)] = s
            with self._open_lock:
                self._open.add(s)
        return s

    def get(self, host: str, port: int, key: bytes) -> memoryview | None:
        """The value of ``key`` on ``host:port`` (a view of a receive buffer: give it back with
        ``recycle`` once nothing reads it, or drop it); None if absent. ``OSError`` on a broken connection
        (the socket is dropped), ``FastGetUnavailable`` for replies only the client can handle."""
        try:
            return self._get(host, port, key)
        except OSError:
            self.forget(host, port)
            raise

    def recycle(self, value) -> None:
        """``value`` (from ``get``) is read no more: its buffer may receive a later value."""
        self._buffers.give(value)

    def _get(self, host: str, port: int, key: bytes) -> memoryview | None:
        s = self._socket(host, port)
        s.sendall(_command(b"GET", key))
        r = _Replies(s)
        line = r.line()
        if line.startswith(b"-"):
            self.forget(host, port)  # a reply we do not parse may leave bytes behind: start clean
            raise FastGetUnavailable(line.decode(errors="replace"))
        if not line.startswith(b"$"):
            self.forget(host, port)
            raise FastGetUnavailable(f"unexpected reply {line[:40]!r}")
        n = int(line[1:])
        if n < 0:
            return None
        rest = r.buf[r.pos:]  # the value's first bytes, read with the header
        view = self._buffers.take(n + 2)  # the value and its trailing \r\n: never more (the next bytes are not ours)
        pos = min(len(rest), n + 2)
        view[:pos] = rest[:pos]
        while pos < n + 2:
            got = s.recv_into(view[pos:])
            if not got:
                raise ConnectionError(f"{host}:{port} closed the connection mid-value")
            pos += got
        return view[:n]

    def hgetall_many(self, nodes: dict[tuple[str, int], list[bytes]]) -> dict[bytes, dict[bytes, bytes]]:
        """``HGETALL`` of every key, pipelined per node (``(host, port) -> keys`` it owns): every node's
        commands are written before any reply is read. Absent keys answer ``{}``. ``OSError`` on a
        broken connection, ``FastGetUnavailable`` for a reply only the client can handle (a
        redirection): the node's socket is dropped either way, as its stream is no longer in step."""
        sent = []
        try:
            for (host, port), keys in nodes.items():
                s = self._socket(host, port)
                sent.append((host, port, s, keys))  # before the write: a partial write is out of step too
                s.sendall(b"".join(_command(b"HGETALL", k) for k in keys))
            out: dict[bytes, dict[bytes, bytes]] = {}
            for _, _, s, keys in sent:
                r = _Replies(s)
                for k in keys:
                    out[k] = r.hash()
            return out
        except (OSError, FastGetUnavailable):
            for host, port, _, _ in sent:
                self.forget(host, port)
            raise

    def forget(self, host: str, port: int) -> None:
        s = self._local.__dict__.get("socks", {}).pop((host, port), None)
        if s is not None:
            with self._open_lock:
                self._open.discard(s)
            s.close()

    def close(self) -> None:
        """Close every thread's connections (the I/O threads outlive the tier; their sockets did too)."""
        with self._open_lock:
            socks, self._open = self._open, set()
        for s in socks:
            s.close()


class _Replies:
    """RESP2 replies read off one socket in order: a reply's first line (``GET``'s ``$<n>`` header), and
    what ``HGETALL`` answers, arrays of bulk strings."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.pos = 0

    def _more(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the node closed the connection mid-reply")
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n", self.pos)) < 0:
            self._more()
        line, self.pos = self.buf[self.pos:end], end + 2
        return line

    def _bulk(self) -> bytes:
        line = self.line()
        n = int(line[1:]) if line.startswith(b"$") else -1
        if n < 0:
            raise FastGetUnavailable(f"unexpected reply {line[:40]!r}")
        while len(self.buf) - self.pos < n + 2:
            self._more()
        value, self.pos = self.buf[self.pos:self.pos + n], self.pos + n + 2
        return value

    def hash(self) -> dict[bytes, bytes]:
        line = self.line()
        if not line.startswith(b"*"):
            raise FastGetUnavailable(line.decode(errors="replace")[:200])  # -MOVED, -ASK, -ERR ...
        n = int(line[1:])
        if n < 0 or n % 2:
            raise FastGetUnavailable(f"unexpected reply {line[:40]!r}")
        out = {}
        for _ in range(n // 2):
            field = self._bulk()
            out[field] = self._bulk()
        return out
