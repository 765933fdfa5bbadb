"""The kvd service: wiring, lifecycle, signals and systemd notification.

``create_app(settings)`` builds the control application; every resource it needs (thread pool, host
arena, SSD tier, store, background tasks) is a ``cleanup_ctx`` generator, set up on start and torn
down on stop in reverse order. ``serve`` runs it on the Unix socket, with the metrics application on
TCP, until SIGTERM or SIGINT; ``main`` is the ``kvd`` command.

Shutdown (one path for SIGTERM and SIGINT): mark shutting down (new writes get 503), tell systemd
STOPPING, wait for in-flight commits, stop the sites (aiohttp lets running handlers finish), cancel
background tasks, close the tiers, log one summary line, exit 0. SIGHUP reloads the settings that can
change at run time and logs those that need a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from kvd import __version__
from kvd.core.config import Settings, default_config_text, load_settings
from kvd.core.errors import ConfigError, KvdError
from kvd.daemon.api import (
    METRICS,
    SCRAPES_ONLY,
    STATE,
    STORE,
    TENANTS,
    config_view,
    control_routes,
    error_middleware,
    metrics_routes,
)
from kvd.daemon.build import build_tiers, join_remote_later
from kvd.daemon.collector import Collector
from kvd.daemon.frames import ControlServer
from kvd.daemon.listen import bind, prepare_socket
from kvd.daemon.metrics import Metrics
from kvd.daemon.systemd import Notifier
from kvd.daemon.teardown import close_within, exit_now
from kvd.daemon.tenants import Tenants
from kvd.store.recovery import recover
from kvd.store.reporting import entry_counts
from kvd.store.store import Store

logger = logging.getLogger("kvd")

EXPIRE_INTERVAL_S = 0.5
# Settings SIGHUP can change without a restart: (section, key): those read where they are used.
# Not max_request_bytes, zstd_level, threads, recency_half_life_s, shutdown_timeout_s: the HTTP server,
# the compressor, the eviction policies and aiohttp's runner take them when built (a reload reported
# them applied while they were not).
RELOADABLE = {
    ("daemon", "log_level"),
    ("daemon", "max_entries_per_request"), ("daemon", "max_tokens_per_request"),
    ("host", "high_watermark"), ("host", "low_watermark"), ("host", "lease_ttl_s"),
    ("host", "reservation_ttl_s"), ("host", "verify_on_commit"),
    ("ssd", "admit_after"), ("ssd", "prefetch_deadline_s"), ("ssd", "write_batch"),
    ("codec", "hot_codec"), ("codec", "local_cold_codec"), ("codec", "global_cold_codec"),
}


def create_app(settings: Settings, *, clock: Callable[[], float] = time.monotonic, gpu_ipc=None) -> web.Application:
    """The control application. ``gpu_ipc``: how the GPU pool is shared (None: CUDA IPC; tests pass the
    in-process stand-in, ``kvd.core.gpu_ipc.InProcessIpc``)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=int(settings.daemon.max_request_bytes))
    app[STATE] = {"shutting_down": False, "config": config_view(settings), "settings": settings}
    app[TENANTS] = Tenants(settings)
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_store_ctx(settings, clock, gpu_ipc))
    app.cleanup_ctx.append(_expiry_ctx)
    app.add_routes(control_routes())
    return app


def create_metrics_app(control: web.Application) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[METRICS] = control[METRICS]
    app[STATE] = control[STATE]
    app[SCRAPES_ONLY] = True
    app.add_routes(metrics_routes())
    return app


def _store_ctx(settings: Settings, clock: Callable[[], float], gpu_ipc=None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # Two pools: codecs and checksums on one, blocking tier I/O on the other, so a stalled disk
        # (compaction, a slow device) never holds up commit checksums.
        cpu = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="kvd-cpu")
        io = ThreadPoolExecutor(max_workers=max(2, settings.ssd.io_threads), thread_name_prefix="kvd-io")
        tiers: list = []
        store = task = retry = None
        try:
            tenants = app[TENANTS]
            remote = await build_tiers(settings, tenants, io, tiers, gpu_ipc)
            metrics = app[METRICS]
            store = Store(settings, tiers, metrics=metrics, cpu=cpu, io=io, clock=clock,
                          partition_of=tenants.partition_of, quotas={"ssd": tenants.ssd_quota} if tenants.enabled else None)
            metrics.attach_tiers(store.tier_stats, lambda: entry_counts(store))
            metrics.attach_gpu()
            app[STORE] = store
            if store.index.records:
                n = await recover(store)
                logger.info("%s: %d entries recovered", ", ".join(lv.name for lv in store.index.records), n)
            task = asyncio.create_task(store.background.run(), name="kvd-background")
            if settings.remote.enabled and remote is None:  # not required: join the cluster when it comes
                retry = asyncio.create_task(join_remote_later(settings, io, store), name="kvd-remote-join")
            yield
        finally:
            for t in (task, retry):
                if t is not None:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
            by = app[STATE].get("stop_by") or time.monotonic() + settings.daemon.shutdown_timeout_s
            if not await close_within(store, tiers, [io, cpu], by):
                app[STATE]["io_stuck"] = True  # the process exits without joining its I/O threads

    return ctx


async def _expiry_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]

    async def loop() -> None:
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL_S)
            try:
                store.expire()
            except Exception:  # noqa: BLE001 - a background loop survives its own failures
                logger.exception("lease/reservation expiry failed")

    task = asyncio.create_task(loop(), name="kvd-expiry")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# ---- serving ------------------------------------------------------------------------------------


def reload_settings(current: Settings, fresh: Settings) -> tuple[list[str], list[str]]:
    """Copy what may change at run time from ``fresh`` into ``current``. Returns (applied, need restart)."""
    applied, ignored = [], []
    for section in type(current).model_fields:
        old, new = getattr(current, section), getattr(fresh, section)
        if not hasattr(type(old), "model_fields"):  # tenants: a table of sections, changed only by a restart
            if old != new:
                ignored.append(section)
            continue
        for key in type(old).model_fields:
            if getattr(old, key) == getattr(new, key):
                continue
            if (section, key) in RELOADABLE:
                # ``fresh`` was validated as a whole; assigning field by field through validation could
                # fail in between (raising high_watermark and low_watermark together), so copy raw.
                object.__setattr__(old, key, getattr(new, key))
                applied.append(f"{section}.{key}")
            else:
                ignored.append(f"{section}.{key}")
    return applied, ignored


class Daemon:
    """One running kvd: the control app on the Unix socket, metrics on TCP, signals, systemd."""

    def __init__(self, settings: Settings, *, config_path: str | None = None,
                 overrides: dict | None = None, notifier: Notifier | None = None,
                 handle_signals: bool = True, gpu_ipc=None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides
        self.notifier = notifier or Notifier()
        self.handle_signals = handle_signals  # False for tests and embedding (signals need the main thread)
        self.app = create_app(settings, gpu_ipc=gpu_ipc)  # gpu_ipc: tests' in-process stand-in
        self._stop = asyncio.Event()
        self._runners: list[web.AppRunner] = []
        self._control: ControlServer | None = None
        self._serving = False
        self._reload_pending = False  # a SIGHUP before the socket served: reloaded once it does

    async def start(self) -> None:
        s = self.settings
        path = s.socket_path()
        prepare_socket(path)
        # keepalive_timeout: aiohttp arms it from the connection's start and after each answer, and a
        # partial request does not reset it: it closes idle and slow-header connections alike.
        # auto_decompress off: compressed bodies are refused (415), never inflated on the loop.
        runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=s.daemon.shutdown_timeout_s,
                               access_log=None, keepalive_timeout=s.daemon.idle_timeout_s, auto_decompress=False)
        await runner.setup()
        self._runners.append(runner)
        self._control = ControlServer(runner, self.app)  # HTTP and the framed lookups, one socket
        # Metrics first: once the socket answers (what clients and systemd take as ready), every
        # address is served. The socket is created under a umask that already gives it its mode, so
        # it is never reachable with wider permissions than configured, not even until the chmod.
        if s.daemon.metrics_addr:
            host, _, port = s.daemon.metrics_addr.rpartition(":")
            mrunner = web.AppRunner(create_metrics_app(self.app), handle_signals=False, access_log=None)
            await mrunner.setup()
            self._runners.append(mrunner)
            try:
                await web.TCPSite(mrunner, host.strip("[]"), int(port)).start()
            except OSError as e:
                raise ConfigError(f"cannot serve metrics on {s.daemon.metrics_addr}: {e.strerror}; "
                                  "pass another --metrics-addr (or empty to disable)") from None
        await bind(self._control, path, int(s.daemon.socket_mode, 8), s.daemon.listen_backlog)
        logger.info("kvd %s serving on %s (metrics %s)", __version__, path, s.daemon.metrics_addr or "off")
        self.notifier.ready(f"serving on {path}")
        self._serving = True
        if self._reload_pending:
            self.reload()

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the file and the environment, apply what may change at run time. systemd
        hears RELOADING=1 first and READY=1 after, with a STATUS that says what changed, or that the
        reload failed and the running configuration stays (and an ERRNO, for ``systemctl status``).
        A SIGHUP during start-up waits until the daemon serves: its READY=1 would tell systemd the daemon
        serves while the socket is not there yet."""
        if not self._serving:
            self._reload_pending = True
            logger.info("SIGHUP during start-up: reloading once serving")
            return
        self.notifier.reloading()
        serving = f"serving on {self.settings.socket_path()}"
        try:
            fresh = load_settings(self.config_path, overrides=self.overrides)
        except KvdError as e:
            logger.error("SIGHUP: configuration not reloaded: %s", e)
            self.notifier.reload_failed(f"{serving}; reload failed, running the previous configuration: "
                                        f"{str(e).splitlines()[-1].strip()}")
            return
        applied, ignored = reload_settings(self.settings, fresh)
        logging.getLogger().setLevel(self.settings.daemon.log_level)
        self.app[STATE]["config"] = config_view(self.settings)
        what = ", ".join(applied) or "nothing changed"
        later = f"; need a restart: {', '.join(ignored)}" if ignored else ""
        logger.info("SIGHUP: reloaded %s%s", what, later)
        self.notifier.reloaded(f"{serving}; reloaded {what}{later}")

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s
        while interval and self.settings.daemon.watchdog:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def run(self) -> int:
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
        except BaseException:
            await self.shutdown()
            raise
        # The daemon's own process from here on (an embedded one is started with start()): the garbage
        # collector's full passes scan only objects allocated since the last one (kvd.daemon.collector).
        m = self.app[METRICS]
        collector = Collector(m.gc_pauses, m.gc_frozen, self.settings.daemon.gc_full_interval_s)
        collector.start()
        dog = asyncio.create_task(self._watchdog(), name="kvd-watchdog")
        await self._stop.wait()
        dog.cancel()
        collector.stop()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        t0 = time.monotonic()
        self.app[STATE]["shutting_down"] = True
        self.app[STATE]["stop_by"] = t0 + 2 * self.settings.daemon.shutdown_timeout_s  # tiers closed by then
        self.notifier.stopping()
        store = self.app.get(STORE)
        if store is None:  # setup failed before the store existed
            if self._control is not None:
                await self._control.close(0.0)
            for runner in reversed(self._runners):
                await runner.cleanup()
            return
        deadline = t0 + self.settings.daemon.shutdown_timeout_s
        while store.holds.committing and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        entries, leases = len(store.index), len(store.holds.leases)
        if self._control is not None:
            await self._control.close(max(0.0, deadline - time.monotonic()))
        for runner in reversed(self._runners):
            await runner.cleanup()
        self.settings.socket_path().unlink(missing_ok=True)
        logger.info("kvd stopped in %.2f s: %d entries indexed, %d leases dropped", time.monotonic() - t0,
                    entries, leases)


# ---- command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvd", description="kvd: head-aware tiered KV-cache daemon (foreground)")
    p.add_argument("--config", metavar="FILE", help="TOML settings file (default: embedded defaults; "
                   "$KVD_CONFIG if set)")
    p.add_argument("--socket", metavar="PATH", help="Unix socket of the control API")
    p.add_argument("--metrics-addr", metavar="HOST:PORT", help="metrics/health HTTP address ('' disables)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--check-config", metavar="FILE", help="validate FILE (with KVD_* overrides) and exit")
    p.add_argument("--print-default-config", action="store_true", help="print every setting with its default")
    p.add_argument("--version", action="version", version=f"kvd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.print_default_config:
        sys.stdout.write(default_config_text())
        return 0
    overrides: dict = {}
    if args.socket is not None:
        overrides.setdefault("daemon", {})["socket"] = args.socket
    if args.metrics_addr is not None:
        overrides.setdefault("daemon", {})["metrics_addr"] = args.metrics_addr
    if args.log_level is not None:
        overrides.setdefault("daemon", {})["log_level"] = args.log_level
    config_path = args.check_config or args.config or os.environ.get("KVD_CONFIG") or None
    try:
        settings = load_settings(config_path, overrides=overrides)
    except ConfigError as e:
        print(f"kvd: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"kvd: {args.check_config}: configuration is valid")
        return 0
    _raise_fd_limit()
    logging.basicConfig(level=settings.daemon.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_amain(settings, config_path, overrides))
    except KvdError as e:
        logger.error("%s", e)
        return 1


def _raise_fd_limit() -> None:
    """Every client connection is a file descriptor: take the hard limit (systemd's LimitNOFILE sets
    it under the unit; a shell's default soft limit of 1,024 would refuse a burst of new clients)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _loop_factory():
    """uvloop where installed (about a third less per-request overhead in aiohttp), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _amain(settings: Settings, config_path: str | None, overrides: dict) -> int:
    daemon = Daemon(settings, config_path=config_path, overrides=overrides)
    code = await daemon.run()
    if daemon.app[STATE].get("io_stuck"):
        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
