"""``/api/v1/models``: push, list and show model versions, their stages, cards and bundle downloads.

A push is the bundle ``.tar`` as the raw request body (``Content-Type: application/x-tar``), streamed to
a temporary file and refused with 413 as soon as it passes ``registry_max_upload_bytes``; then the
registry validates, re-signs and stores it (:mod:`collector.registry.service`). Refusals are
``{"detail": {"reason": ..., "message": ...}}`` with a stable reason and are counted in
``fleet_registry_push_rejections_total``.

Downloads are served by Starlette's ``FileResponse`` (Starlette 1.x): ``Accept-Ranges: bytes``, one range
as ``206 Partial Content`` with ``Content-Range``, several as ``multipart/byteranges``, a range past the
end as ``416`` with ``Content-Range: bytes */SIZE``, ``If-Range`` against the ETag, and the file sent in
64 KiB chunks from disk. The ETag is the quoted SHA-256 of the bundle, so a client resuming a download
can be sure it resumes the same bytes; a version never changes, so the response may be cached forever.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from collector import metrics
from collector.api.deps import UNPROCESSABLE, CursorQuery, LimitQuery, RegistryDep, refused
from collector.api.schemas import Page
from collector.db.models import NAME_LEN, ModelVersion
from collector.queries import BadCursor
from collector.registry.card import card_summary
from collector.registry.errors import RegistryError
from collector.registry.service import STAGES, bundle_path

log = logging.getLogger(__name__)

router = APIRouter(prefix="/models", tags=["models"])

Stage = Literal["candidate", "production", "archived"]


class Lineage(BaseModel):
    """Where a version came from (from its manifest) and who pushed it."""

    dataset_version: str | None
    dataset_sha256: str | None
    code_version: str | None
    parent_version: str | None
    metrics: dict[str, float]
    created_at: float = Field(description="the manifest's created_at")
    pushed_at: float
    pushed_by: str
    uploader_key_id: str = Field(description="key that signed the pushed bundle")
    release_key_id: str = Field(description="release key the stored bundle is signed with")


class ModelVersionPublic(BaseModel):
    """A model version in the registry."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    stage: Stage
    stage_changed_at: float
    sha256: str = Field(description="of the stored bundle .tar (re-signed): the ETag of its download")
    size: int
    model_sha256: str
    manifest_sha256: str
    lineage: Lineage
    description: str
    labels: list[str]
    features: list[str]
    calibration: dict[str, Any]
    compatibility: dict[str, Any]
    download: str = Field(description="path of the bundle download (HTTP Range supported)")
    card_markdown: str
    card_html: str


class PushOut(ModelVersionPublic):
    """A push's answer: the stored version, and whether this push created it (201) or it was there (200)."""

    created: bool


class StageChangePublic(BaseModel):
    """One stage transition."""

    from_stage: str | None
    to_stage: str
    at: float
    by: str
    note: str | None


class PinPublic(BaseModel):
    """A pin naming a version."""

    model_config = ConfigDict(protected_namespaces=())

    scope: Literal["device", "group"]
    subject: str
    model_name: str
    model_version: str
    pinned_at: float
    pinned_by: str
    note: str | None


class ModelVersionDetail(ModelVersionPublic):
    """A version with its stage history and what deploys it."""

    history: list[StageChangePublic]
    pins: list[PinPublic]
    rollouts: dict[str, int] = Field(description="rollout id -> devices it assigns this version to")


class StageIn(BaseModel):
    """A stage change."""

    model_config = ConfigDict(extra="forbid")

    stage: Stage
    by: str = Field("api", min_length=1, max_length=NAME_LEN)
    note: str | None = Field(None, max_length=4000)


class KeyPublic(BaseModel):
    """A public key: its id and its ``ed25519:<base64>`` line (what a device pins)."""

    key_id: str
    public_key: str


class KeysOut(BaseModel):
    """The release key in use, the release keys published for devices to pin, and the accepted push signers."""

    release_key_id: str | None
    published: list[KeyPublic]
    upload: list[KeyPublic]


def public(v: ModelVersion) -> dict[str, Any]:
    """The API document of a version row."""
    base = bundle_path(v.name, v.version)
    return {
        "name": v.name,
        "version": v.version,
        "stage": v.stage,
        "stage_changed_at": v.stage_changed_at,
        "sha256": v.sha256,
        "size": v.size,
        "model_sha256": v.model_sha256,
        "manifest_sha256": v.manifest_sha256,
        "lineage": {
            "dataset_version": v.dataset_version,
            "dataset_sha256": v.dataset_sha256,
            "code_version": v.code_version,
            "parent_version": v.parent_version,
            "metrics": v.metrics,
            "created_at": v.created_at,
            "pushed_at": v.pushed_at,
            "pushed_by": v.pushed_by,
            "uploader_key_id": v.uploader_key_id,
            "release_key_id": v.release_key_id,
        },
        **card_summary(v.manifest),
        "download": base,
        "card_markdown": base.removesuffix("/bundle") + "/card.md",
        "card_html": base.removesuffix("/bundle") + "/card.html",
    }


def _refuse_early(registry: Any, reason: str, message: str, code: int) -> HTTPException:
    registry.reject(reason, message)
    return HTTPException(code, {"reason": reason, "message": message})


@router.post(
    "",
    response_model=PushOut,
    status_code=201,
    responses={200: {"description": "the same bundle was already stored"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def push_model(
    request: Request,
    response: Response,
    registry: RegistryDep,
    by: Annotated[str, Query(min_length=1, max_length=NAME_LEN, description="who pushes (recorded)")] = "api",
) -> PushOut:
    """Push a bundle .tar: validated fully, re-signed with the release key, stored by its SHA-256."""
    limit = registry.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _refuse_early(registry, "too_large", f"body of {int(declared)} bytes is over the {limit}-byte limit", 413)
    path = registry.scratch()
    size = 0
    try:
        with path.open("wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _refuse_early(registry, "too_large", f"body is over the {limit}-byte limit", 413)
                fh.write(chunk)
    except ClientDisconnect:
        path.unlink(missing_ok=True)
        registry.reject("incomplete", f"the client went away after {size} bytes")
        raise HTTPException(400, {"reason": "incomplete", "message": "upload interrupted"}) from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    try:
        result = await run_in_threadpool(registry.push, path=path, by=by)
    except RegistryError as exc:
        raise refused(exc) from None
    response.status_code = 201 if result.created else 200
    return PushOut.model_validate({**public(result.version), "created": result.created})


@router.get("", response_model=Page[ModelVersionPublic])
def list_models(
    registry: RegistryDep,
    name: str | None = None,
    stage: Annotated[Stage | None, Query()] = None,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> Page[ModelVersionPublic]:
    """Versions by model name, then push order."""
    try:
        rows, total, nxt = registry.list_versions(limit=limit, cursor=cursor, name=name, stage=stage)
    except BadCursor as exc:
        raise HTTPException(UNPROCESSABLE, str(exc)) from None
    return Page[ModelVersionPublic](
        items=[ModelVersionPublic.model_validate(public(r)) for r in rows], total=total, next=nxt
    )


@router.get("/keys", response_model=KeysOut)
def release_keys(registry: RegistryDep) -> KeysOut:
    """The release keys devices should pin (several during a rotation) and the signers a push accepts."""
    keys = registry.keys
    return KeysOut(
        release_key_id=keys.signing_id,
        published=[KeyPublic(key_id=k.key_id, public_key=k.to_text()) for k in keys.published],
        upload=[KeyPublic(key_id=k.key_id, public_key=k.to_text()) for k in keys.upload],
    )


@router.get("/{name}/{version}", response_model=ModelVersionDetail)
def show_model(name: str, version: str, registry: RegistryDep) -> ModelVersionDetail:
    """One version with its lineage, stage history, pins and rollouts."""
    try:
        v = registry.get(name=name, version=version)
    except RegistryError as exc:
        raise refused(exc) from None
    pins, rollouts = registry.references(name=name, version=version)
    return ModelVersionDetail.model_validate(
        {
            **public(v),
            "history": [
                StageChangePublic.model_validate(h, from_attributes=True)
                for h in registry.history(name=name, version=version)
            ],
            "pins": [PinPublic.model_validate(p, from_attributes=True) for p in pins],
            "rollouts": rollouts,
        }
    )


@router.api_route(
    "/{name}/{version}/bundle",
    methods=["GET", "HEAD"],
    response_class=FileResponse,
    responses={
        200: {"content": {"application/x-tar": {}}, "description": "the whole bundle"},
        206: {"description": "the requested range"},
        416: {"description": "the range lies outside the bundle"},
    },
)
def download_bundle(name: str, version: str, request: Request, registry: RegistryDep) -> FileResponse:
    """The stored (re-signed) bundle .tar; honours Range and If-Range (ETag = its SHA-256)."""
    try:
        v, path = registry.bundle_file(name=name, version=version)
    except RegistryError as exc:
        raise refused(exc) from None
    metrics.REGISTRY_DOWNLOADS.labels("range" if request.headers.get("range") else "full").inc()
    return FileResponse(
        path,
        media_type="application/x-tar",
        filename=f"{name}-{version}.tar",
        headers={
            "ETag": f'"{v.sha256}"',
            "X-Content-SHA256": v.sha256,
            "Cache-Control": "public, max-age=31536000, immutable",
        },
    )


def _card(registry: Any, name: str, version: str, fmt: str) -> str:
    try:
        text: str = registry.card(name=name, version=version, fmt=fmt)
    except RegistryError as exc:
        raise refused(exc) from None
    return text


@router.get("/{name}/{version}/card.md", response_class=PlainTextResponse)
def card_markdown(name: str, version: str, registry: RegistryDep) -> PlainTextResponse:
    """The model card as Markdown."""
    return PlainTextResponse(_card(registry, name, version, "markdown"), media_type="text/markdown; charset=utf-8")


@router.get("/{name}/{version}/card.html", response_class=PlainTextResponse)
def card_html(name: str, version: str, registry: RegistryDep) -> PlainTextResponse:
    """The model card as an HTML page."""
    return PlainTextResponse(_card(registry, name, version, "html"), media_type="text/html; charset=utf-8")


@router.post("/{name}/{version}/stage", response_model=ModelVersionPublic)
def set_stage(name: str, version: str, body: StageIn, registry: RegistryDep) -> ModelVersionPublic:
    """Move a version to another stage (candidate, production, archived); desired states follow at once."""
    try:
        v = registry.set_stage(name=name, version=version, stage=body.stage, by=body.by, note=body.note)
    except RegistryError as exc:
        raise refused(exc) from None
    return ModelVersionPublic.model_validate(public(v))


assert set(STAGES) == {"candidate", "production", "archived"}
