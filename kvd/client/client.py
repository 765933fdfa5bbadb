"""The engine-side client of the kvd daemon: sync (``KvdClient``) and async (``AsyncKvdClient``).

Both speak the control API (``kvd.core.protocol`` models) over the daemon's Unix socket and map the host
arena (``kvd.client.arena``); the sync one holds one keep-alive connection, the async one an
aiohttp session. They raise the daemon's own error types (``kvd.core.errors``) and exactly one type when
the daemon cannot be reached or does not answer in time: ``DaemonUnavailable``, so an engine catches
it and recomputes.

Restarts are survived: a broken connection is re-opened once per call; a ``NotFound`` for a model
this client registered (the new daemon does not know it yet) re-registers the model and retries;
a new ``arena_id`` in an answer remaps the arena before its offsets are used.

The high-level entry points (``store_prefix``, ``lookup_prefix``, ``load_prefix``) live in
``kvd.client.prefix`` and work with either client's sync API.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from kvd.client.arena import ArenaMapping
from kvd.client.http import JSON, FramesUnsupported, UnixFrames, UnixHttp, left, parse_answer, raise_for, turn
from kvd.client.local_lookup import LocalLookups
from kvd.core import lookup_wire
from kvd.core import protocol as P
from kvd.core.config import SsdSettings, default_socket_path
from kvd.core.errors import DaemonUnavailable, ProtocolMismatch
from kvd.core.protocol_lookup import LookupReport

M = TypeVar("M", bound=BaseModel)


class _Registrations:
    """Models this client registered, to re-register after a daemon restart."""

    def __init__(self) -> None:
        self.by_fingerprint: dict[str, P.RegisterModelRequest] = {}


def _the_arena(mapped: ArenaMapping | None, arena_id: str | None) -> ArenaMapping:
    """``mapped`` if it is the arena ``arena_id`` names. Another one (this client's registration maps its
    caller's arena, e.g. an admin's default one, while a tenant namespace's holds are answered in the
    tenant's; or the daemon restarted again meanwhile) must never be read or written at those offsets."""
    if mapped is None or arena_id not in (None, mapped.arena_id):
        raise DaemonUnavailable(f"the daemon answered in arena {arena_id}, but this client maps "
                                f"{mapped.arena_id if mapped else 'none'}; not mapped, retry or use a client of that tenant")
    return mapped


DAEMON_LEASE_WAIT_S = SsdSettings.model_fields["prefetch_deadline_s"].default  # a lease without wait_s


def lease_wait(req: P.LeaseRequest) -> float:
    """How long the daemon may hold a lease call while it brings entries up: ``wait_s``, or without one
    the daemon's ``ssd.prefetch_deadline_s`` (its default here: pass ``wait_s`` where it is raised). The
    call's timeout must add it, or a lease answered after a long promotion times out on the client
    while the daemon grants it (and holds it until its TTL)."""
    return req.wait_s if req.wait_s is not None else DAEMON_LEASE_WAIT_S


class KvdClient:
    """Blocking client. Thread-safe: calls are serialised (one HTTP connection, and a framed one for
    compact lookups)."""

    def __init__(self, socket_path: str | Path | None = None, *, timeout_s: float = 5.0,
                 register_cuda: bool = True, populate_arena: bool = False, frames: bool = True,
                 local_lookups: bool = True) -> None:
        self.socket_path = str(socket_path or default_socket_path())
        self.timeout_s = timeout_s
        self.register_cuda = register_cuda
        self.populate_arena = populate_arena  # map every arena page when mapping it (kvd.client.arena)
        self._conn: UnixHttp | None = None
        self._frames: UnixFrames | None = None  # the lookup hot path's connection (kvd.daemon.frames)
        self._framed = frames  # False: lookups over HTTP too (or once the daemon turned out to predate frames)
        self._lock = threading.RLock()
        self._models = _Registrations()
        self._arena: ArenaMapping | None = None
        self.arena_info: P.ArenaInfo | None = None
        # Exact prefix lookups answered from the daemon's shared index, no round trip (kvd.client.local_lookup)
        self.local = LocalLookups(self._send_report) if local_lookups else None

    # ---- transport --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None, timeout: float,
                 content_type: str = JSON) -> tuple[int, bytes]:
        attempt = 0
        while True:
            framed = self._framed and content_type == lookup_wire.CONTENT_TYPE  # the lookup hot path
            try:
                conn = self._connection(framed, timeout)
                conn.settimeout(timeout)
                return conn.request(method, path, body, content_type)
            except FramesUnsupported:  # a daemon from before frames: this client uses HTTP from now on
                self._close_conn(framed=True)
                self._framed = False
            except TimeoutError as e:
                self._close_conn(framed)
                raise DaemonUnavailable(f"kvd at {self.socket_path} did not answer {path} within {timeout:.3g} s") from e
            except OSError as e:
                # A kept-alive connection the daemon closed (restart, idle timeout) fails here; one
                # fresh connection is tried before the daemon is called unreachable.
                self._close_conn(framed)
                if attempt == 1:
                    raise DaemonUnavailable(f"kvd at {self.socket_path} is unreachable ({e}); "
                                            "is the daemon running? (systemctl status kvd)") from e
                attempt += 1
            except BaseException:
                # Cut off mid-exchange (KeyboardInterrupt, a malformed answer): the connection may still
                # carry this request's answer, which the next call would read as its own.
                self._close_conn(framed)
                raise

    def _connection(self, framed: bool, timeout: float) -> UnixHttp | UnixFrames:
        if framed:
            if self._frames is None:
                self._frames = UnixFrames(self.socket_path, timeout)
            return self._frames
        if self._conn is None:
            self._conn = UnixHttp(self.socket_path, timeout)
        return self._conn

    def _close_conn(self, framed: bool = False) -> None:
        if framed:
            if self._frames is not None:
                self._frames.close()
                self._frames = None
        elif self._conn is not None:
            self._conn.close()
            self._conn = None

    def call(self, method: str, path: str, req: BaseModel | None, resp_model: type[M], *,
             timeout_s: float | None = None) -> M:
        body = req.model_dump_json().encode() if req is not None else None
        return parse_answer(resp_model, self._exchange(method, path, req, body, timeout_s or self.timeout_s), path)

    def _exchange(self, method: str, path: str, req: BaseModel | None, body: bytes | None, timeout: float,
                  content_type: str = JSON) -> bytes:
        with turn(self._lock, timeout, f"kvd at {self.socket_path} did not answer {path}") as deadline:
            status, raw = self._request(method, path, body, left(deadline), content_type)
            if status == 404 and self._reregister(req, raw, deadline):
                status, raw = self._request(method, path, body, left(deadline), content_type)
        if status >= 400:
            raise_for(status, raw, path)
        return raw

    def _reregister(self, req: BaseModel | None, raw: bytes, deadline: float) -> bool:
        fp = getattr(req, "fingerprint", None)
        if fp is None or fp not in self._models.by_fingerprint or b"not registered" not in raw:
            return False
        body = self._models.by_fingerprint[fp].model_dump_json().encode()
        status, answer = self._request("POST", "/v1/models", body, left(deadline))
        if status >= 400:
            return False
        self._arena_seen(parse_answer(P.RegisterModelResponse, answer, "/v1/models").arena)
        return True

    def get_json(self, path: str) -> Any:
        with turn(self._lock, self.timeout_s, f"kvd at {self.socket_path} did not answer {path}") as deadline:
            status, raw = self._request("GET", path, None, left(deadline))
        if status >= 400:
            raise_for(status, raw, path)
        return json.loads(raw)

    # ---- arena ------------------------------------------------------------------------------------

    def _arena_seen(self, info: P.ArenaInfo) -> None:
        if self._arena is None or self._arena.arena_id != info.arena_id:
            old, self._arena = self._arena, None
            if old is not None:
                old.close()
            self.arena_info = info
            self._arena = ArenaMapping(info, register_cuda=self.register_cuda, populate=self.populate_arena)
        if self.local is not None:
            self.local.attach(info)

    def arena(self, arena_id: str | None = None) -> ArenaMapping:
        """The mapped arena; remapped first if the daemon reports another ``arena_id`` (it restarted)."""
        if self._arena is not None and arena_id in (None, self._arena.arena_id):
            return self._arena
        for req in self._models.by_fingerprint.values():  # any registration answers with the arena
            self._arena_seen(self.call("POST", "/v1/models", req, P.RegisterModelResponse).arena)
            return _the_arena(self._arena, arena_id)
        raise DaemonUnavailable("no arena mapped yet: register a model first")

    # ---- API --------------------------------------------------------------------------------------

    def health(self) -> P.HealthResponse:
        return self.call("GET", "/v1/health", None, P.HealthResponse)

    def register_model(self, req: P.RegisterModelRequest) -> P.RegisterModelResponse:
        resp = self.call("POST", "/v1/models", req, P.RegisterModelResponse)
        self._models.by_fingerprint[resp.fingerprint] = req.model_copy(update={"fingerprint": resp.fingerprint})
        self._arena_seen(resp.arena)
        return resp

    def models(self) -> P.ModelsResponse:
        return self.call("GET", "/v1/models", None, P.ModelsResponse)

    def lookup(self, req: P.LookupRequest) -> P.LookupResponse:
        return self.call("POST", "/v1/lookup", req, P.LookupResponse)

    def lookup_compact(self, req: P.LookupRequest) -> lookup_wire.LookupAnswer:
        """``lookup`` in the hot path's binary form (``kvd.core.lookup_wire``), on the client's framed
        connection (``kvd.daemon.frames``; HTTP if the daemon predates frames); hashes only, not token ids."""
        if self.local is not None:
            answer = self.local.answer(req)
            if answer is not None:
                return answer
        raw = self._exchange("POST", "/v1/lookup", req, lookup_wire.encode_lookup(req), self.timeout_s,
                             lookup_wire.CONTENT_TYPE)
        try:
            answer = lookup_wire.decode_answer(raw, req)
        except ValueError as e:
            raise ProtocolMismatch(f"/v1/lookup: {e}") from None
        if self.local is not None:
            self.local.vouch(req)
        return answer

    def _send_report(self, report: LookupReport) -> None:
        self.call("POST", "/v1/lookup/report", report, P.CountResponse)

    def reserve(self, req: P.ReserveRequest) -> P.ReserveResponse:
        return self.call("POST", "/v1/reserve", req, P.ReserveResponse)

    def commit(self, req: P.CommitRequest) -> P.CommitResponse:
        return self.call("POST", "/v1/commit", req, P.CommitResponse)

    def abort(self, req: P.AbortRequest) -> P.CountResponse:
        return self.call("POST", "/v1/abort", req, P.CountResponse)

    def lease(self, req: P.LeaseRequest) -> P.LeaseResponse:
        return self.call("POST", "/v1/lease", req, P.LeaseResponse, timeout_s=self.timeout_s + lease_wait(req))

    def release(self, req: P.ReleaseRequest) -> P.CountResponse:
        return self.call("POST", "/v1/release", req, P.CountResponse)

    def renew(self, req: P.RenewRequest) -> P.CountResponse:
        return self.call("POST", "/v1/renew", req, P.CountResponse)

    def delete(self, req: P.EntriesRequest) -> P.CountResponse:
        return self.call("POST", "/v1/delete", req, P.CountResponse)

    def pin(self, req: P.EntriesRequest) -> P.CountResponse:
        return self.call("POST", "/v1/pin", req, P.CountResponse)

    def unpin(self, req: P.EntriesRequest) -> P.CountResponse:
        return self.call("POST", "/v1/unpin", req, P.CountResponse)

    def entries(self, *, model: str | None = None, namespace: str | None = None, tier: str | None = None,
                limit: int = 1000) -> P.EntriesResponse:
        from urllib.parse import urlencode

        q = {k: v for k, v in (("model", model), ("namespace", namespace), ("tier", tier)) if v}
        q["limit"] = str(limit)
        return self.call("GET", "/v1/entries?" + urlencode(q), None, P.EntriesResponse)

    def evict(self, req: P.EvictRequest) -> P.EvictResponse:
        return self.call("POST", "/v1/evict", req, P.EvictResponse, timeout_s=max(self.timeout_s, 300))

    def flush(self, req: P.FlushRequest) -> P.CountResponse:
        return self.call("POST", "/v1/flush", req, P.CountResponse, timeout_s=max(self.timeout_s, 3600))

    def compact(self) -> P.CountResponse:
        return self.call("POST", "/v1/compact", P.FlushRequest(), P.CountResponse, timeout_s=max(self.timeout_s, 3600))

    def stats(self) -> P.StatsResponse:
        return self.call("GET", "/v1/stats", None, P.StatsResponse)

    def config(self) -> dict[str, Any]:
        return self.get_json("/v1/config")

    def close(self) -> None:
        if self.local is not None:
            self.local.close()  # its last report first, outside the lock (its thread may hold it)
        with self._lock:
            self._close_conn()
            self._close_conn(framed=True)
            if self._arena is not None:
                self._arena.close()
                self._arena = None

    def __enter__(self) -> KvdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncKvdClient:
    """asyncio client over aiohttp's Unix connector; same routes and errors as ``KvdClient``."""

    def __init__(self, socket_path: str | Path | None = None, *, timeout_s: float = 5.0,
                 register_cuda: bool = True, populate_arena: bool = False) -> None:
        self.socket_path = str(socket_path or default_socket_path())
        self.timeout_s = timeout_s
        self.register_cuda = register_cuda
        self.populate_arena = populate_arena
        self._session = None
        self._models = _Registrations()
        self._arena: ArenaMapping | None = None

    async def _session_get(self):
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.socket_path))
        return self._session

    async def _request(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        import aiohttp

        session = await self._session_get()
        for attempt in (0, 1):
            try:
                async with session.request(method, "http://kvd" + path, data=body,
                                           headers={"Content-Type": "application/json"},
                                           timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    return resp.status, await resp.read()
            except TimeoutError as e:
                raise DaemonUnavailable(f"kvd at {self.socket_path} did not answer {path} within {timeout} s") from e
            except aiohttp.ClientError as e:
                if attempt == 1:
                    raise DaemonUnavailable(f"kvd at {self.socket_path} is unreachable ({e})") from e
        raise AssertionError("unreachable")

    async def call(self, method: str, path: str, req: BaseModel | None, resp_model: type[M], *,
                   timeout_s: float | None = None) -> M:
        body = req.model_dump_json().encode() if req is not None else None
        timeout = timeout_s or self.timeout_s
        status, raw = await self._request(method, path, body, timeout)
        fp = getattr(req, "fingerprint", None)
        if status == 404 and fp in self._models.by_fingerprint and b"not registered" in raw:
            reg = self._models.by_fingerprint[fp].model_dump_json().encode()
            if (await self._request("POST", "/v1/models", reg, timeout))[0] < 400:
                status, raw = await self._request(method, path, body, timeout)
        if status >= 400:
            raise_for(status, raw, path)
        return parse_answer(resp_model, raw, path)

    async def register_model(self, req: P.RegisterModelRequest) -> P.RegisterModelResponse:
        resp = await self.call("POST", "/v1/models", req, P.RegisterModelResponse)
        self._models.by_fingerprint[resp.fingerprint] = req.model_copy(update={"fingerprint": resp.fingerprint})
        self._map(resp.arena)
        return resp

    def _map(self, info: P.ArenaInfo) -> None:
        if self._arena is None or self._arena.arena_id != info.arena_id:
            if self._arena is not None:
                self._arena.close()
            self._arena = ArenaMapping(info, register_cuda=self.register_cuda, populate=self.populate_arena)

    async def arena(self, arena_id: str | None = None) -> ArenaMapping:
        """The mapped arena (zero-copy views); remapped if the daemon reports another ``arena_id``."""
        if self._arena is not None and arena_id in (None, self._arena.arena_id):
            return self._arena
        for req in self._models.by_fingerprint.values():
            self._map((await self.call("POST", "/v1/models", req, P.RegisterModelResponse)).arena)
            return _the_arena(self._arena, arena_id)
        raise DaemonUnavailable("no arena mapped yet: register a model first")

    async def health(self) -> P.HealthResponse:
        return await self.call("GET", "/v1/health", None, P.HealthResponse)

    async def lookup(self, req: P.LookupRequest) -> P.LookupResponse:
        return await self.call("POST", "/v1/lookup", req, P.LookupResponse)

    async def reserve(self, req: P.ReserveRequest) -> P.ReserveResponse:
        return await self.call("POST", "/v1/reserve", req, P.ReserveResponse)

    async def commit(self, req: P.CommitRequest) -> P.CommitResponse:
        return await self.call("POST", "/v1/commit", req, P.CommitResponse)

    async def lease(self, req: P.LeaseRequest) -> P.LeaseResponse:
        return await self.call("POST", "/v1/lease", req, P.LeaseResponse, timeout_s=self.timeout_s + lease_wait(req))

    async def release(self, req: P.ReleaseRequest) -> P.CountResponse:
        return await self.call("POST", "/v1/release", req, P.CountResponse)

    async def stats(self) -> P.StatsResponse:
        return await self.call("GET", "/v1/stats", None, P.StatsResponse)

    async def abort(self, req: P.AbortRequest) -> P.CountResponse:
        return await self.call("POST", "/v1/abort", req, P.CountResponse)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._arena is not None:
            self._arena.close()
            self._arena = None
