"""GET /v1/models, /v1/models/{id} and /health."""
from __future__ import annotations

import os
import time

import psutil
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import Owner, Rt
from ..errors import NotFound

router = APIRouter()


def model_card(rt) -> dict:
    return {"id": rt.cfg.model_name, "object": "model", "created": int(rt.started), "owned_by": "streamkv"}


@router.get("/health")
@router.get("/healthz")
async def health(rt: Rt):
    """No auth: status, budgets, resident sessions, RSS and counters."""
    m, cfg = rt.manager, rt.cfg
    if m is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    return {
        "status": "draining" if m.closing else "ok",
        "model": cfg.model_name,
        "uptime_s": round(time.time() - rt.started, 1),
        "resident_sessions": m.resident_count(),
        "resident_bytes_estimate": m.resident_bytes(),
        "reserved_bytes": m.reserved_bytes(),  # + what running prefill forwards and snapshot writes may take
        "max_resident_sessions": cfg.max_resident,
        "max_cache_bytes": cfg.max_cache_bytes,
        "max_session_bytes": cfg.max_session_bytes,
        "rss_bytes": psutil.Process(os.getpid()).memory_info().rss,
        "counters": m.stats,
    }


@router.get("/v1/models")
async def list_models(rt: Rt, owner: Owner):
    return {"object": "list", "data": [model_card(rt)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, rt: Rt, owner: Owner):
    if model_id != rt.cfg.model_name:
        raise NotFound(f"the model {model_id!r} does not exist; this server serves {rt.cfg.model_name!r}",
                       param="model", code="model_not_found")
    return model_card(rt)
