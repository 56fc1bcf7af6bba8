"""Kiln's settings: defaults < TOML file < `KILN_*` environment variables < explicit arguments.

Settings are built by `load_settings` inside the app factory or a CLI command, never at import time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

EMBEDDED_MODEL_PATH = Path(__file__).parent / "embedded" / "model"
EMBEDDED_MODEL_NAME = "kiln-embedded"
LORA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ModelSpec(BaseModel):
    """One diffusers pipeline on local disk."""

    path: Path
    """Directory holding a diffusers pipeline saved with `save_pretrained`."""
    dtype: str = Field("auto", pattern="^(auto|float32|float16|bfloat16)$")
    """Torch dtype the pipeline is loaded in. `auto`: float32 on CPU; on CUDA bfloat16 for
    transformer-denoiser families (FLUX, SD3, Qwen-Image, Sana, …) and float16 for UNet ones (SD1, SDXL)."""
    steps: int | None = Field(None, ge=1, le=200)
    """Default denoising steps; None takes the model's kiln.json, else its family's default (few for
    distilled checkpoints such as FLUX.1-schnell, SD-Turbo, Sana-Sprint), else 30."""
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0)
    """Default guidance; None takes the model's kiln.json, else its family's default (0 for distilled
    checkpoints), else 7.5."""
    native_size: int | None = Field(None, ge=8, le=4096)
    """Side the model draws at; larger requests are resized. None: the model's kiln.json, else its own
    config (VAE scale × the denoiser's sample size), else 512."""
    sizes: list[Annotated[str, Field(pattern=r"^\d{2,5}x\d{2,5}$")]] = Field(default_factory=list)
    """Extra sizes requests may ask for, e.g. `["832x1216"]`; each must be one the model draws natively
    (multiples of its latent factor, within half to twice its native side)."""
    img2img: bool | None = None
    """Serve image edits; None: when the model's family has an img2img pipeline."""
    inpaint: bool | None = None
    """Serve masked edits (inpainting); None: when the model's family has an inpainting pipeline."""
    loader: str = "kiln.worker.registry:load_diffusers_pipeline"
    """`module:function` that loads the pipeline; tests name a fake here, which must run in workers too."""
    options: dict[str, float | int | str] = Field(default_factory=dict)
    """Extra keyword arguments for the loader."""
    compile: bool = False
    """`torch.compile` the denoiser (UNet or transformer) at load: slower first batches per shape,
    faster steps after. Needs a working compiler toolchain in the worker."""
    channels_last: bool = False
    """Put the UNet and VAE in channels-last memory format (helps convolutions on CUDA)."""
    vae_tiling_above: int = Field(1536, ge=64, le=16384)
    """Decode in tiles when the image's longer side is above this many pixels (bounds VAE memory)."""
    vae_slicing_above: int = Field(4, ge=1, le=64)
    """Decode one image at a time when a batch has more images than this."""
    loras: dict[str, Path] = Field(default_factory=dict)
    """LoRA adapters requests may name, by name: a directory or `.safetensors` file written by
    diffusers' `save_lora_weights`. Loaded into a worker on first use, kept afterwards."""

    @field_validator("loras")
    @classmethod
    def _lora_names(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name in value:  # peft keeps adapters in a ModuleDict: no dots, nothing odd
            if not LORA_NAME.fullmatch(name):
                raise ValueError(f"LoRA name {name!r}: use 1–64 letters, digits, '_' or '-'")
        return value


class PlanSpec(BaseModel):
    """A plan's defaults; the database holds the live values, which operators change at run time."""

    images_per_day: int | None = Field(None, ge=0)
    """Daily image quota; None means unlimited."""
    priority_weight: int = Field(1, ge=1, le=1000)
    """Share of the GPU this plan's queue gets relative to the other plans."""
    max_concurrent: int = Field(1, ge=1, le=1000)
    """Jobs one user of this plan may have queued or running at once."""
    max_n: int = Field(1, ge=1, le=10)
    """Most images one request may ask for."""
    wait_target_s: float = Field(120.0, gt=0)
    """Queue wait the plan promises; admission degrades, then refuses, beyond it."""
    relax_mode: bool = False
    """Past the daily quota, keep generating in an idle-only queue instead of refusing."""


DEFAULT_PLANS: dict[str, PlanSpec] = {
    "free": PlanSpec(images_per_day=3, priority_weight=1, max_concurrent=1, max_n=1, wait_target_s=120),
    "plus": PlanSpec(images_per_day=200, priority_weight=4, max_concurrent=3, max_n=4, wait_target_s=30),
    "enterprise": PlanSpec(
        images_per_day=None, priority_weight=8, max_concurrent=10, max_n=10, wait_target_s=15
    ),
}


class Settings(BaseSettings):
    """Everything an operator can set. Env vars are `KILN_<FIELD>`, nested with `__`."""

    model_config = SettingsConfigDict(
        env_prefix="KILN_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    host: str = "127.0.0.1"
    """Address `kiln serve` binds to."""
    port: int = Field(8000, ge=1, le=65535)
    """Port `kiln serve` listens on."""
    database_url: str = "sqlite:///var/kiln.db"
    """SQLAlchemy URL: SQLite (default, WAL mode) or `postgresql+psycopg://…`."""
    data_dir: Path = Path("var")
    """Where Kiln keeps its state on disk (images, SQLite database)."""
    images_dir: Path = Path("var/images")
    """Where generated images are stored."""
    models: dict[str, ModelSpec] = Field(
        default_factory=lambda: {EMBEDDED_MODEL_NAME: ModelSpec(path=EMBEDDED_MODEL_PATH)}
    )
    """Loaded models by name."""
    default_model: str = EMBEDDED_MODEL_NAME
    """The model used when a request names none."""
    model_aliases: dict[str, str] = Field(
        default_factory=lambda: {
            "gpt-image-1": EMBEDDED_MODEL_NAME,
            "dall-e-3": EMBEDDED_MODEL_NAME,
            "dall-e-2": EMBEDDED_MODEL_NAME,
        }
    )
    """Other names a request may use for a loaded model (OpenAI's, so unmodified apps work)."""
    plans: dict[str, PlanSpec] = Field(default_factory=lambda: dict(DEFAULT_PLANS))
    """Plans created on first start; afterwards the database holds the live values."""
    default_plan: str = "free"
    """Plan given to users created without one."""
    torch_threads: int = Field(2, ge=1, le=256)
    """Intra-op threads per worker process."""
    max_batch_size: int = Field(8, ge=1, le=64)
    """Most images the batcher packs into one pipeline call."""
    max_batch_wait_s: float = Field(0.05, ge=0.0, le=10.0)
    """How long the batcher holds a partial batch for more requests with the same key."""
    preemption: Literal["off", "bound", "preempt", "both"] = "bound"
    """How paying work avoids waiting behind a long low-priority batch: `bound` caps the lower-weight
    images in a batch while better work waits; `preempt` stops a running lower-weight batch at its next
    step and requeues it; `both`; `off` (docs/ENGINE.md compares them)."""
    bound_batch_images: int = Field(2, ge=1, le=64)
    """Most lower-weight images in one batch while bounding applies."""
    max_preemptions: int = Field(2, ge=0, le=100)
    """A request is preempted at most this often, so low-priority work always finishes."""
    plan_max_running_images: dict[str, int] = Field(default_factory=dict)
    """Per-plan cap on images running at once, e.g. `{free = 4}`; a plan absent here is uncapped."""
    throughput_prior_units_per_s: float = Field(20.0, gt=0, le=1e6)
    """Work units (512×512 image-steps) per second one worker is assumed to do until real batches
    are measured; admission's wait estimates start from it."""
    refuse_at_target_x: float = Field(2.0, ge=1.0, le=100.0)
    """Expected wait over a plan's target degrades a request; over this multiple of it, refuses (503)."""
    max_worker_crashes: int = Field(3, ge=1, le=100)
    """A job whose worker died this many times running it fails as poison (`worker_crashed`)."""
    preview_every_steps: int = Field(5, ge=0, le=1000)
    """Jobs followed live (`/v1/jobs/{id}/events`) get a preview image every this many steps; 0: none."""
    job_lease_s: float = Field(30.0, ge=1.0, le=3600.0)
    """A server renews the leases of the jobs it runs every third of this; a job whose lease lapsed
    (its server died) is taken over and run again by a live server."""
    scheduler_url: str = "tcp://127.0.0.1:8001"
    """Where the scheduler listens for API processes (a ZMQ address: it binds, API processes connect;
    `tcp://0.0.0.0:8001` on the scheduler's machine, its name or address on the API machines). API
    processes may name several, comma-separated (an active scheduler and its standbys): they send to
    the one whose heartbeat says it is active. A scheduler binds exactly one."""
    scheduler_events_url: str = "tcp://127.0.0.1:8002"
    """Where the scheduler publishes job updates and its heartbeat to every API process
    (comma-separated on API processes, in the order of `scheduler_url`)."""
    scheduler_id: str | None = None
    """This scheduler's name in job leases; None: the host name and `scheduler_url`'s port. A
    scheduler restarted under the same id runs what its previous life left at once."""
    scheduler_timeout_s: float = Field(2.0, gt=0, le=60)
    """An API process treats the scheduler as away when it has not heard from it for this long (and
    waits at most this long for an admission answer); it then answers 503 with a Retry-After."""
    key_revocation_poll_s: float = Field(0.5, gt=0, le=60)
    """How often each API process reads the keys revoked since its last look (refused within this)."""
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    """Largest request body accepted for image edits."""
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64)
    """Largest decoded upload (width × height); bigger is refused as a decompression bomb."""
    moderation_blocklist: list[str] = Field(default_factory=lambda: ["gore", "nsfw"])
    """Words that get a prompt refused with `moderation_blocked`."""
    live_settings_poll_s: float = Field(2.0, gt=0, le=60)
    """How often a running server re-reads plans from the database."""
    public_base_url: str | None = None
    """Base URL used for `response_format=url`; None derives it from the request."""
    session_secret: str | None = None
    """Key that signs web UI session cookies; None generates one and keeps it in `data_dir`."""
    session_max_age_s: int = Field(14 * 24 * 3600, ge=60)
    """How long a web UI sign-in lasts."""
    session_https_only: bool = False
    """Mark the session cookie Secure (set it when Kiln is served over HTTPS)."""
    throttle_storage_url: str = Field("memory://", pattern=r"^[a-z][a-z0-9+.-]*://")
    """Where the web UI's sign-in throttle counts wrong passwords: any synchronous `limits` storage
    URI; `memory://` counts per process, `redis://host:6379/0` across every replica sharing it."""

    # ---- schedulers and image store (issue 11: one active scheduler and a standby; S3 images)
    scheduler_standby_poll_s: float = Field(1.0, gt=0, le=60)
    """A standby scheduler (`kiln serve --role scheduler` while another holds the leadership) tries to
    take the leadership this often; the active one re-checks that it still holds it as often."""
    image_store: str | None = None
    """Where images are kept: a directory, or an S3-compatible bucket `s3://bucket/prefix` (then every
    replica serves every image); None: the `images_dir` directory."""
    s3_endpoint_url: str | None = None
    """The S3 API's address for a store other than AWS (MinIO, R2, Ceph…); None: AWS (or AWS_ENDPOINT_URL)."""
    s3_region: str | None = None
    """The bucket's region; None: AWS_REGION / AWS_DEFAULT_REGION."""
    s3_access_key_id: str | None = None
    """S3 access key; None: AWS_ACCESS_KEY_ID, or the machine's own credentials (instance role)."""
    s3_secret_access_key: SecretStr | None = None
    """S3 secret key; None: AWS_SECRET_ACCESS_KEY, or the machine's own credentials."""
    s3_allow_http: bool = False
    """Allow a plain-HTTP `s3_endpoint_url` (a store on a private network, tests); HTTPS otherwise."""
    image_redirect_s: int = Field(0, ge=0, le=7 * 24 * 3600)
    """With an S3 store, GET /v1/images/{id}/content answers with a redirect (307) to a presigned URL
    valid this many seconds, so the bytes do not pass through Kiln; 0: Kiln streams them."""

    @field_validator("image_store")
    @classmethod
    def _image_store_kind(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not value.startswith("s3://"):
            raise ValueError("image_store is a directory or s3://bucket/prefix")
        if value is not None and value.startswith("s3://") and not value[len("s3://"):].strip("/"):
            raise ValueError("image_store s3:// needs a bucket: s3://bucket/prefix")
        return value

    # Prompt composer: the prompt of a follow-up edit (the chat, POST /v1/jobs with image_id)
    prompt_composer_url: str | None = Field(None, pattern=r"^https?://")
    """Base URL of an OpenAI-compatible chat completions API (a local vLLM `http://127.0.0.1:8080/v1`,
    Ollama `http://127.0.0.1:11434/v1`, …) that rewrites a follow-up and the picture's conversation into
    one prompt, for models that do not follow the embedded grammar; None: the follow-up is appended."""
    prompt_composer_model: str | None = Field(None, min_length=1, max_length=256)
    """The chat model's name as that API knows it (required with `prompt_composer_url`)."""
    prompt_composer_api_key: SecretStr | None = None
    """Bearer token for that API, if it wants one."""
    prompt_composer_timeout_s: float = Field(5.0, gt=0, le=120)
    """How long an edit waits for the rewriter; past it (or on any error) the follow-up is appended."""
    prompt_composer_rules_models: list[str] = Field(default_factory=list)
    """Models, besides the embedded one (found by its path), whose prompts follow the embedded grammar
    and whose follow-ups the attribute rules compose."""

    @model_validator(mode="after")
    def _composer_needs_a_model(self) -> Settings:
        if self.prompt_composer_url and not self.prompt_composer_model:
            raise ValueError("prompt_composer_url needs prompt_composer_model (the chat model's name)")
        return self

    # ---- a worker per GPU, and Ray (issue 11)
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    """Local worker processes: `auto` starts one per GPU in `gpu_devices`, each pinned to its own
    (its CUDA_VISIBLE_DEVICES), and one on a machine without GPUs; a number starts that many, taking
    the GPUs in turn. (With `executor = "ray"` the cluster's resources decide instead.)"""
    gpu_devices: list[str] | None = None
    """The GPUs local workers are pinned to (indices or UUIDs, as CUDA_VISIBLE_DEVICES names them);
    None: every GPU this process sees (CUDA_VISIBLE_DEVICES when set, else `nvidia-smi -L`)."""
    executor: Literal["local", "ray"] = "local"
    """Where batches run: `local` worker processes on this machine, or `ray` actors on a Ray cluster
    (one per GPU of every node; nodes may join and leave while Kiln runs; docs/CLUSTER.md)."""
    ray_address: str | None = None
    """The Ray cluster to join (`ray://…`, `host:6379` or `auto`); None: as `ray.init()` does — the
    cluster named by RAY_ADDRESS, else a new local one."""
    ray_namespace: str = "kiln"
    """Ray namespace Kiln's actors live in."""
    ray_actor_resources: dict[str, float] = Field(default_factory=dict)
    """What one worker actor reserves, e.g. `{GPU = 1}` or `{CPU = 4}` or a custom resource;
    empty: one GPU once the cluster has (or had) a GPU, else `torch_threads` CPUs. A node hosts as
    many actors as its resources fit."""
    ray_max_actors: int | None = Field(None, ge=1, le=4096)
    """Most worker actors on the whole cluster; None: as many as its nodes fit."""
    ray_max_restarts: int = Field(3, ge=-1, le=1000)
    """How often Ray restarts a worker actor whose process died (its batch is run again elsewhere
    meanwhile); an actor past it is replaced by a fresh one while its node fits one. -1: forever."""
    ray_poll_s: float = Field(2.0, gt=0, le=60)
    """How often the cluster's nodes are read, so nodes that join get actors and nodes that leave
    take theirs (and their capacity) away."""

    @field_validator("ray_actor_resources")
    @classmethod
    def _actor_resources_positive(cls, value: dict[str, float]) -> dict[str, float]:
        if bad := sorted(name for name, amount in value.items() if amount <= 0):
            raise ValueError(f"ray_actor_resources must be positive amounts: {', '.join(bad)}")
        return value

    # ---- webhooks (Standard Webhooks deliveries of job events)
    webhook_retry_schedule_s: list[float] = Field(
        default_factory=lambda: [0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0,
                                 86400.0],
        min_length=1, max_length=50)
    """Delays before each try of a webhook delivery (the first is the first try); with ±20 % jitter, and
    never sooner than a receiver's Retry-After. Past the last, the delivery is given up (`failed`)."""
    webhook_allow_private: bool = False
    """Allow webhook URLs on loopback, private, link-local and CGNAT addresses (receivers on your own
    network); cloud metadata addresses stay refused either way."""
    webhook_poll_s: float = Field(0.5, gt=0, le=60)
    """How often the scheduler looks for due webhook deliveries (those written by other processes)."""
    webhook_connect_timeout_s: float = Field(3.0, gt=0, le=60)
    """A webhook receiver must accept the connection within this."""
    webhook_timeout_s: float = Field(10.0, gt=0, le=120)
    """A webhook delivery (connect, send, answer) must be over within this, or it is tried again."""
    webhook_max_concurrent: int = Field(16, ge=1, le=1000)
    """Webhook deliveries sent at once by one scheduler (each job's events stay in order)."""

    # ---- thermal guard (docs/GPU.md "Thermal guard")
    telemetry_source: Literal["nvml", "file", "off"] = "nvml"
    """Where the scheduler reads per-GPU telemetry: `nvml` (inert where no GPU answers), `file` (JSON
    lines at `telemetry_file`, e.g. written from DCGM), or `off` (nothing is read, so nothing is hot;
    limits an earlier run held are given back)."""
    telemetry_file: Path | None = None
    """The JSON-lines file of `telemetry_source = "file"`: one reading a line, the latest per GPU wins."""
    telemetry_poll_s: float = Field(1.0, gt=0, le=60)
    """How often the thermal guard reads telemetry."""
    thermal_limit_c: float = Field(85.0, gt=0, le=150)
    """A GPU at or above this temperature is hot."""
    thermal_cool_c: float = Field(78.0, gt=0, le=150)
    """A hot GPU is cool again once it has read below this, unthrottled, for `thermal_cool_s`."""
    thermal_cool_s: float = Field(30.0, ge=0, le=3600)
    """How long a hot GPU must read cool before it gets its capacity (and the fleet its limits) back."""
    thermal_throttle_mask: int = Field(0xE8, ge=0, le=0xFFFFFFFF)
    """Clocks-event reason bits that make a GPU hot whatever its temperature: by default 0x8
    HwSlowdown, 0x20 SwThermalSlowdown, 0x40 HwThermalSlowdown, 0x80 HwPowerBrakeSlowdown; add 0x4
    (SwPowerCap) to count power capping too (a GPU at full load often reads it)."""
    thermal_capacity_factor: float = Field(0.5, ge=0.05, le=1.0)
    """A hot GPU's share of time: its worker rests between batches so that it runs this fraction of
    the time, and admission counts it as this much of a worker."""
    thermal_gpu_of_worker: list[int] = Field(default_factory=list)
    """The GPU index (as NVML or the file numbers them) of each worker slot; empty: the GPU the
    executor pinned each worker to where it says, else slot i is GPU i."""
    thermal_policy: dict[str, dict[str, int]] = Field(default_factory=dict)
    """Temporary plan limits while any worker's GPU is hot, lifted once all are cool, e.g.
    `{free = {images_per_day = 1, max_running_images = 2}}`; fields: images_per_day, max_concurrent,
    max_n (the plans table, as `kiln plans set` changes it) and max_running_images (the scheduler's
    cap). Only ever tightens; an operator's change made meanwhile is kept, not undone."""

    @field_validator("thermal_policy")
    @classmethod
    def _known_policy_fields(cls, value: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        allowed = {"images_per_day", "max_concurrent", "max_n", "max_running_images"}
        for plan, limits in value.items():
            unknown = set(limits) - allowed
            if unknown:
                raise ValueError(f"thermal_policy.{plan}: unknown fields {sorted(unknown)}; "
                                 f"use {sorted(allowed)}")
            if any(v < (0 if f == "images_per_day" else 1) for f, v in limits.items()):
                raise ValueError(f"thermal_policy.{plan}: limits are at least 1 (images_per_day at least 0)")
        return value

    # Redis between replicas (issue 11: many API processes that agree within a second)
    redis_url: str | None = Field(None, pattern=r"^(redis|rediss|unix)://")
    """Redis every replica shares (`redis://host:6379/0`): job events as streams that any replica
    follows, revocations, plan changes and usage announced to all within a second, and the sign-in
    throttle (unless `throttle_storage_url` is set). None: one box, nothing shared, no Redis needed."""
    redis_prefix: str = Field("kiln:", max_length=64)
    """The first part of every Redis key and channel Kiln uses, so several Kilns (or tests) can share
    one Redis."""
    job_events_ttl_s: int = Field(3600, ge=10, le=30 * 24 * 3600)
    """How long a finished job's event stream stays in Redis for replays (Last-Event-ID) and late
    followers; afterwards a stream says the job's outcome from the database."""
    job_events_maxlen: int = Field(1000, ge=10, le=100_000)
    """Most events one job's stream keeps (consecutive progress events are kept as one already)."""

    # /metrics behind an operator token or on a bind address of its own (issue 13, the contract)
    metrics_token: SecretStr | None = None
    """Bearer token that `GET /metrics` asks for (401 without it, on whichever address serves it); None
    leaves /metrics open, as Prometheus exporters usually are: set it, or `metrics_bind`, wherever the
    API's port is reachable by people who should not read the queue depths and refusal counts."""
    metrics_bind: str | None = Field(None, pattern=r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")
    """`host:port` of a second listener that serves only /metrics (e.g. `10.0.0.5:9464` for a private
    network); when set, the API's own port answers 404 for /metrics. None: /metrics is on the API's port."""

    @field_validator("models")
    @classmethod
    def _at_least_one_model(cls, value: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        if not value:
            raise ValueError("at least one model must be configured")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    def resolve_model(self, name: str | None) -> str | None:
        """The loaded model's name for a request's `model` (a name or an alias), or None if unknown."""
        if not name:
            return self.default_model
        if name in self.models:
            return name
        return self.model_aliases.get(name)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional TOML file, the environment and explicit overrides."""
    if config_file is None:
        return Settings(**overrides)
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with_file = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": path}})
    return with_file(**overrides)
