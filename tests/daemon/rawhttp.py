"""Raw HTTP/1.1 over the daemon's Unix socket, for tests that send what no client library would."""

from __future__ import annotations

import socket
import time


def send(path: str, method: str, route: str, body: bytes = b"", *, headers: dict[str, str] | None = None,
         timeout: float = 2.0) -> tuple[int, bytes, float]:
    """One request on a fresh connection: ``(status, body, seconds)``; status 0 if no answer came in
    ``timeout`` (a hang) or the daemon closed the connection without answering."""
    h = {"Host": "kvd", "Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    head = f"{method} {route} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    t0 = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall(head.encode("latin-1", "replace") + body)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    return 0, data, time.monotonic() - t0
                data += chunk
            line, _, rest = data.partition(b"\r\n")
            status = int(line.split()[1])
            length = 0
            for hl in rest.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
                name, _, value = hl.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            payload = data.split(b"\r\n\r\n", 1)[1]
            while len(payload) < length:
                chunk = s.recv(65536)
                if not chunk:
                    break
                payload += chunk
            return status, payload, time.monotonic() - t0
        except TimeoutError:
            return 0, b"", time.monotonic() - t0
        except (ConnectionResetError, BrokenPipeError):
            return 0, b"", time.monotonic() - t0
