"""Routers per resource, combined into the ``/api/v1`` router.

Every module of this package defines ``router`` (an :class:`~fastapi.APIRouter`); a module that sets
``PUBLIC = True`` is served without the API token (only ``health``). Modules are found by name, so a
new resource is one new file.
"""

import importlib
import pkgutil

from fastapi import APIRouter, Depends

from collector.api.deps import require_token

api_router = APIRouter(prefix="/api/v1")

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    _public = getattr(_module, "PUBLIC", False)
    api_router.include_router(_module.router, dependencies=None if _public else [Depends(require_token)])
