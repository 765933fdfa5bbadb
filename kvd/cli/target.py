"""Which daemon kvctl talks to: the control socket, and where that choice came from.

Precedence, first match wins (so that a daemon started with a non-default socket is reachable without
repeating the flag on every command):

1. ``--socket PATH``;
2. ``$KVD_SOCKET`` (kvctl's own variable; the daemon ignores it);
3. the daemon's configuration, read as the daemon reads it: ``--config FILE``, else ``$KVD_CONFIG``,
   else ``/etc/kvd/kvd.toml`` when it exists, with ``KVD_<SECTION>__<KEY>`` overrides
   (``KVD_DAEMON__SOCKET``); its ``daemon.socket`` if set;
4. the daemon's default path for this user, else systemd's ``/run/kvd/kvd.sock`` when only that exists.

Each answer says where it came from, so "unreachable" can tell the user which setting to change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kvd.core.config import default_socket_path, load_settings
from kvd.core.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/kvd/kvd.toml")  # where config/kvd.service points the daemon
SYSTEMD_SOCKET = Path("/run/kvd/kvd.sock")  # RuntimeDirectory=kvd of the shipped unit


@dataclass(slots=True, frozen=True)
class Target:
    socket: str
    source: str  # e.g. "--socket", "KVD_SOCKET", "daemon.socket in /etc/kvd/kvd.toml", "default"


def find_socket(flag: str | None, config: str | None, environ: Mapping[str, str] | None = None) -> Target:
    """The control socket to use (see the module docstring). Raises ``ConfigError`` when a config
    file that was asked for (``--config``, ``$KVD_CONFIG``) cannot be read or is invalid."""
    env = os.environ if environ is None else environ
    if flag:
        return Target(flag, "--socket")
    if env.get("KVD_SOCKET"):
        return Target(env["KVD_SOCKET"], "KVD_SOCKET")
    path, named = _config_path(config, env)
    try:
        settings = load_settings(path, environ=env)
    except ConfigError as e:
        if named:
            raise ConfigError(f"cannot take the socket from the daemon's configuration: {e}; "
                              "pass --socket or set KVD_SOCKET") from None
        settings = None  # /etc/kvd/kvd.toml unreadable by this user: fall back to the defaults
    if settings is not None and settings.daemon.socket:
        origin = "KVD_DAEMON__SOCKET" if env.get("KVD_DAEMON__SOCKET") else f"daemon.socket in {path}"
        return Target(settings.daemon.socket, origin)
    default = default_socket_path()
    if not default.exists() and SYSTEMD_SOCKET.exists():
        return Target(str(SYSTEMD_SOCKET), "the systemd unit's socket")
    return Target(str(default), "the default path")


def _config_path(flag: str | None, env: Mapping[str, str]) -> tuple[str | None, bool]:
    """(config file or None, whether the user named it)."""
    if flag:
        return flag, True
    if env.get("KVD_CONFIG"):
        return env["KVD_CONFIG"], True
    return (str(SYSTEM_CONFIG), False) if SYSTEM_CONFIG.is_file() else (None, False)
