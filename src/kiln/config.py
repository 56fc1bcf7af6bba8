"""Kiln's settings: defaults < TOML file < `KILN_*` environment variables < explicit arguments.

Settings are built by `load_settings` inside the app factory or a CLI command, never at import time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
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
    workers: int = Field(1, ge=1, le=64)
    """Worker processes (one per GPU; one on a CPU machine)."""
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
    `tcp://0.0.0.0:8001` on the scheduler's machine, its name or address on the API machines)."""
    scheduler_events_url: str = "tcp://127.0.0.1:8002"
    """Where the scheduler publishes job updates and its heartbeat to every API process."""
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
