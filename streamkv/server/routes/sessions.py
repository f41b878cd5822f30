"""The persistent session resource: POST/GET /v1/sessions, GET/DELETE /v1/sessions/{id}, its transcript
(/messages) and a debug view of its live stream (/state)."""
from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..deps import Manager, Owner, Rt
from ..errors import BadRequest
from ..schemas import SessionCreate, parse_body
from ..sessions import parse_policy
from .completions import count_tokens

log = logging.getLogger("streamkv.server")
router = APIRouter()


def session_object(meta: dict) -> dict:
    """The session resource as clients see it (owner and internals left out)."""
    return {"id": meta["id"], "object": "session", "created": meta["created"], "updated": meta["updated"],
            "model": meta["model"], "policy": {"name": meta["policy"]["name"], **meta["policy"]["params"]},
            "kind": meta["kind"], "tokens_seen": meta["tokens_seen"], "turns": meta["n_turns"],
            "disk_bytes": meta["snapshot_bytes"] + meta["log_bytes"], "metadata": meta["metadata"]}

@router.post("/v1/sessions")
async def create_session(request: Request, rt: Rt, owner: Owner, m: Manager):
    cfg = rt.cfg
    body = await request.body()
    req = parse_body(SessionCreate, body) if body.strip() else SessionCreate()
    policy = parse_policy(req.policy, m.default_policy)
    if req.system is not None and not req.system.strip():
        raise BadRequest("system is empty", param="system", code="invalid_value")
    if req.system:
        await count_tokens(rt, req.system, "system")
    size = len(json.dumps(req.metadata).encode())
    if size > cfg.max_metadata_bytes:
        raise BadRequest(f"metadata is {size} bytes as JSON; this server accepts at most {cfg.max_metadata_bytes}",
                         param="metadata", code="invalid_value")
    meta = await m.create(owner, policy, req.metadata, req.system)
    request.state.session_id = meta["id"]
    log.info("session created", extra={"session_id": meta["id"], "policy": meta["policy"]})
    return JSONResponse(session_object(meta), status_code=201)

@router.get("/v1/sessions")
async def list_sessions(owner: Owner, m: Manager, limit: int = 100):
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be between 1 and 1000", param="limit", code="invalid_value")
    rows = await m.run_io(m.store.list_sessions, owner, limit)
    return {"object": "list", "data": [session_object(r) for r in rows]}

@router.get("/v1/sessions/{sid}")
async def get_session(sid: str, owner: Owner, m: Manager):
    meta = await m.get_meta(sid, owner)
    obj = session_object(meta)
    entry = m.entries.get(sid)
    obj["resident"] = bool(entry and entry.resident)
    return obj

@router.get("/v1/sessions/{sid}/messages")
async def session_messages(sid: str, owner: Owner, m: Manager):
    await m.get_meta(sid, owner)
    turns = await m.run_io(m.store.turns, sid)
    return {"object": "list", "session_id": sid, "data": turns}

@router.get("/v1/sessions/{sid}/state")
async def session_state(sid: str, owner: Owner, m: Manager, logits: str = "none", top: int = 10):
    """Debug view of the live stream state: stats, a digest of the next-token logits and their top-k
    (or the full vector with logits=full). Loads the session if it is not resident."""
    if logits not in ("none", "full"):
        raise BadRequest("logits must be 'none' or 'full'", param="logits", code="invalid_value")
    if not 0 <= top <= 100:
        raise BadRequest("top must be between 0 and 100", param="top", code="invalid_value")
    lease = await m.acquire(sid, owner)
    try:
        s = lease.session

        def read():
            out = {"id": sid, "object": "session.state", "stats": s.stats(), "kind": s.kind,
                   "messages": len(s.messages), "snapshot_version": lease.entry.meta["version"],
                   "logits_sha256": s.logits_digest(), "top_logits": None}
            if s.logits is not None:
                values, idx = s.logits.float().topk(top)
                out["top_logits"] = [[int(i), float(v)] for i, v in zip(idx, values)]
                if logits == "full":
                    out["logits"] = s.logits.float().tolist()
            return out
        return await m.run_io(read)
    finally:
        lease.release()

@router.delete("/v1/sessions/{sid}")
async def delete_session(sid: str, owner: Owner, m: Manager):
    await m.delete(sid, owner)
    return {"id": sid, "object": "session.deleted", "deleted": True}

