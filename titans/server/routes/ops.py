"""Tokenizer utilities and operations: tokenize, detokenize, liveness, readiness, metrics."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from titans.session_store import StoreUnavailable

from ..deps import RuntimeDep
from ..errors import APIError, invalid_parameter
from ..generation import THREADED_ENCODE_CHARS
from ..schemas.native import DetokenizeBody, DetokenizeResult, TokenizeBody, TokenizeResult

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])


@router.post("/v1/tokenize", response_model=TokenizeResult, summary="Split text into token ids")
async def tokenize(body: TokenizeBody, runtime: RuntimeDep) -> TokenizeResult:
    if len(body.text) > THREADED_ENCODE_CHARS:
        tokens = await asyncio.to_thread(runtime.tokenizer.encode, body.text)
    else:
        tokens = runtime.tokenizer.encode(body.text)
    return TokenizeResult(tokens=tokens, count=len(tokens))


@router.post("/v1/detokenize", response_model=DetokenizeResult, summary="Turn token ids into text")
async def detokenize(body: DetokenizeBody, runtime: RuntimeDep) -> DetokenizeResult:
    vocab_size = runtime.tokenizer.vocab_size
    for index, token in enumerate(body.tokens):
        if not 0 <= token < vocab_size:
            raise invalid_parameter(f"tokens.{index}", f"token id must be in 0..{vocab_size - 1}, got {token}")
    return DetokenizeResult(text=runtime.tokenizer.decode(body.tokens))


@router.get("/healthz", summary="Liveness: the process serves HTTP")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: model loaded, session store reachable, engine running",
            responses={503: {"description": "not ready; the error message names the failing checks"}})
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    checks = {"model": "ok", "store": "ok", "engine": "ok"}
    try:
        await asyncio.wait_for(runtime.store.ping(), runtime.settings.store_timeout_seconds)
    except (StoreUnavailable, asyncio.TimeoutError) as exc:
        checks["store"] = f"unavailable: {exc}"
    if not runtime.engine.running:
        checks["engine"] = "not running (starting up or shutting down)"
    failed = {name: state for name, state in checks.items() if state != "ok"}
    if failed:
        detail = "; ".join(f"{name} {state}" for name, state in failed.items())
        log.warning("not ready: %s", detail)
        error = APIError(503, f"not ready: {detail}", code="not_ready")
        return JSONResponse(error.body(), status_code=503)
    return JSONResponse({"status": "ready", "checks": checks, "model": runtime.model_name})


@router.get("/metrics", response_class=Response, summary="Prometheus metrics in the text format")
async def metrics(runtime: RuntimeDep) -> Response:
    runtime.observer.update_gauges()
    body, content_type = runtime.metrics.exposition()
    return Response(body, media_type=content_type)
