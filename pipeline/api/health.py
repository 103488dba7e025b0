"""``GET /healthz``: whether every part of the server works, and how each stands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from pipeline import __version__

#: What ``health`` returns: all parts fine, and each part's detail.
Health = Callable[[], tuple[bool, dict[str, Any]]]


def health_router(health: Health) -> APIRouter:
    """The health route over ``health`` (``pipeline.health.report`` in the server); needs no key."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz", responses={503: {"description": "a part of the server is down"}})
    def healthz(response: Response) -> dict[str, Any]:
        """Each part of the server: broker, control consumer, liveness scheduler, SFTP; 503 if one is down."""
        ok, parts = health()
        if not ok:
            response.status_code = 503
        return {"status": "ok" if ok else "degraded", "version": __version__, "parts": parts}

    return router
