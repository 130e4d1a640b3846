"""The HTTP API (aiohttp): submit jobs, read their state and events, operate the service."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from downloader import metrics
from downloader.config import Config
from downloader.errors import (
    Forbidden,
    JobNotFound,
    RateLimited,
    RequestRefused,
    StorageUnavailable,
    TooManyRequests,
    ValidationFailed,
)
from downloader.frontdoor import FrontDoor, cors_headers, origin_middleware
from downloader.heartbeat import new_instance_id, publish_stats
from downloader.ids import is_job_id, new_job_id
from downloader.log import get_logger
from downloader.models import parse_download_request
from downloader.redact import seal
from downloader.resilience import forever
from downloader.storage import Storage
from downloader.tenants import ANONYMOUS, Tenant, Tenants
from downloader.vocabulary import EventType

__all__ = ["FRONT_DOOR", "STORAGE", "build_app"]

log = get_logger(__name__)

STORAGE = web.AppKey("storage", Storage)
CONFIG = web.AppKey("config", Config)
ACCEPTED = web.AppKey("accepted", list[int])  # one cell: jobs this API instance accepted
TENANTS = web.AppKey("tenants", Tenants)
TENANT = web.RequestKey("tenant", Tenant)
FRONT_DOOR = web.AppKey("front_door", FrontDoor)

_MAX_FIELDS = {"maxWorkerPools", "maxWorkers"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS = frozenset({"/hb", "/"})
"""Answered without a token: the heartbeat, and the dashboard page (static HTML holding no data;
its script sends the `?token=` of the page's URL as a bearer token with every request)."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj) + "\n"  # a JSON answer ends with a newline, like any text a shell prints


json_response = functools.partial(web.json_response, dumps=_dumps)
"""`web.json_response` whose body ends with a newline; every JSON answer goes through it."""


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return json_response({"error": message, **extra}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is JSON that says what went wrong; no input makes a 5xx with a traceback."""
    try:
        return await handler(request)
    except RequestRefused as exc:
        resp = _error(exc.status, str(exc), field=exc.field)
        if isinstance(exc, TooManyRequests):
            resp.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        return resp
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].api.max_body_bytes
        return _error(413, f"the body is larger than {limit} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = _error(
            exc.status,
            exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason,
        )
        if "Allow" in exc.headers:  # a 405 must say which methods are allowed (RFC 9110)
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except StorageUnavailable as exc:
        log.warning("redis unavailable", path=request.path, error=str(exc))
        resp = _error(503, "storage is unavailable, retry shortly")
        resp.headers["Retry-After"] = "1"
        return resp
    except Exception:
        log.exception("unhandled error", path=request.path)
        return _error(500, "internal error")


def tenant_of(request: web.Request) -> Tenant:
    """Who is asking (set by the auth middleware: the anonymous admin when no token is set).
    Fails closed: a handler reached without the middleware's say gets no rights when tokens
    are required."""
    if TENANT in request:
        return request[TENANT]
    if request.app[TENANTS].required:
        raise Forbidden("no token was checked for this request")
    return ANONYMOUS


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve the bearer token to its tenant (401 without a valid one, when tokens are set),
    and take the request from the tenant's rate (429 over it)."""
    tenants = request.app[TENANTS]
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    tenant = tenants.authenticate(request.headers.get("Authorization"))
    if tenant is None:
        return _error(
            401,
            "a valid bearer token is required (Authorization: Bearer <token>)",
            field="Authorization",
        )
    if tenant.rate_per_second:
        wait_ms = await request.app[STORAGE].take_request(tenant.token_key, tenant.rate_per_second)
        if wait_ms:
            raise RateLimited(wait_ms, tenant.rate_per_second)
    request[TENANT] = tenant
    return await handler(request)


def _may_submit(tenant: Tenant) -> None:
    if not tenant.may_submit:
        raise Forbidden(f"this token ({tenant.name}, role {tenant.role}) may only read")


def _admin_only(tenant: Tenant) -> None:
    if not tenant.is_admin:
        raise Forbidden(f"this token ({tenant.name}) may not read service-wide figures")


async def post_download(request: web.Request) -> web.Response:
    raw = await request.app[FRONT_DOOR].read_body(request)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationFailed("body", f"the body is not valid JSON ({exc})") from None
    except RecursionError:
        raise ValidationFailed("body", "the body is nested too deeply") from None
    config = request.app[CONFIG]
    tenant = tenant_of(request)
    _may_submit(tenant)
    req = parse_download_request(body, config)
    if not tenant.owns(req.aggr_id):
        raise ValidationFailed(
            "aggr_id", f"aggr_id must start with {tenant.aggr_prefix!r} (this token's aggr_prefix)"
        )
    fields = req.job_fields(config.processor.max_retries, tenant.name)
    shown, sealed = seal(fields, config.security)
    key = _idempotency_key(request)
    if key and tenant.scope:  # one tenant's keys never meet another's, nor an admin's
        key = f"{tenant.scope} {key}"  # a key holds no space: no other key spells this
    fingerprint = (
        hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest() if key else ""
    )
    window_ms = int(config.api.idempotency_window_seconds * 1000)
    # One id per request: if redis-py resends the script after a lost reply, the second run
    # finds the job already there, which means this request was accepted.
    storage, tenants = request.app[STORAGE], request.app[TENANTS]
    scope = tenants.owner_of(req.aggr_id)
    # the cap is a tenant's (without tokens: the service's); the aggregations outside every
    # tenant's prefix, an admin's, are not a tenant's and have no registry of their own
    cap = config.api.max_aggregations_per_tenant if scope or not tenants.required else 0
    job_id, replayed = await storage.enqueue(
        new_job_id(await storage.shard_for(req.aggr_id)),
        shown,
        key,
        fingerprint,
        window_ms,
        proxy=fields["aggr_proxy"],
        sealed=sealed,
        scope=scope,
        max_aggregations=cap,
    )
    if replayed:
        return json_response({"id": job_id}, status=201, headers={"Idempotent-Replayed": "true"})
    metrics.JOBS_ACCEPTED.inc()
    request.app[ACCEPTED][0] += 1
    return json_response({"id": job_id}, status=201)


def _idempotency_key(request: web.Request) -> str:
    key = request.headers.get("Idempotency-Key", "")
    if len(key) > 255 or any(not (32 < ord(c) < 127) for c in key):
        raise ValidationFailed(
            "Idempotency-Key", "Idempotency-Key must be at most 255 printable ASCII characters"
        )
    return key


def _job_id(request: web.Request) -> str:
    """The job id of the path; an id that cannot exist is simply not found."""
    job_id = request.match_info["job_id"]
    if not is_job_id(job_id, request.app[STORAGE].shards):
        raise JobNotFound(job_id)
    return job_id


async def _visible_job_id(request: web.Request) -> str:
    """The job id of the path, if the job exists for the asking tenant (else JobNotFound)."""
    job_id = _job_id(request)
    tenant = tenant_of(request)
    if not tenant.is_admin and not tenant.sees(await request.app[STORAGE].tenant_of(job_id)):
        raise JobNotFound(job_id)
    return job_id


async def abort_job(request: web.Request) -> web.Response:
    """DELETE /jobs/{id}: cancel a pending or running download; a failure callback follows."""
    _may_submit(tenant_of(request))
    job_id = await _visible_job_id(request)
    event_id = await request.app[STORAGE].abort(job_id, "cancelled by request")
    return json_response({"id": job_id, "download_state": "Failed", "event_id": event_id})


async def heartbeat(request: web.Request) -> web.Response:
    """200 OK; 503 while the heartbeat file exists (drained) or Redis does not answer."""
    if await asyncio.to_thread(os.path.exists, request.app[CONFIG].api.heartbeat_path):
        return web.Response(status=503, text="disabled")
    try:
        async with asyncio.timeout(1):
            await request.app[STORAGE].ping()
    except (TimeoutError, StorageUnavailable):
        return web.Response(status=503, text="storage unavailable")
    return web.Response(text="OK")


async def retry_callback(request: web.Request) -> web.Response:
    _may_submit(tenant_of(request))
    job_id = await _visible_job_id(request)
    await request.app[STORAGE].requeue_callback(job_id)
    return json_response({"id": job_id, "callback_state": "Pending"}, status=201)


def _page(request: web.Request, most: int) -> tuple[int, int]:
    """`?limit=&offset=` of a listing: (limit, offset); limit at most `most` (the default)."""
    out = []
    for name, default in (("limit", most), ("offset", 0)):
        raw = request.query.get(name)
        if raw is None:
            out.append(default)
            continue
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
            raise ValidationFailed(name, f"{name} must be a whole number >= 0")
        out.append(int(raw))
    limit, offset = out
    if not 1 <= limit <= most:
        raise ValidationFailed("limit", f"limit must be between 1 and {most}")
    return limit, offset


async def aggregations(request: web.Request) -> web.Response:
    """The original's list (`[{"name": "jobs:<aggr_id>", "size": <waiting>}]`, most waiting
    first), bounded: at most api.aggregations_page_limit entries; `?limit=&offset=` page through
    the rest, `X-Total-Count` says how many there are and `Link` where the next page is. A
    tenant sees its own aggregations only."""
    storage = request.app[STORAGE]
    limit, offset = _page(request, request.app[CONFIG].api.aggregations_page_limit)
    scope = tenant_of(request).scope
    total = await storage.count_pending_aggregations(scope)
    # past the end, nothing to read (each shard would be asked for offset + limit entries)
    rows = await storage.pending_aggregations(limit, offset, scope) if offset < total else []
    resp = json_response([{"name": f"jobs:{name}", "size": size} for name, size, _s in rows])
    resp.headers["X-Total-Count"] = str(total)
    if offset + len(rows) < total:
        resp.headers["Link"] = (
            f'<{request.path}?limit={limit}&offset={offset + len(rows)}>; rel="next"'
        )
    return resp


async def aggregation_details(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    rows = await storage.pending_aggregations(limit=200, scope=tenant_of(request).scope)
    details = await storage.aggregation_details([(name, s) for name, _n, s in rows])
    for d, (_name, size, _s) in zip(details, rows, strict=True):
        d["pending"] = size
    return json_response(details)


def _sum_stats(rows: list[dict[str, str]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for row in rows:
        for k, v in row.items():
            n = int(v)
            total[k] = max(total.get(k, 0), n) if k in _MAX_FIELDS else total.get(k, 0) + n
    return total


async def processor_stats(request: web.Request) -> web.Response:
    _admin_only(tenant_of(request))
    rows = await request.app[STORAGE].read_stats("processor")
    base = dict.fromkeys(
        (
            "workerPools",
            "spawnedWorkerPools",
            "maxWorkerPools",
            "workers",
            "spawnedWorkers",
            "maxWorkers",
            "failures",
        ),
        0,
    )
    return json_response({**base, **_sum_stats(rows), "instances": len(rows)})


async def notifier_stats(request: web.Request) -> web.Response:
    _admin_only(tenant_of(request))
    rows = await request.app[STORAGE].read_stats("notifier")
    base = {"successfulCallbacks": 0, "failedCallbacks": 0}
    return json_response({**base, **_sum_stats(rows), "instances": len(rows)})


async def instances(request: web.Request) -> web.Response:
    _admin_only(tenant_of(request))
    return json_response(await request.app[STORAGE].live_instances())


async def get_job(request: web.Request) -> web.Response:
    job = await request.app[STORAGE].get_job(_job_id(request))
    if not tenant_of(request).sees(job.tenant):
        raise JobNotFound(job.id)
    return json_response(job.as_json())


async def get_events(request: web.Request) -> web.Response:
    job_id = _job_id(request)
    events = await request.app[STORAGE].get_events(job_id)
    # who submitted it is in its first event, job.accepted: no second read of the job
    if not tenant_of(request).sees(str(events[0].data().get("tenant", ""))):
        raise JobNotFound(job_id)
    return json_response({"events": [e.as_json() for e in events]})


async def recent_failures(request: web.Request) -> web.Response:
    """The latest failed downloads and callbacks (of the asking tenant's jobs), from the tail of
    the global event stream."""
    storage = request.app[STORAGE]
    tenant = tenant_of(request)
    rows = await storage.recent_events(
        (EventType.DOWNLOAD_FAILED, EventType.CALLBACK_FAILED), 20 if tenant.is_admin else 200
    )
    if not tenant.is_admin:
        owners = await storage.tenants_of([e.job_id for e in rows])
        rows = [e for e in rows if owners.get(e.job_id) == tenant.name][:20]
    return json_response([e.as_json() for e in rows])


async def prometheus(request: web.Request) -> web.Response:
    _admin_only(tenant_of(request))
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def dashboard(_request: web.Request) -> web.Response:
    page = (resources.files("downloader") / "static" / "dashboard.html").read_text()
    return web.Response(text=page, content_type="text/html")


async def _announce(app: web.Application) -> AsyncIterator[None]:
    """Publish this API instance (and what it accepted) like the other roles do."""
    storage, config = app[STORAGE], app[CONFIG]
    instance = new_instance_id()

    async def step() -> None:
        await publish_stats(
            storage,
            "api",
            instance,
            lambda: {"accepted": app[ACCEPTED][0]},
            config.processor.stats_interval,
        )

    stopping = False
    task = asyncio.create_task(forever("announce", step, lambda: stopping))
    yield
    stopping = True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_app(config: Config, storage: Storage, serve_files: bool = False) -> web.Application:
    """The aiohttp application; `storage` is owned (closed) by the caller."""
    door = FrontDoor(config.api)
    middlewares = [
        door.middleware,
        errors_middleware,
        origin_middleware(config.api.allowed_origins),
        auth_middleware,
    ]
    app = web.Application(client_max_size=config.api.max_body_bytes, middlewares=middlewares)
    if config.api.allowed_origins:
        app.on_response_prepare.append(cors_headers(config.api.allowed_origins))
    app[STORAGE] = storage
    app[CONFIG] = config
    app[TENANTS] = Tenants(config.api)
    app[ACCEPTED] = [0]
    app[FRONT_DOOR] = door
    app.cleanup_ctx.append(_announce)
    app.router.add_post("/download", post_download)
    app.router.add_get("/hb", heartbeat)
    app.router.add_post("/retry/{job_id}", retry_callback)
    app.router.add_get("/dashboard/aggregations", aggregations)
    app.router.add_get("/dashboard/aggregations/details", aggregation_details)
    app.router.add_get("/dashboard/instances", instances)
    app.router.add_get("/dashboard/failures", recent_failures)
    app.router.add_get("/stats/processor", processor_stats)
    app.router.add_get("/stats/notifier", notifier_stats)
    app.router.add_get("/jobs/{job_id}", get_job)
    app.router.add_delete("/jobs/{job_id}", abort_job)
    app.router.add_get("/jobs/{job_id}/events", get_events)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/", dashboard)
    if serve_files:
        root = Path(config.processor.files_root or config.processor.storage_dir)
        root.mkdir(parents=True, exist_ok=True)
        app.router.add_static("/files/", root, show_index=False, follow_symlinks=False)
    return app
