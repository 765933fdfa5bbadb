"""The control socket's path: making room for it, checking whose directory it is in, and binding it
with its mode.

Only a dead socket of an earlier daemon is ever removed from the path; anything else there stops the
start (``ConfigError``). The socket's directory must belong to the daemon's user or to root: a
directory another user owns (``/tmp/kvd-<uid>``, the default outside systemd and XDG, made by someone
else first) lets that user replace the socket with one of their own, which clients would then trust.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from kvd.core.errors import ConfigError
from kvd.daemon.frames import ControlServer


def prepare_socket(path: Path) -> None:
    """Make room for the socket: a stale socket of a dead daemon is removed; anything else at the path
    (a regular file, a directory, a link, a live daemon) stops the start: kvd never deletes what is
    not its own."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"daemon.socket {path}: cannot create its directory {path.parent} ({e.strerror}); "
                          "create it or pass another --socket") from None
    owner = path.parent.stat().st_uid
    if owner not in (os.getuid(), 0):
        raise ConfigError(f"daemon.socket {path}: its directory {path.parent} belongs to uid {owner}, who could "
                          "replace the socket with their own; remove the directory or pass another --socket")
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"daemon.socket {path} exists and is not a socket; kvd will not replace it: "
                              "remove it or pass another --socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(str(path))
            except OSError:
                path.unlink()  # stale socket of a daemon that died
                return
        raise ConfigError(f"another kvd is already serving on {path}; stop it or pass --socket")


async def bind(control: ControlServer, path: Path, mode: int, backlog: int) -> None:
    """Listen on ``path``. The socket is created under a umask that already gives it its mode, so it is
    never reachable with wider permissions than configured, not even until the chmod."""
    old_umask = os.umask(0o777 & ~mode)
    try:
        await control.start(str(path), backlog)
    except OSError as e:  # "AF_UNIX path too long" (108 bytes), a read-only directory, ...
        raise ConfigError(f"cannot listen on daemon.socket {path}: {e.strerror or e}; pass another --socket") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
