"""Session memory: reset, export and import of the state file.

The state file is the model core's format: a safetensors file with the memory weights,
the current segment's buffers and the token counters, tied to the model's fingerprint.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..deps import RuntimeDep, SessionDep
from ..errors import APIError
from ..schemas.native import SessionInfo
from .sessions import session_info

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/sessions", tags=["memory"])

STATE_MEDIA_TYPE = "application/octet-stream"


@router.post("/{session_id}/memory/reset", response_model=SessionInfo,
             summary="Reset the session's memory to the fresh state")
async def reset_memory(session: SessionDep, runtime: RuntimeDep) -> SessionInfo:
    async with runtime.engine.exclusive(session.id):
        meta = await runtime.store.reset(session.id)
    log.info("reset the memory of session %s (it had %d tokens)", session.id, session.tokens)
    return session_info(meta, runtime)


@router.get("/{session_id}/memory", response_class=Response,
            responses={200: {"content": {STATE_MEDIA_TYPE: {}}, "description": "the state file"}},
            summary="Export the session's memory as a state file")
async def export_memory(session: SessionDep, runtime: RuntimeDep) -> Response:
    """Return the last committed state. A request running meanwhile is not included."""
    meta, state = await runtime.store.load(session.id)
    if state is None:
        state = await runtime.engine.fresh_state_bytes()
    headers = {
        "Content-Disposition": f'attachment; filename="{meta.id}.safetensors"',
        "X-Session-Tokens": str(meta.tokens),
        "X-Session-Version": str(meta.version),
    }
    return Response(state, media_type=STATE_MEDIA_TYPE, headers=headers)


@router.put("/{session_id}/memory", response_model=SessionInfo,
            openapi_extra={"requestBody": {"required": True, "content": {STATE_MEDIA_TYPE: {
                "schema": {"type": "string", "format": "binary"}}}}},
            summary="Import a state file into the session, replacing its memory")
async def import_memory(session: SessionDep, request: Request, runtime: RuntimeDep) -> SessionInfo:
    """Validate the whole file for the loaded model before storing it, so a rejected file leaves the old state."""
    data = await request.body()
    if not data:
        raise APIError(400, "the request body must be a state file, got an empty body", code="invalid_state")
    tokens = await runtime.engine.validate_state(data)
    async with runtime.engine.exclusive(session.id):
        current = await runtime.store.get(session.id)
        meta = await runtime.store.commit(session.id, state=data, tokens=tokens, base_version=current.version)
    log.info("imported a state of %d bytes (%d tokens) into session %s", len(data), tokens, session.id)
    return session_info(meta, runtime)
