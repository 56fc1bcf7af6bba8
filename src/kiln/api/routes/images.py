"""The OpenAI-compatible Images API: generations, edits, and Kiln's image lookup.

A request becomes a job (`jobs.create_job`: limits, idempotency, quota, atomically), is handed to the
runner, waited for, and answered in OpenAI's shape. Routes never run a pipeline themselves.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from kiln.api.deps import CurrentAccount, State
from kiln.api.headers import degraded_header
from kiln.api.schemas import (
    IMAGE_ERRORS, EditRequest, GenerationRequest, ImageId, ImageInfo, ImagesResponse, error_responses,
)
from kiln.api.state import AppState
from kiln.errors import GenerationFailed, InvalidRequest, JobCancelled, KilnError, Overloaded
from kiln.service import content_credentials, jobs, provenance
from kiln.service import image_requests as ir
from kiln.service.accounts import Account
from kiln.service.admission import admit_job, usage_headers
from kiln.service.job_events import JobOutcome

router = APIRouter(prefix="/v1", tags=["images"])
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
SYNC_WAIT_S = 600.0
_MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_STORED_IMAGE_ERRORS = error_responses(400, 401, 404, 410, 429, 503)
"""A stored image's routes: also 410 `image_gone` when the image store lost its file."""


def _spec(state: AppState, body: GenerationRequest | EditRequest, kind: str, task: str) -> jobs.JobSpec:
    info = state.registry.info(body.model)  # ModelNotFound → 404 model_not_found
    if body.background == "transparent" and body.output_format == "jpeg":
        raise InvalidRequest("A transparent background needs output_format png or webp.", param="background")
    width, height = ir.resolve_size(body.size, info)
    ir.check_task(task, info)
    params: dict[str, Any] = {
        "task": task,
        "output_format": body.output_format or "png",
        "output_compression": body.output_compression,
        "quality": ir.quality_name(body.quality),
        "user": body.user,
        "background": body.background,
        "moderation": body.moderation,
    }
    if getattr(body, "strength", None) is not None:
        params["strength"] = body.strength
    loras = ir.resolve_loras(body.loras, info)
    if loras:
        params["loras"] = loras
    return jobs.JobSpec(
        kind=kind, model=info.name, prompt=body.prompt, n=body.n or 1, width=width, height=height,
        steps=ir.steps_for(body.quality, info), guidance_scale=info.guidance_scale,
        seed=ir.pick_seed(body.seed), params=params,
    )


def partial_every(steps: int, partial_images: int | None) -> int:
    """Preview interval that yields `partial_images` previews spread over the steps (0: none)."""
    if not partial_images:
        return 0
    return max(1, math.ceil(steps / (partial_images + 1)))


async def _admit_and_wait(
    state: AppState,
    request: Request,
    response: Response,
    account: Account,
    spec: jobs.JobSpec,
    body: GenerationRequest | EditRequest,
    idempotency_key: str | None,
    digest: str,
    uploads: dict[str, bytes] | None = None,
) -> ImagesResponse | StreamingResponse | Response:
    """A synchronous generation is a job the request waits on (or, with `stream`, follows)."""
    if body.stream:
        spec.params["preview_every"] = partial_every(spec.steps, body.partial_images)
    admission = await admit_job(state, account, spec, idempotency_key=idempotency_key, digest=digest,
                                uploads=uploads, needs_scheduler=True)
    job = admission.job
    kind = "image_edit" if uploads is not None else "image_generation"
    if body.stream:
        headers = {**(await usage_headers(state, account))[1], **degraded_header(job.degraded)}
        return EventSourceResponse(_stream(state, request, account, job, body, kind),
                                   headers={**headers, "Cache-Control": "no-cache"})
    outcome = await _wait_unless_abandoned(state, request, job.id)
    if outcome is None:  # the client went away: its job must not take GPU time
        await _abandon(state, job.id)
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    if not outcome.finished:
        await _abandon(state, job.id)
        raise Overloaded("The image took too long to generate; your quota was refunded.", retry_after_s=30)
    if outcome.status != "succeeded":
        raise _failure(outcome.status, outcome.error_code)
    response.headers.update((await usage_headers(state, account))[1])
    response.headers.update(degraded_header(job.degraded))
    return await _result(state, request, account, job, body, outcome.image_ids)


async def _wait_unless_abandoned(state: AppState, request: Request, job_id: str) -> JobOutcome | None:
    """The job's outcome, or None as soon as the client disconnects (uvicorn then sends
    `http.disconnect` on the request's receive channel; the body was read already)."""
    outcome = asyncio.ensure_future(state.runner.wait(job_id, SYNC_WAIT_S))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({outcome, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if outcome.done():
        return outcome.result()
    outcome.cancel()
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _abandon(state: AppState, job_id: str) -> None:
    """Cancel and refund a job nobody waits for any more (and stop it between steps)."""
    view = await asyncio.to_thread(jobs.cancel_job, state.db, job_id, None)
    state.refusals.ended(view.user_id, view.id, view.charge_state, view.charge_units)
    await state.runner.cancel(job_id)


def _failure(status: str, code: str | None) -> KilnError:
    """Why a job did not succeed: cancelled (by its owner, or it is an earlier request's with this
    Idempotency-Key whose client went away) is a 409, not the server's failure; failed is a 500."""
    if status == "cancelled":
        return JobCancelled("The image generation was cancelled; your quota was refunded.")
    return GenerationFailed(f"The image generation failed ({code or status}); your quota was refunded.")


async def _result(
    state: AppState, request: Request, account: Account, job: jobs.JobView,
    body: GenerationRequest | EditRequest, image_ids: tuple[str, ...],
) -> ImagesResponse:
    response_format = "b64_json" if body.stream else body.response_format or "b64_json"
    base = state.settings.public_base_url or str(request.base_url).rstrip("/")
    data = []
    for image_id in image_ids:
        item: dict[str, Any] = {"id": image_id}
        if response_format == "url":
            item["url"] = f"{base.rstrip('/')}/v1/images/{image_id}/content"
        else:
            image = await asyncio.to_thread(jobs.get_image, state.db, image_id, account.user_id)
            content = await asyncio.to_thread(state.store.read, image.path)
            item["b64_json"] = base64.b64encode(content).decode()
        data.append(item)
    inputs = len((job.params.get("inputs") or {}).keys() - {"mask"})
    return ImagesResponse(
        id=job.id,
        created=int(job.created_at.timestamp()),
        data=data,
        output_format=job.params.get("output_format", "png"),
        quality=job.params.get("quality", "high"),
        size=f"{job.width}x{job.height}",
        usage=ir.token_usage(job.prompt, job.n, job.width, job.height, inputs),
        degraded=job.degraded,
    )


def _sse(name: str, data: dict[str, Any]) -> bytes:
    """One event in FastAPI's own SSE framing (this route answers JSON or a stream, so it cannot be
    a generator path operation; the framing is the same)."""
    return format_sse_event(data_str=json.dumps(data), event=name)


async def _stream(
    state: AppState, request: Request, account: Account, job: jobs.JobView,
    body: GenerationRequest | EditRequest, kind: str,
) -> AsyncIterator[bytes]:
    """OpenAI's streaming shape: up to `partial_images` `<kind>.partial_image` events from the step
    previews, then one `<kind>.completed` per image once stored (or an `error` event)."""
    common = {"created_at": int(job.created_at.timestamp()), "background": "opaque",
              "output_format": job.params.get("output_format", "png"),
              "quality": job.params.get("quality", "high"), "size": f"{job.width}x{job.height}"}
    partials = 0
    finished = False
    try:
        async for event in state.runner.events(job.id):
            finished = event.terminal
            preview = event.data.get("preview") if event.name == "progress" else None
            if preview and partials < (body.partial_images or 0):
                yield _sse(f"{kind}.partial_image", {"type": f"{kind}.partial_image", "job_id": job.id,
                                                     "b64_json": preview, "partial_image_index": partials,
                                                     **common, "output_format": "png"})
                partials += 1
    finally:
        if not finished:  # the client went away mid-stream (Starlette cancels this generator)
            await asyncio.shield(_abandon(state, job.id))
    view = await asyncio.to_thread(jobs.get_job, state.db, job.id)
    if view.status != "succeeded":
        error = _failure(view.status, view.error_code)
        yield _sse("error", {"type": "error", "error": {"message": error.message, "type": error.error_type,
                                                        "code": error.code, "param": None}})
        return
    result = await _result(state, request, account, job, body, view.image_ids)
    for item in result.data:
        yield _sse(f"{kind}.completed", {"type": f"{kind}.completed", "id": item.id, "job_id": result.id,
                                         "b64_json": item.b64_json, **common,
                                         "usage": result.usage.model_dump()})


_STREAM = {200: {"content": {"text/event-stream": {}},
                 "description": "The images, or with `stream: true` server-sent events."}}


@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
             responses={**_STREAM, **IMAGE_ERRORS})
async def create_image(
    body: GenerationRequest,
    request: Request,
    response: Response,
    state: State,
    account: CurrentAccount,
    idempotency_key: IdempotencyKey = None,
) -> ImagesResponse | StreamingResponse:
    """Generate images from a prompt (OpenAI's `images.generate`)."""
    spec = _spec(state, body, "generate", "generate")
    digest = jobs.request_hash({"endpoint": "generations", **body.model_dump(exclude_none=True)})
    return await _admit_and_wait(state, request, response, account, spec, body, idempotency_key, digest)


def _edit_schema() -> dict[str, Any]:
    """The multipart body as the route reads it: files, then EditRequest's fields as form fields, which
    are present or absent, never null; `loras` travels as a JSON string."""
    schema = EditRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # LoraChoice is among the components already (GenerationRequest's)
    binary = {"type": "string", "format": "binary"}
    fields = {name: _not_null(prop) for name, prop in schema["properties"].items()}
    schema["properties"] = {
        "image": {"type": "array", "items": binary, "minItems": 1, "maxItems": 16,
                  "description": "PNG, JPEG or WEBP files (one part each, `image` or `image[]`); the "
                                 "first one is edited."},
        "mask": {**binary, "description": "PNG the size of the image; transparent = edit here."},
        **fields,
    }
    schema["required"] = ["image", *schema.get("required", [])]
    content = {"schema": schema, "encoding": {"loras": {"contentType": "application/json"}}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": content}}}


def _not_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A form field's schema without pydantic's `null` branch (a form cannot send a null)."""
    branches = [b for b in prop.get("anyOf", ()) if b.get("type") != "null"]
    if "anyOf" not in prop or not branches:
        return prop
    rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
    return {**rest, **branches[0]} if len(branches) == 1 else {**rest, "anyOf": branches}


async def _read_form(request: Request) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = {}
    async with request.form(max_files=32, max_fields=64) as form:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.setdefault(name.removesuffix("[]"), []).append(await value.read())
            else:
                fields[name] = value
    return fields, files


@router.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
             responses={**_STREAM, **IMAGE_ERRORS}, openapi_extra=_edit_schema())
async def edit_image(
    request: Request,
    response: Response,
    state: State,
    account: CurrentAccount,
    idempotency_key: IdempotencyKey = None,
) -> ImagesResponse | StreamingResponse:
    """Edit an image (img2img), or repaint the masked part of it (inpainting): OpenAI's `images.edit`."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest("Send the edit as multipart/form-data with an 'image' file.", param="image")
    fields, files = await _read_form(request)
    try:
        body = EditRequest.from_form(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    unknown = set(files) - {"image", "mask"}
    if unknown:
        raise InvalidRequest(f"Unknown file field '{sorted(unknown)[0]}'.", param=sorted(unknown)[0])
    if not files.get("image"):
        raise InvalidRequest("An 'image' file is required (image URLs are not fetched).", param="image")
    if len(files["image"]) > 16 or len(files.get("mask", [])) > 1:
        raise InvalidRequest("At most 16 images and one mask.", param="image")
    mask = files.get("mask", [None])[0]
    uploads = await asyncio.to_thread(
        ir.edit_inputs, files["image"][0], mask, state.settings.max_image_pixels
    )
    spec = _spec(state, body, "edit", "inpaint" if mask is not None else "edit")
    digest = jobs.request_hash({"endpoint": "edits", **body.model_dump(exclude_none=True)}, uploads)
    return await _admit_and_wait(
        state, request, response, account, spec, body, idempotency_key, digest, uploads
    )


@router.get("/images/{image_id}", response_model=ImageInfo, responses=_STORED_IMAGE_ERRORS)
async def get_image(image_id: ImageId, request: Request, state: State, account: CurrentAccount) -> ImageInfo:
    """An image's metadata and the provenance read back from the file itself (owner only)."""
    image = await asyncio.to_thread(jobs.get_image, state.db, image_id, account.user_id)
    job = await asyncio.to_thread(jobs.get_job, state.db, image.job_id, account.user_id)
    content = await asyncio.to_thread(state.store.read, image.path)
    base = state.settings.public_base_url or str(request.base_url).rstrip("/")
    return ImageInfo(
        id=image.id, job_id=image.job_id, created=int(image.created_at.timestamp()), model=job.model,
        width=image.width, height=image.height, format=image.format, seed=image.seed,
        size_bytes=image.size_bytes, url=f"{base.rstrip('/')}/v1/images/{image.id}/content",
        provenance=provenance.read(content) or {},
        content_credentials=await asyncio.to_thread(content_credentials.read, content, image.format),
    )


@router.get("/images/{image_id}/content", response_class=FileResponse, responses={
    200: {"content": {m: {} for m in _MEDIA.values()}, "description": "The image file."},
    307: {"description": "A presigned URL of the image file (when `image_redirect_s` is set)."},
    **_STORED_IMAGE_ERRORS})
async def get_image_content(image_id: ImageId, state: State, account: CurrentAccount) -> Response:
    """The stored image file (what `response_format=url` points at; needs the owner's key), from
    whichever store holds it: a local file, a stream from the bucket, or (`image_redirect_s`) a
    redirect to a presigned URL. A file the store lost is 410 `image_gone`."""
    image = await asyncio.to_thread(jobs.get_image, state.db, image_id, account.user_id)
    media_type = _MEDIA.get(image.format, "application/octet-stream")
    store = state.store
    if state.settings.image_redirect_s and (
            url := await store.signed_url(image.path, state.settings.image_redirect_s)) is not None:
        return RedirectResponse(url, status_code=307)
    path = await asyncio.to_thread(store.local_path, image.path)  # ImageGone when it is not there
    if path is not None:
        return FileResponse(path, media_type=media_type)
    stored = await store.open(image.path)
    return StreamingResponse(stored.chunks, media_type=media_type,
                             headers={"Content-Length": str(stored.size)})
