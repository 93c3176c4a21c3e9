"""Sessions: create, list, inspect, delete and fork. Each session belongs to the API key that created it."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Body

from titans.session_store import SessionMeta

from ..context import set_session_id
from ..deps import OwnerDep, RuntimeDep, SessionDep
from ..runtime import Runtime
from ..schemas.native import SessionCreate, SessionDeleted, SessionFork, SessionInfo, SessionList

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


def session_info(meta: SessionMeta, runtime: Runtime) -> SessionInfo:
    model = runtime.model_name if meta.fingerprint == runtime.checkpoint.fingerprint else "unknown"
    return SessionInfo(id=meta.id, model=model, model_fingerprint=meta.fingerprint, created_at=meta.created_at,
                       updated_at=meta.updated_at, tokens=meta.tokens, state_bytes=meta.state_bytes,
                       version=meta.version, metadata=dict(meta.metadata))


@router.post("", status_code=201, response_model=SessionInfo, summary="Create a session with a fresh memory")
async def create_session(runtime: RuntimeDep, owner: OwnerDep,
                         body: Annotated[SessionCreate | None, Body()] = None) -> SessionInfo:
    body = body or SessionCreate()
    if body.id is not None:
        set_session_id(body.id)
    meta = await runtime.store.create(owner=owner, fingerprint=runtime.checkpoint.fingerprint,
                                      session_id=body.id, metadata=body.metadata)
    set_session_id(meta.id)
    log.info("created session %s", meta.id)
    return session_info(meta, runtime)


@router.get("", response_model=SessionList, summary="List the caller's sessions, oldest first")
async def list_sessions(runtime: RuntimeDep, owner: OwnerDep) -> SessionList:
    metas = await runtime.store.list(owner)
    return SessionList(data=[session_info(meta, runtime) for meta in metas])


@router.get("/{session_id}", response_model=SessionInfo, summary="Get a session's tokens, state size and times")
async def get_session(session: SessionDep, runtime: RuntimeDep) -> SessionInfo:
    return session_info(session, runtime)


@router.delete("/{session_id}", response_model=SessionDeleted, summary="Delete a session and its memory")
async def delete_session(session: SessionDep, runtime: RuntimeDep) -> SessionDeleted:
    # Deleting takes the session's lease, so a delete during a running request gets 409
    # instead of removing the session before that request commits.
    async with runtime.engine.exclusive(session.id):
        await runtime.store.delete(session.id)
    log.info("deleted session %s", session.id)
    return SessionDeleted(id=session.id)


@router.post("/{session_id}/fork", status_code=201, response_model=SessionInfo,
             summary="Create a new session with a copy of this session's memory")
async def fork_session(session: SessionDep, runtime: RuntimeDep, owner: OwnerDep,
                       body: Annotated[SessionFork | None, Body()] = None) -> SessionInfo:
    """Copy the last committed state. A request running on the source meanwhile is not included."""
    body = body or SessionFork()
    meta, state = await runtime.store.load(session.id)
    metadata = body.metadata if body.metadata is not None else dict(meta.metadata)
    forked = await runtime.store.create(owner=owner, fingerprint=meta.fingerprint, session_id=body.id,
                                        state=state, tokens=meta.tokens, metadata=metadata)
    log.info("forked session %s into %s (%d tokens)", session.id, forked.id, forked.tokens)
    return session_info(forked, runtime)
