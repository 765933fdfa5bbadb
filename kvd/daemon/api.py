"""Control and admin HTTP routes. Thin: parse into a protocol model, call one store method, answer.

Errors map to statuses in one middleware: a ``KvdError`` answers with its status and a JSON
``{"error": code, "message": ...}``; a body that is not valid JSON or does not fit the route's model is
a 400 naming the field; anything else is a 500, logged with its traceback, and the daemon keeps serving.

The peer's credentials (``SO_PEERCRED`` on the Unix socket) say who calls (``kvd.daemon.tenants``):
its process owns its leases and reservations (taken back as soon as it dies; no other process may end
them), and, with tenants configured, every namespace a request names must be its tenant's, and admin
routes need an admin. Bodies are bounded in size and in time (``daemon.body_timeout_s``), must not be
compressed (a gzip bomb inflates on the loop), and large ones are parsed off the event loop. Error
answers echo at most ``ERROR_ECHO_CHARS`` of what was wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler
from pydantic import BaseModel, ValidationError

from kvd import __version__
from kvd.core import lookup_wire
from kvd.core import protocol as P
from kvd.core.errors import (
    Forbidden,
    InvalidRequest,
    KvdError,
    RequestTimeout,
    RequestTooLarge,
    ShuttingDown,
    UnsupportedMediaType,
)
from kvd.core.protocol_lookup import LookupReport
from kvd.daemon import audit
from kvd.daemon.metrics import Metrics
from kvd.daemon.tenants import Caller, Tenants, peer_credentials
from kvd.store import reporting
from kvd.store.store import Store

logger = logging.getLogger(__name__)

STORE: web.AppKey[Store] = web.AppKey("store", Store)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
STATE: web.AppKey[dict] = web.AppKey("state", dict)  # {"shutting_down": bool, "config": dict}
TENANTS: web.AppKey[Tenants] = web.AppKey("tenants", Tenants)
SCRAPES_ONLY: web.AppKey[bool] = web.AppKey("scrapes_only", bool)  # set on the metrics port's app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=model.model_dump_json(), status=status, content_type="application/json")


ERROR_ECHO_CHARS = 1000  # an error answer never echoes a huge bad value back in full
OFF_LOOP_BODY_BYTES = 1 << 20  # bodies larger than this are parsed on a worker thread


def error_json(code: str, message: str) -> bytes:
    """The error body of both transports (HTTP, ``kvd.daemon.frames``), echoing at most ERROR_ECHO_CHARS."""
    if len(message) > ERROR_ECHO_CHARS:
        message = message[:ERROR_ECHO_CHARS] + f"... ({len(message) - ERROR_ECHO_CHARS} more characters)"
    return P.ErrorBody(error=code, message=message).model_dump_json().encode()


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(body=error_json(code, message), status=status, content_type="application/json")


def failure(e: BaseException, what: str, metrics: Metrics) -> tuple[int, str, str]:
    """``(status, code, message)`` of a request that raised ``e``: the one error mapping of both
    transports (HTTP and ``kvd.daemon.frames``). ``what`` names the request in the log of a 500."""
    if isinstance(e, KvdError):
        return e.status, e.code, str(e)
    if isinstance(e, ValidationError):
        return 400, "invalid_request", P.describe_validation_error(e)
    if isinstance(e, web.HTTPRequestEntityTooLarge):  # aiohttp's body limit: the code and words of frames' 413
        return e.status, RequestTooLarge.code, f"{(e.text or '').rstrip('.')} (daemon.max_request_bytes); send less per request"
    if isinstance(e, web.HTTPException):
        return e.status, "http", e.reason or str(e)
    logger.error("unhandled error in %s", what, exc_info=e)
    metrics.errors.labels("internal").inc()
    return 500, "internal", "internal error in kvd; see the daemon log"


def observe(metrics: Metrics, method: str, route: str, status: int, elapsed: float) -> None:
    """A control-API request's latency and status, whichever transport carried it."""
    metrics.route_latency.labels(route).observe(elapsed)
    metrics.requests.labels(route, str(status)).inc()
    logger.debug("%s %s -> %d in %.2f ms", method, route, status, elapsed * 1e3)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    t0 = time.perf_counter()
    try:
        if request.app[STATE]["shutting_down"] and request.method == "POST" and route != "/v1/release":
            raise ShuttingDown("kvd is shutting down; retry against the restarted daemon")
        resp = await handler(request)
    except Exception as e:  # noqa: BLE001 - the boundary: answer, keep serving
        resp = _error(*failure(e, f"{request.method} {request.path}", metrics))
    # Nothing the metrics port answers is a control-API request: its scrapes and probes, nor a 404 for
    # a stray GET / there (it counted as "unmatched" 404s, an error share no engine request had).
    if not request.app.get(SCRAPES_ONLY, False):
        observe(metrics, request.method, route, resp.status, time.perf_counter() - t0)
    return resp


async def _body(request: web.Request, model: type[BaseModel]) -> BaseModel:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r} is not accepted; send the JSON body as it is")
    settings = request.app[STATE]["settings"]
    try:
        async with asyncio.timeout(settings.daemon.body_timeout_s):  # wait_for can swallow a cancel (3.11)
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {settings.daemon.body_timeout_s} s "
                             "(daemon.body_timeout_s)") from None
    if not raw:
        raise InvalidRequest(f"empty body; {request.path} takes a JSON object ({model.__name__})")
    try:
        if len(raw) > OFF_LOOP_BODY_BYTES:  # a large body would hold the loop for the others
            return await asyncio.get_running_loop().run_in_executor(None, model.model_validate_json, raw)
        return model.model_validate_json(raw)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise InvalidRequest(f"body is not valid JSON: {e.errors()[0]['msg']}") from None
        raise


def caller(request: web.Request) -> Caller:
    """Who is calling: the Unix-socket peer's pid/uid/gid, its tenant, whether it is an admin. A
    request whose client hung up before this is asked (while its large body was parsed off the loop)
    is refused: its credentials are gone, and a caller without any is trusted (the tests' TCP)."""
    if request.transport is None:
        raise Forbidden("the client closed its connection before its request was served; nothing was done")
    pid, uid, gid = peer_credentials(request.transport.get_extra_info("socket"))
    return request.app[TENANTS].caller(pid or None, uid, gid)


def _allowed(request: web.Request, namespace: str | None) -> Caller:
    c = caller(request)
    request.app[TENANTS].check_namespace(c, namespace)
    return c


def _admin(request: web.Request, what: str) -> Caller:
    c = caller(request)
    request.app[TENANTS].check_admin(c, what)
    return c


# ---- routes -------------------------------------------------------------------------------------

routes = web.RouteTableDef()


@routes.get("/v1/health")
async def health(request: web.Request) -> web.Response:
    store = request.app[STORE]
    status = "shutting_down" if request.app[STATE]["shutting_down"] else "ok"
    return _json(P.HealthResponse(status=status, version=__version__, api=P.API_VERSION,
                                  uptime_s=store.clock() - store.started_at, arena_id=store.host.arena_id))


@routes.get("/v1/config")
async def config(request: web.Request) -> web.Response:
    _admin(request, "the configuration")
    return web.json_response(request.app[STATE]["config"])


@routes.post("/v1/models")
async def register_model(request: web.Request) -> web.Response:
    req = await _body(request, P.RegisterModelRequest)
    c, tenants = caller(request), request.app[TENANTS]
    return _json(request.app[STORE].register_model(req, partition=tenants.partition_for(c), tenant=c.tenant,
                                                   may_remap=c.is_admin or not tenants.enabled))


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    c, tenants = caller(request), request.app[TENANTS]  # a tenant counts only its own namespaces' entries
    mine = None if c.is_admin else (lambda ns: tenants.partition_of(ns) == c.tenant)
    return _json(reporting.models_info(request.app[STORE], counted=mine))


async def compact_lookup(app: web.Application, c: Caller, raw: bytes) -> bytes:
    """The answer to a lookup in the compact encoding (``kvd.core.lookup_wire``), from its body: the
    binary decode (which names a bad field), the caller's namespace check, the store's lookup. Both
    transports answer it with this: HTTP (``Content-Type: application/x-kvd-lookup``) and frames."""
    if not raw:
        raise InvalidRequest(f"empty body; /v1/lookup takes a compact lookup ({lookup_wire.CONTENT_TYPE})")
    if len(raw) > OFF_LOOP_BODY_BYTES:  # as in _body: a large body would hold the loop for the others
        req = await asyncio.get_running_loop().run_in_executor(None, lookup_wire.decode_lookup, raw)
    else:
        req = lookup_wire.decode_lookup(raw)
    app[TENANTS].check_namespace(c, req.namespace)
    return lookup_wire.encode_answer(await app[STORE].lookup(req))


async def _compact_lookup_body(request: web.Request) -> bytes:
    """A compact lookup's body, under the body rules of ``_body`` (no Content-Encoding, the timeout)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r} is not accepted; send the body as it is")
    timeout = request.app[STATE]["settings"].daemon.body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout} s (daemon.body_timeout_s)") from None


@routes.post("/v1/lookup")
async def lookup(request: web.Request) -> web.Response:
    if request.content_type == lookup_wire.CONTENT_TYPE:  # the hot path's binary form: answered in kind
        answer = await compact_lookup(request.app, caller(request), await _compact_lookup_body(request))
        return web.Response(body=answer, content_type=lookup_wire.CONTENT_TYPE)
    req = await _body(request, P.LookupRequest)
    _allowed(request, req.namespace)
    return web.Response(body=(await request.app[STORE].lookup(req)).to_json(), content_type="application/json")


@routes.post("/v1/lookup/report")
async def lookup_report(request: web.Request) -> web.Response:
    """What lookups answered from the shared index found (``kvd.core.protocol_lookup``)."""
    req = await _body(request, LookupReport)
    for it in req.items:
        _allowed(request, it.namespace)
    return _json(P.CountResponse(count=request.app[STORE].apply_report(req)))


@routes.post("/v1/reserve")
async def reserve(request: web.Request) -> web.Response:
    req = await _body(request, P.ReserveRequest)
    return _json(await request.app[STORE].reserve(req, _allowed(request, req.namespace).pid))


@routes.post("/v1/commit")
async def commit(request: web.Request) -> web.Response:
    req = await _body(request, P.CommitRequest)
    return _json(await request.app[STORE].commit(req, caller(request).pid))


@routes.post("/v1/abort")
async def abort(request: web.Request) -> web.Response:
    req = await _body(request, P.AbortRequest)
    return _json(request.app[STORE].abort(req, caller(request).pid))


@routes.post("/v1/lease")
async def lease(request: web.Request) -> web.Response:
    req = await _body(request, P.LeaseRequest)
    return _json(await request.app[STORE].lease(req, _allowed(request, req.namespace).pid))


@routes.post("/v1/release")
async def release(request: web.Request) -> web.Response:
    req = await _body(request, P.ReleaseRequest)
    return _json(request.app[STORE].release(req, caller(request).pid))


@routes.post("/v1/renew")
async def renew(request: web.Request) -> web.Response:
    req = await _body(request, P.RenewRequest)
    return _json(request.app[STORE].renew(req, caller(request).pid))


@routes.post("/v1/delete")
async def delete(request: web.Request) -> web.Response:
    req = await _body(request, P.EntriesRequest)
    _allowed(request, req.namespace)
    r = request.app[STORE].delete(req)
    await request.app[STORE].pipeline.drain()  # records gone from disk first: a kill -9 would bring them back
    audit.admin_action(request, f"delete {len(req.hashes)} entries ({audit.scope(req.namespace, req.fingerprint)})",
                       f"{r.count} deleted")
    return _json(r)


@routes.post("/v1/pin")
async def pin(request: web.Request) -> web.Response:
    req = await _body(request, P.EntriesRequest)
    _allowed(request, req.namespace)
    r = request.app[STORE].set_pinned(req, True)
    audit.admin_action(request, f"pin {len(req.hashes)} entries ({audit.scope(req.namespace, req.fingerprint)})",
                       f"{r.count} pinned")
    return _json(r)


@routes.post("/v1/unpin")
async def unpin(request: web.Request) -> web.Response:
    req = await _body(request, P.EntriesRequest)
    _allowed(request, req.namespace)
    r = request.app[STORE].set_pinned(req, False)
    audit.admin_action(request, f"unpin {len(req.hashes)} entries ({audit.scope(req.namespace, req.fingerprint)})",
                       f"{r.count} unpinned")
    return _json(r)


@routes.get("/v1/entries")
async def entries(request: web.Request) -> web.Response:
    q = request.query
    try:
        limit = int(q.get("limit", "1000"))
    except ValueError:
        raise InvalidRequest(f"limit={q.get('limit')!r} is not an integer") from None
    if not 0 < limit <= 1_000_000:
        raise InvalidRequest(f"limit={limit} must be between 1 and 1000000")
    tier = q.get("tier")
    if tier is not None and tier not in ("gpu", "host", "ssd", "remote"):
        raise InvalidRequest(f"tier={tier!r} unknown; use gpu, host, ssd or remote")
    _allowed(request, q.get("namespace"))  # a tenant lists its own namespaces only, one at a time
    return _json(reporting.list_entries(request.app[STORE], fingerprint=q.get("model"),
                                        namespace=q.get("namespace"), tier=tier, limit=limit))


@routes.post("/v1/evict")
async def evict(request: web.Request) -> web.Response:
    req = await _body(request, P.EvictRequest)
    _admin(request, "evict")
    r = await request.app[STORE].evict(req)
    limit = f", at most {req.max_bytes} bytes" if req.max_bytes is not None else ""
    audit.admin_action(request, f"evict{' (dry run)' if req.dry_run else ''} from {req.tier} "
                       f"({audit.scope(req.namespace, req.fingerprint)}{limit})", f"{r.count} entries, {r.nbytes} bytes")
    return _json(r)


@routes.post("/v1/flush")
async def flush(request: web.Request) -> web.Response:
    req = await _body(request, P.FlushRequest)
    _admin(request, "flush")
    r = await request.app[STORE].flush(req)
    n = f"{len(req.hashes)} entries" if req.hashes is not None else "host entries"
    audit.admin_action(request, f"flush {n} to ssd ({audit.scope(req.namespace, req.fingerprint)})",
                       f"{r.count} flushed")
    return _json(r)


@routes.post("/v1/compact")
async def compact(request: web.Request) -> web.Response:
    _admin(request, "compact")
    r = await request.app[STORE].compact()
    audit.admin_action(request, "compact ssd", f"{r.count} bytes reclaimed")
    return _json(r)


@routes.get("/v1/stats")
async def stats(request: web.Request) -> web.Response:
    _admin(request, "stats of every tenant")
    return _json(reporting.stats(request.app[STORE]))


# ---- metrics app (TCP) --------------------------------------------------------------------------


async def metrics_handler(request: web.Request) -> web.StreamResponse:
    """prometheus_client's own exposition: the text format or OpenMetrics by the Accept header,
    gzip when asked (Accept-Encoding), ``?name[]=`` to restrict. Control routes get their series
    before their first request."""
    metrics = request.app[METRICS]
    metrics.init_routes(route.path for route in routes)
    return await make_aiohttp_handler(metrics.served)(request)


async def healthz(request: web.Request) -> web.Response:
    if request.app[STATE]["shutting_down"]:
        return web.Response(status=503, text="shutting down\n")
    return web.Response(text="ok\n")


def control_routes() -> web.RouteTableDef:
    return routes


def metrics_routes() -> list[web.RouteDef]:
    return [web.get("/metrics", metrics_handler), web.get("/healthz", healthz)]


SECRETS = ("password",)


def config_view(settings) -> dict:
    """The running configuration for ``kvctl config show``, secrets replaced by ``"***"``."""
    doc = json.loads(settings.model_dump_json())
    for key in SECRETS:
        if doc.get("remote", {}).get(key):
            doc["remote"][key] = "***"
    return doc
