"""Shared route dependencies as `Annotated` aliases: the runtime, the caller's owner id, an owned session."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from titans.session_store import SessionMeta, SessionNotFound, validate_session_id

from .context import set_session_id
from .runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_owner(request: Request) -> str:
    """Return the owner id that ApiKeyMiddleware derived from the caller's API key."""
    return request.state.owner


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
OwnerDep = Annotated[str, Depends(get_owner)]


async def load_owned_session(session_id: str, runtime: Runtime, owner: str) -> SessionMeta:
    """Return the session's metadata, or raise SessionNotFound when it belongs to another owner.

    Another owner's session gets the same 404 as a missing one, so its existence is not revealed.
    """
    validate_session_id(session_id)
    set_session_id(session_id)
    meta = await runtime.store.get(session_id)
    if meta.owner != owner:
        raise SessionNotFound(session_id)
    return meta


async def get_owned_session(session_id: Annotated[str, Path(description="session id")],
                            runtime: RuntimeDep, owner: OwnerDep) -> SessionMeta:
    return await load_owned_session(session_id, runtime, owner)


SessionDep = Annotated[SessionMeta, Depends(get_owned_session)]
