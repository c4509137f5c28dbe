"""Routers per resource, combined into the ``/api/v1`` router."""

from fastapi import APIRouter, Depends

from collector.api.deps import require_token
from collector.api.routes import devices, health, inferences, quarantine

api_router = APIRouter(prefix="/api/v1")
api_router.include_router(health.router)
protected = [Depends(require_token)]
api_router.include_router(devices.router, dependencies=protected)
api_router.include_router(inferences.router, dependencies=protected)
api_router.include_router(quarantine.router, dependencies=protected)
