"""Request and response bodies of the Images API, shaped as OpenAI's; unknown fields are refused."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kiln.service.image_requests import MAX_LORA_SCALE, MAX_LORAS, MAX_SEED


class LoraChoice(BaseModel):
    """One LoRA adapter the operator registered for the model, and how strongly to apply it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)
    """Multiplies the adapter's weights: 0 is the base model, 1 the adapter as trained."""


class _ImageOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=32000)
    """What to draw."""
    model: str | None = None
    """A loaded model's name or an alias (gpt-image-1, dall-e-3, dall-e-2 → the default model)."""
    n: int | None = Field(1, ge=1, le=10)
    """Images to generate; your plan's max_n caps it."""
    size: str | None = "auto"
    """1024x1024, 1536x1024, 1024x1536, 256x256, 512x512, the model's native square, the extra sizes its
    operator allowed, or auto (native). A size the model cannot draw is a 400 naming the model."""
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = "auto"
    """Denoising steps as a share of the model's default: low ¼, medium ½, high/auto all of them."""
    output_format: Literal["png", "jpeg", "webp"] | None = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    """JPEG/WebP quality, 0–100 (ignored for PNG)."""
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    user: str | None = Field(None, max_length=256)
    """An end-user id of yours, stored with the job."""
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    """Kiln's extra: images i of n use seed + i, so a request can be repeated exactly."""
    background: Literal["transparent", "opaque", "auto"] | None = None
    """Accepted as OpenAI does; Kiln's models draw opaque images."""
    moderation: Literal["low", "auto"] | None = None
    """Accepted as OpenAI does; Kiln's blocklist applies either way."""
    stream: bool | None = None
    """Answer as server-sent events in OpenAI's shape: `image_generation.partial_image` previews
    (`image_edit.*` for edits), then one `…completed` per image once it is stored."""
    partial_images: int | None = Field(None, ge=0, le=3)
    """With `stream`: how many previews to send while the image is drawn (0–3)."""
    safety_identifier: str | None = Field(None, max_length=256)
    loras: list[LoraChoice] | None = Field(None, max_length=MAX_LORAS)
    """Kiln's extra: LoRA adapters of the model to apply, e.g. `[{"name": "watercolor", "scale": 0.8}]`
    (in a multipart edit, the same list as a JSON string). Unknown names are refused (400)."""

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
    strength: float | None = Field(None, gt=0.0, le=1.0)
    """Kiln's extra: how far an unmasked edit may move from the input image (default 0.75)."""


WebhookEvent = Literal["started", "progress", "completed", "failed", "cancelled"]


class WebhookOptions(BaseModel):
    """Kiln's extra on POST /v1/jobs: signed deliveries of the job's events (Standard Webhooks)."""

    webhook_url: str | None = Field(None, min_length=1, max_length=2048)
    """An http(s) URL to POST the job's events to, signed with your secret (GET /v1/webhooks/secret)."""
    webhook_events: list[WebhookEvent] | None = Field(None, min_length=1, max_length=5)
    """Which events to send (default: started, completed, failed, cancelled; progress at most every
    500 ms when asked for)."""


class JobRequest(GenerationRequest, WebhookOptions):
    """POST /v1/jobs (JSON): a generation, or with `image_id` an edit of one of your own images."""

    image_id: str | None = Field(None, max_length=64)
    """Kiln's extra: edit this image of yours (img2img) instead of drawing from nothing."""
    strength: float | None = Field(None, gt=0.0, le=1.0)
    """With `image_id`: how far the edit may move from the image (default 0.75)."""
    # Follow-ups (prompt composer)
    compose_prompt: bool | None = None
    """With `image_id`: `prompt` is a follow-up ("make it green") and the image's own prompt is
    rewritten with it (the default); false draws `prompt` exactly as given."""


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
    prompt and the follow-up."""
    instruction: str | None = None
    """For an edit of `image_id`: the follow-up as sent (the request's `prompt`)."""
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


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 500, 503)}
