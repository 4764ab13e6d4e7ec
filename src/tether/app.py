"""ASGI app assembly: routes, error rendering, and the lifecycle's start and stop."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match

from tether import compact, routes
from tether.auth import AuthMiddleware, KeyRing
from tether.bodies import JSON
from tether.config import Settings
from tether.dispatch import Dispatch, LocalDispatch, RedisDispatch
from tether.engines import make_engine
from tether.errors import APIError, insufficient_storage, server_error
from tether.lifecycle import Lifecycle
from tether.logs import RequestId
from tether.runner import new_token
from tether.store import make_store
from tether.store.base import StoreFull, StoreUnavailable

log = logging.getLogger("tether")


def make_lifecycle(settings: Settings, worker_only: bool = False) -> Lifecycle:
    """The lifecycle of one process: its store, engine and dispatch from `settings`.
    Raises ValueError for settings that cannot work (a worker without a shared store)."""
    scaled = settings.db.startswith(("postgresql://", "postgres://"))
    if scaled != (settings.redis is not None):
        raise ValueError("scaling out needs both --db postgresql://... and --redis redis://...")
    if not scaled and (worker_only or settings.workers == 0):
        raise ValueError(
            "separate API and worker processes need a shared store: "
            "--db postgresql://... --redis redis://..."
        )
    engine = make_engine(
        settings.engine_kind(),
        scripted_rate=settings.scripted_rate,
        scripted_length=settings.scripted_length,
        upstreams=settings.all_upstreams(),
    )
    owner = new_token()
    dispatch: Dispatch = LocalDispatch()
    if settings.redis is not None:
        dispatch = RedisDispatch(settings.redis, settings.redis_prefix, consumer=owner)
    store = make_store(
        settings.db,
        settings.redis,
        settings.redis_prefix,
        settings.log_cache_bytes,
        read_url=settings.db_read,
    )
    return Lifecycle(store, engine, settings, dispatch, settings.workers, owner=owner)


def create_app(
    settings: Settings | None = None, worker_only: bool = False, keyring: KeyRing | None = None
) -> Starlette:
    """The ASGI app. `worker_only`: a `tether worker`, which serves only /health (and
    the debug routes) next to its runs. `keyring`: the API keys (default: `settings`')."""
    settings = settings or Settings()
    lifecycle = make_lifecycle(settings, worker_only)
    compact.configure(settings.db)  # the install's key for compaction tokens
    if keyring is None:
        keyring = KeyRing(
            None if settings.keys_file is None else Path(settings.keys_file), settings.api_keys
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await lifecycle.start()
        # What startup made (modules, schemas, the engine) lives as long as the process:
        # frozen, a full collection never walks it again (each walk of those ~170,000
        # objects stalled the event loop ~100 ms). Not collected first: that would cost
        # every start as much, for a little startup garbage.
        gc.freeze()
        try:
            yield
        finally:
            await lifecycle.stop()

    served = routes.worker_routes if worker_only else routes.routes
    app = Starlette(
        routes=served + (routes.debug_routes if settings.debug_routes else []),
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            StoreUnavailable: _unavailable,
            StoreFull: _full,
            ClientDisconnect: _client_gone,
            Exception: _unexpected,
        },
        lifespan=lifespan,
        middleware=[Middleware(RequestId), Middleware(AuthMiddleware, keyring=keyring)],
    )
    app.state.lifecycle = lifecycle
    app.state.keyring = keyring
    return app


def _render(error: APIError) -> Response:
    return JSON(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return _render(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
        headers = {"allow": ", ".join(_allowed_methods(request))}
        return _render(APIError(405, message, headers=headers))
    else:
        message = str(exc.detail)
    return _render(APIError(exc.status_code, message, headers=dict(exc.headers or {})))


def _allowed_methods(request: Request) -> list[str]:
    """Methods of every route on this path (one path can have a route per method)."""
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


async def _unavailable(request: Request, exc: Exception) -> Response:
    log.warning("store unavailable on %s %s: %s", request.method, request.url.path, exc)
    return _render(
        APIError(
            503,
            "The service is temporarily unavailable; retry shortly.",
            code="service_unavailable",
            type="server_error",
            headers={"retry-after": "1", "x-should-retry": "true"},
        )
    )


async def _full(request: Request, exc: Exception) -> Response:
    log.warning("store full on %s %s: %s", request.method, request.url.path, exc)
    return _render(insufficient_storage())


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up while sending its body: an ordinary event, not a server error
    (nobody reads this reply; the access line records it)."""
    log.info(
        "client disconnected during the request body on %s %s", request.method, request.url.path
    )
    return _render(
        APIError(
            400,
            "The client disconnected before sending the whole body.",
            code="client_disconnected",
        )
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _render(server_error())
