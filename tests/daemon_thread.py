"""The real daemon (``kvd.daemon.service.Daemon``) served from a thread of this process, on its own loop.

For the GPU tier's tests on CPU: the daemon and its clients must share one process so that the
in-process stand-in for CUDA IPC (``kvd.core.gpu_ipc.InProcessIpc``) can hand the pool tensor across.
Everything else is as in production: the control socket, the arena file, the client's HTTP.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from kvd.core.config import Settings, load_settings
from kvd.daemon.service import Daemon


def settings_for(root: Path, **sections) -> Settings:
    """Settings on ``root`` (socket, arena, SSD), no metrics port, with ``sections`` over them."""
    over: dict = {"daemon": {"socket": str(root / "kvd.sock"), "metrics_addr": ""},
                  "host": {"path": str(root / "kvd.arena")}, "ssd": {"path": str(root / "ssd")}}
    for k, v in sections.items():
        over.setdefault(k, {}).update(v)
    return load_settings(None, environ={}, overrides=over)


class ThreadDaemon:
    def __init__(self, settings: Settings, *, gpu_ipc=None) -> None:
        self.settings = settings
        self.socket = str(settings.socket_path())
        self._loop = asyncio.new_event_loop()
        self.daemon = Daemon(settings, handle_signals=False, gpu_ipc=gpu_ipc)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvd-daemon", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            try:
                await self.daemon.start()
            except BaseException as e:  # noqa: BLE001 - reported to the starting thread
                self._error = e
                self._ready.set()
                await self.daemon.shutdown()
                return
            self._ready.set()
            await self.daemon._stop.wait()
            await self.daemon.shutdown()

        self._loop.run_until_complete(main())
        self._loop.close()

    def start(self) -> ThreadDaemon:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    @property
    def store(self):
        from kvd.daemon.api import STORE

        return self.daemon.app[STORE]

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self.daemon.request_stop)
        self._thread.join(60)


def gpu_daemon(root: Path, ipc, *, gpu_bytes: int, host_bytes: int, slot_bytes: int = 64 << 10) -> ThreadDaemon:
    """A started daemon with a GPU pool of ``gpu_bytes`` shared through ``ipc`` (the in-process stand-in),
    an arena of ``host_bytes`` and no SSD tier: what the GPU tier's client tests run against."""
    return ThreadDaemon(settings_for(root, ssd={"enabled": False},
                                     host={"capacity_bytes": host_bytes, "slot_bytes": slot_bytes},
                                     gpu={"enabled": True, "capacity_bytes": gpu_bytes, "slot_bytes": slot_bytes}),
                        gpu_ipc=ipc).start()
