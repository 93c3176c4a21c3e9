"""The FastAPI app: middleware, routers and a lifespan that runs the engine.

Startup loads the checkpoint, opens the session store and starts the engine. Shutdown
(after uvicorn has stopped accepting connections and waited for running responses) stops
the engine, which gives running requests the grace period and commits their states,
then closes the store.
"""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from titans import __version__

from .errors import install_error_handlers
from .metrics import Metrics
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from .routes import generate, memory, openai, ops, sessions
from .runtime import start_runtime
from .settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """Inference server for Titans MAC language models. Each session keeps its own
neural long-term memory in the session store; generation streams over Server-Sent Events.
Errors have one shape: `{"error": {"message", "type", "param", "code"}}`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for `settings` (by default read from `TITANS_*` environment variables)."""
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await start_runtime(settings, metrics)
        app.state.runtime = runtime
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="Titans MAC inference server", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan,
                  # A JSON body without a Content-Type header is still parsed as JSON.
                  strict_content_type=False)
    install_error_handlers(app)

    # Added innermost first: RequestContextMiddleware wraps everything, so 401s, 413s, CORS
    # rejections and unhandled errors get a request id, an access log line and a count.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       max_state_upload_bytes=settings.max_state_upload_bytes)
    app.add_middleware(ApiKeyMiddleware, api_keys=settings.api_keys)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id", "Retry-After"])
    routes: list = []
    app.add_middleware(RequestContextMiddleware, metrics=metrics, routes=routes)

    for router in (sessions.router, generate.router, memory.router, openai.router, ops.router):
        app.include_router(router)
        routes.extend(router.routes)
    # The OpenAPI and docs routes that FastAPI adds itself.
    routes.extend(route for route in app.router.routes if isinstance(getattr(route, "path", None), str))
    return app


def create_app_from_environment() -> FastAPI:
    """App factory for uvicorn workers, which receive the settings as `TITANS_*` variables."""
    from .context import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
