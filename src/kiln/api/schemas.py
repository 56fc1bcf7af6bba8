"""Request and response bodies of the Images API, shaped as OpenAI's; unknown fields are refused, and
JSON numbers and booleans are taken as their own type only (`false` is no number, `"2"` no integer;
the fields say `strict=True`): a multipart edit's fields, which are all text, are read leniently
instead (`EditRequest.from_form`)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kiln.service.image_requests import MAX_LORA_SCALE, MAX_LORAS, MAX_SEED


NO_NUL = r"^[^\x00]*$"
"""Text that can be stored: PostgreSQL's text and JSON refuse the NUL character."""
OBJECT_ID = r"^[A-Za-z0-9_-]+$"
"""The shape of every Kiln id and key (`job_…`, `img_…`, `kiln-…`): anything else is a 400, not a lookup."""


JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=OBJECT_ID,
                            description="A job's id, `job_…`.")]
ImageId = Annotated[str, Path(min_length=1, max_length=64, pattern=OBJECT_ID,
                              description="An image's id, `img_…`.")]
KeyPrefix = Annotated[str, Path(min_length=8, max_length=255, pattern=OBJECT_ID,
                                description="At least 8 characters of the key: its prefix, or all of it.")]



_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAME = rf"(?:{_LABEL}\.)*[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
WEBHOOK_URL_PATTERN = rf"^https?://(?:{_NAME}|{_OCTET}(?:\.{_OCTET}){{3}})(?::{_PORT})?(?:[/?][!-~]*)?$"
"""An http(s) URL with a host name or IPv4 address, an optional port and path, and no credentials.
Whether its address may be reached (no private or loopback ones unless the operator allows them) is
checked when it is submitted and again when each delivery is sent."""

class LoraChoice(BaseModel):
    """One LoRA adapter the operator registered for the model, and how strongly to apply it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, strict=True)
    """Multiplies the adapter's weights: 0 is the base model, 1 the adapter as trained."""


_TRANSPARENT_JPEG = {"required": ["background", "output_format"],
                     "properties": {"background": {"const": "transparent"},
                                    "output_format": {"const": "jpeg"}}}


class _ImageOptions(BaseModel):
    # A transparent JPEG is refused (400, `background`) when the request is turned into a job.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"not": _TRANSPARENT_JPEG})

    prompt: str = Field(min_length=1, max_length=32000, pattern=NO_NUL)
    """What to draw."""
    model: str | None = None
    """A loaded model's name or an alias (gpt-image-1, dall-e-3, dall-e-2 → the default model)."""
    n: int | None = Field(1, ge=1, le=10, strict=True)
    """Images to generate; your plan's max_n caps it."""
    size: str | None = "auto"
    """1024x1024, 1536x1024, 1024x1536, 256x256, 512x512, the model's native square, the extra sizes its
    operator allowed, or auto (native). A size the model cannot draw is a 400 naming the model."""
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = "auto"
    """Denoising steps as a share of the model's default: low ¼, medium ½, high/auto all of them."""
    output_format: Literal["png", "jpeg", "webp"] | None = "png"
    output_compression: int | None = Field(None, ge=0, le=100, strict=True)
    """JPEG/WebP quality, 0–100 (ignored for PNG)."""
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    user: str | None = Field(None, max_length=256, pattern=NO_NUL)
    """An end-user id of yours, stored with the job."""
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True)
    """Kiln's extra: images i of n use seed + i, so a request can be repeated exactly."""
    background: Literal["transparent", "opaque", "auto"] | None = None
    """Accepted as OpenAI does; Kiln's models draw opaque images."""
    moderation: Literal["low", "auto"] | None = None
    """Accepted as OpenAI does; Kiln's blocklist applies either way."""
    stream: bool | None = Field(None, strict=True)
    """Answer as server-sent events in OpenAI's shape: `image_generation.partial_image` previews
    (`image_edit.*` for edits), then one `…completed` per image once it is stored."""
    partial_images: int | None = Field(None, ge=0, le=3, strict=True)
    """With `stream`: how many previews to send while the image is drawn (0–3)."""
    safety_identifier: str | None = Field(None, max_length=256, pattern=NO_NUL)
    loras: list[LoraChoice] | None = Field(None, max_length=MAX_LORAS)
    """Kiln's extra: LoRA adapters of the model to apply, e.g. `[{"name": "watercolor", "scale": 0.8}]`
    (in a multipart edit, the same list as a JSON string). Unknown names are refused (400)."""

    @field_validator("n", "output_compression", "seed", "partial_images", mode="before")
    @classmethod
    def _integral(cls, value: Any) -> Any:
        """An integer as JSON Schema has it: 2 or 2.0 (which a strict int refuses), never
        `true` or "2" (which its lax int takes), except in a form, read leniently."""
        return int(value) if isinstance(value, float) and value.is_integer() else value

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_form(cls, value: Any) -> Any:
        if isinstance(value, str):  # a multipart field carries the list as JSON
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("loras must be a JSON list of {name, scale}") from None
        return value


class GenerationRequest(_ImageOptions):
    """POST /v1/images/generations (JSON)."""

    style: Literal["vivid", "natural"] | None = None
    """DALL·E 3's style, accepted and ignored."""


class EditRequest(_ImageOptions):
    """POST /v1/images/edits (multipart): these fields plus `image` (or `image[]`) and `mask` files."""

    input_fidelity: Literal["high", "low"] | None = None
    strength: float | None = Field(None, gt=0.0, le=1.0, strict=True)
    """Kiln's extra: how far an unmasked edit may move from the input image (default 0.75)."""

    @classmethod
    def from_form(cls, fields: dict[str, str]) -> EditRequest:
        """The edit's text fields: numbers and booleans arrive as text in a form, so read leniently."""
        return cls.model_validate(fields, strict=False)


WebhookEvent = Literal["started", "progress", "completed", "failed", "cancelled"]


class WebhookOptions(BaseModel):
    """Kiln's extra on POST /v1/jobs: signed deliveries of the job's events (Standard Webhooks)."""

    webhook_url: str | None = Field(None, min_length=1, max_length=2048, pattern=WEBHOOK_URL_PATTERN)
    """An http(s) URL to POST the job's events to, signed with your secret (GET /v1/webhooks/secret)."""
    webhook_events: list[WebhookEvent] | None = Field(None, min_length=1, max_length=5)
    """Which events to send (default: started, completed, failed, cancelled; progress at most every
    500 ms when asked for)."""


_EVENTS_NEED_A_URL = {
    "if": {"required": ["webhook_events"], "properties": {"webhook_events": {"type": "array"}}},
    "then": {"required": ["webhook_url"], "properties": {"webhook_url": {"type": "string"}}},
}
"""`webhook_events` (not null) needs a `webhook_url`: without one it is a 400 naming it."""


class JobRequest(GenerationRequest, WebhookOptions):
    """POST /v1/jobs (JSON): a generation, or with `image_id` an edit of one of your own images."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"not": _TRANSPARENT_JPEG, **_EVENTS_NEED_A_URL})

    image_id: str | None = Field(None, max_length=64, pattern=OBJECT_ID)
    """Kiln's extra: edit this image of yours (img2img) instead of drawing from nothing."""
    strength: float | None = Field(None, gt=0.0, le=1.0, strict=True)
    """With `image_id`: how far the edit may move from the image (default 0.75)."""
    # Follow-ups (prompt composer)
    compose_prompt: bool | None = None
    """With `image_id`: `prompt` is a follow-up ("make it green") and the image's own prompt is
    rewritten with it (the default). Without: for the models that follow the embedded model's
    grammar, what the prompt leaves unsaid (colour, size, place, background) is filled in, the user's
    words kept as `instruction`. False draws `prompt` exactly as given."""


class ImageData(BaseModel):
    id: str
    """Kiln's image id (GET /v1/images/{id})."""
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class TokenDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class TokenUsage(BaseModel):
    input_tokens: int
    input_tokens_details: TokenDetails
    output_tokens: int
    total_tokens: int


class ImagesResponse(BaseModel):
    id: str
    """Kiln's job id (GET /v1/jobs/{id})."""
    created: int
    data: list[ImageData]
    background: Literal["transparent", "opaque"] = "opaque"
    output_format: Literal["png", "jpeg", "webp"]
    quality: Literal["low", "medium", "high"]
    size: str
    usage: TokenUsage
    degraded: dict | None = None
    """Kiln's addition, only when the queue was over the plan's wait target and the job was admitted
    with fewer steps (or a smaller size): steps_from, steps_to, size_from, size_to, expected_wait_s."""


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class UsageResponse(BaseModel):
    object: Literal["usage"] = "usage"
    plan: str
    used: int
    limit: int | None
    """None: unlimited."""
    remaining: int | None
    resets_at: str
    """Next UTC midnight, ISO 8601."""


class ImageInfo(BaseModel):
    id: str
    object: Literal["image"] = "image"
    job_id: str
    created: int
    model: str
    width: int
    height: int
    format: str
    seed: int
    size_bytes: int
    url: str
    provenance: dict
    """The provenance record read back from the stored file's own metadata."""
    content_credentials: dict | None = None
    """The file's C2PA manifest, summarised (validation state, assertions, Kiln's record); None if unsigned."""


class JobInfo(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    kind: str
    model: str
    n: int
    size: str
    created: int
    finished: int | None
    image_ids: list[str]
    charge_state: str
    error: ErrorDetail | None = None
    queue_position: int | None = None
    """Queued jobs ahead of this one (0: next; 0 once running); None when finished."""
    eta_s: float | None = None
    """Expected seconds until it starts, from the measured throughput; None when finished."""
    attempts: int = 0
    """Times a worker started it (a lost worker or a restart runs it again, charged once)."""
    degraded: dict | None = None
    """What admission changed to meet the plan's wait target (as in the Images API), or None."""
    relax: bool = False
    """Past today's quota on a plan with relax mode: uncharged, it starts when the GPUs are free."""
    # Follow-ups (prompt composer)
    prompt: str | None = None
    """The prompt the image is drawn from: for an edit of `image_id`, the one composed from that image's
    prompt and the follow-up; for a new picture, the request's, completed for the embedded grammar."""
    instruction: str | None = None
    """The request's `prompt` as sent, when the prompt drawn is another (an edit's follow-up, a
    completed first prompt)."""
    source_image_id: str | None = None
    """For an edit of `image_id`: that image."""
    webhook_url: str | None = None
    """Where this job's events are delivered (None: no webhook)."""
    webhook_events: list[str] | None = None


class WebhookSecretResponse(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str
    """`whsec_…`: verify deliveries with `standardwebhooks.Webhook(secret).verify(body, headers)`."""


class WebhookDeliveryInfo(BaseModel):
    """One event of a job's webhook and what became of it."""

    id: str
    """The webhook-id header it is (or was) sent with."""
    type: str
    url: str
    status: Literal["pending", "delivered", "failed", "disabled", "dropped", "refused"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created: int
    finished: int | None


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDeliveryInfo]


class DisabledEndpoint(BaseModel):
    url: str
    disabled: int
    """When it answered 410 Gone (Unix seconds)."""


class DisabledEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DisabledEndpoint]


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobInfo]


class KeyInfoResponse(BaseModel):
    prefix: str
    label: str | None
    created: int
    revoked: int | None


_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.", "required": True,
                                "schema": {"type": "integer", "minimum": 1}}}
_ERROR_DESCRIPTIONS = {
    400: "Bad input: `param` names the field (`invalid_value`), or `moderation_blocked`.",
    401: "No API key, an unknown one or a revoked one (`invalid_api_key`).",
    404: "No such object, or not yours (never 403), or `model_not_found`.",
    410: "`image_gone`: the image is yours but the image store no longer has its file.",
    413: "The request body is larger than the server accepts (`payload_too_large`).",
    409: "`job_cancelled`: the job this request waited on was cancelled (by you, or an earlier request "
         "with this Idempotency-Key whose client went away); its charge was refunded.",
    422: "`idempotency_key_reused`: this Idempotency-Key came before with another body.",
    429: "`quota_exceeded` (today's images are used up; Retry-After: seconds to the reset) or "
         "`rate_limit_exceeded` (the plan's concurrent jobs are running).",
    500: "`generation_failed`: the pipeline failed on this request; its charge was refunded.",
    503: "`server_is_overloaded`: the queue is over its wait target; Retry-After from the real queue.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these statuses, all with the OpenAI-shaped error body (always JSON, whatever
    the operation's own media type) and, for 429 and 503, the Retry-After header."""
    return {code: {"description": _ERROR_DESCRIPTIONS[code], "content": _ERROR_CONTENT,
                   **({"headers": _RETRY_AFTER} if code in (429, 503) else {})} for code in codes}


ERRORS = error_responses(400, 401, 404, 429, 503)
"""What every authenticated operation may answer (the refusal gate answers 401, 429 and 503 from memory
before routing). Validation errors are 400s, never FastAPI's 422."""
SUBMIT_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 503)
"""What an operation that admits a job may answer besides: a body too large, an Idempotency-Key reused."""
IMAGE_ERRORS = error_responses(400, 401, 404, 409, 413, 422, 429, 500, 503)
"""The Images API's, which waits for the job: also 409 when it was cancelled, 500 when the pipeline failed."""
