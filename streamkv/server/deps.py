"""What the routers get injected (FastAPI dependencies), instead of closing over `create_app`'s locals:
the runtime (config, model, tokenizer, session manager), the caller's identity (auth), the manager.

    @router.get("/v1/sessions")
    async def list_sessions(owner: Owner, m: Manager, limit: int = 100): ...
"""
from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from .config import ServerConfig
from .errors import Unauthorized, Unavailable
from .sessions import SessionManager


def key_owner(key: str) -> str:
    """A session's owner is the SHA-256 of the API key that created it (the key itself is never stored)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Runtime:
    cfg: ServerConfig
    model: Any
    tokenizer: Any
    started: float
    keys: dict[str, str] = field(default_factory=dict)  # owner hash -> key
    manager: SessionManager | None = None  # set by the lifespan once the pools and store are up
    loop: asyncio.AbstractEventLoop | None = None


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_manager(request: Request) -> SessionManager:
    m = get_runtime(request).manager
    if m is None:
        raise Unavailable("the server is starting")
    return m


def get_owner(request: Request) -> str:
    """The caller's identity: the hash of its API key ('' when the server requires none)."""
    keys = get_runtime(request).keys
    if not keys:
        return ""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        owner = key_owner(token)
        if owner in keys and secrets.compare_digest(keys[owner], token):
            return owner
    raise Unauthorized("invalid or missing API key (send Authorization: Bearer <key>)")


Rt = Annotated[Runtime, Depends(get_runtime)]
Manager = Annotated[SessionManager, Depends(get_manager)]
Owner = Annotated[str, Depends(get_owner)]
