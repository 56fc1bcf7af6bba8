"""The model registry: diffusers pipelines loaded from local paths by name, several at once.

Reading a model's facts (`info`) never imports torch; loading a pipeline does, lazily, in a worker.
"""

from __future__ import annotations

import importlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.config import ModelSpec, Settings
from kiln.errors import ConfigError, ModelNotFound
from kiln.worker import placement
from kiln.worker.placement import Placement
from kiln.worker import families


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of Kiln needs to know about a model without loading it."""

    name: str
    path: str
    native_size: int
    steps: int
    guidance_scale: float
    dtype: str
    loader: str
    options: tuple[tuple[str, Any], ...] = ()
    placement: Placement = Placement()
    loras: tuple[tuple[str, str], ...] = ()
    """Adapters requests may name: (name, path of diffusers' save_lora_weights output), sorted."""

    def lora_path(self, name: str) -> str | None:
        return dict(self.loras).get(name)
    family: str | None = None
    """Its family in kiln.worker.families (None: a pipeline Kiln does not know, or a custom loader)."""
    latent_factor: int = 8
    """Every size it draws is a multiple of this (VAE scale × patch size for packed latents)."""
    sizes: tuple[str, ...] = ()
    """Extra sizes the operator allowed (`WxH`), each drawable natively."""
    tasks: tuple[str, ...] = ("generate", "edit", "inpaint")
    """What it serves: generate, and edit (img2img) / inpaint where its family has the pipelines."""
    edit_pipeline: str | None = None
    inpaint_pipeline: str | None = None
    """diffusers classes built from the loaded weights for edits (None: AutoPipeline picks)."""
    latent_format: str = "fit"
    """How step previews project its latents to RGB (kiln.worker.previews)."""
    preview_factors: tuple[tuple[float, ...], ...] = ()
    preview_bias: tuple[float, ...] = ()
    """The model's own latent → RGB projection (its kiln.json), which wins over the family's."""

    def draws_natively(self, width: int, height: int) -> bool:
        """A size the model draws as asked: multiples of its latent factor, half to twice its side."""
        low, high = self.native_size // 2, self.native_size * 2
        return all(side % self.latent_factor == 0 and low <= side <= high for side in (width, height))


def read_model_info(name: str, spec: ModelSpec) -> ModelInfo:
    """Merge the spec with the model's own facts: its `kiln.json` serving defaults (if it ships one),
    else what its configs say (families.read_facts), else Kiln's defaults."""
    defaults: dict[str, Any] = {}
    path = Path(spec.path)
    facts: families.ModelFacts | None = None
    if spec.loader.endswith(":load_diffusers_pipeline"):
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"model {name!r}: no diffusers pipeline at {path} (model_index.json missing)")
        facts = families.read_facts(path)
        kiln_json = path / "kiln.json"
        if kiln_json.is_file():
            defaults = json.loads(kiln_json.read_text())
    native = spec.native_size or int(defaults.get("native_size") or (facts and facts.native_size)
                                     or families.DEFAULT_NATIVE)
    tasks = ["generate"]
    if spec.img2img if spec.img2img is not None else (facts is None or facts.edit_pipeline is not None):
        tasks.append("edit")
    if spec.inpaint if spec.inpaint is not None else (facts is None or facts.inpaint_pipeline is not None):
        tasks.append("inpaint")
    guidance = spec.guidance_scale if spec.guidance_scale is not None else defaults.get("guidance_scale")
    info = ModelInfo(
        name=name,
        path=str(path),
        native_size=native,
        steps=spec.steps or int(defaults.get("steps") or (facts.steps if facts else families.DEFAULT_STEPS)),
        guidance_scale=float(guidance if guidance is not None else
                             (facts.guidance_scale if facts else families.DEFAULT_GUIDANCE)),
        dtype=spec.dtype,
        loader=spec.loader,
        options=tuple(sorted(spec.options.items())),
        placement=Placement.from_spec(spec),
        loras=tuple(sorted((lora, str(lora_path)) for lora, lora_path in spec.loras.items())),
        family=facts.family if facts else None,
        latent_factor=facts.latent_factor if facts else 8,
        sizes=tuple(spec.sizes),
        tasks=tuple(tasks),
        edit_pipeline=facts.edit_pipeline if facts else None,
        inpaint_pipeline=facts.inpaint_pipeline if facts else None,
        latent_format=facts.latent_format if facts else "fit",
        preview_factors=tuple(tuple(float(v) for v in row) for row in defaults.get("latent_rgb_factors", ())),
        preview_bias=tuple(float(v) for v in defaults.get("latent_rgb_bias", ())),
    )
    for size in info.sizes:
        width, height = (int(side) for side in size.split("x"))
        if not info.draws_natively(width, height):
            raise ConfigError(
                f"model {name!r} cannot draw {size}: its sizes are multiples of {info.latent_factor} "
                f"between {native // 2} and {native * 2} pixels a side"
            )
    return info


def load_diffusers_pipeline(info: ModelInfo) -> Any:
    """Any diffusers pipeline saved with `save_pretrained`, from local files only."""
    import torch
    from diffusers import DiffusionPipeline

    device = placement.worker_device()
    dtype = placement.resolve_dtype(info.dtype, info.path, device)
    pipe = DiffusionPipeline.from_pretrained(
        info.path, local_files_only=True, torch_dtype=getattr(torch, dtype)
    )
    pipe.set_progress_bar_config(disable=True)
    return placement.place(pipe, info.placement, device)


def _import_loader(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import model loader {spec!r}: {exc}") from None


class ModelRegistry:
    """Models by name and alias; pipelines are loaded on first use and kept."""

    def __init__(self, models: dict[str, ModelInfo], aliases: dict[str, str], default: str) -> None:
        self._models = models
        self._aliases = aliases
        self.default = default
        self._pipelines: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        models = {name: read_model_info(name, spec) for name, spec in settings.models.items()}
        if settings.default_model not in models:
            raise ConfigError(f"default_model {settings.default_model!r} is not among the configured models")
        aliases = {a: t for a, t in settings.model_aliases.items() if t in models}
        return cls(models, aliases, settings.default_model)

    @property
    def names(self) -> list[str]:
        return list(self._models)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def resolve(self, name: str | None) -> str:
        """A loaded model's name for a name or alias; ModelNotFound otherwise."""
        if not name:
            return self.default
        if name in self._models:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise ModelNotFound(f"The model '{name}' does not exist.", param="model")

    def info(self, name: str | None) -> ModelInfo:
        return self._models[self.resolve(name)]

    def pipeline(self, name: str | None, task: str = "generate") -> Any:
        """The loaded pipeline for `task` (generate · edit · inpaint), sharing one set of weights."""
        info = self.info(name)
        with self._lock:
            key = (info.name, task)
            if key not in self._pipelines:
                base = self._pipelines.get((info.name, "generate"))
                if base is None:
                    loader = _import_loader(info.loader)
                    base = loader(info, **dict(info.options)) if info.options else loader(info)
                    self._pipelines[(info.name, "generate")] = base
                if task != "generate":
                    self._pipelines[key] = _derive_pipeline(base, task, info)
            return self._pipelines[key]


def _derive_pipeline(base: Any, task: str, info: ModelInfo) -> Any:
    """img2img and inpainting pipelines built from the loaded components (no second copy): the
    family's own class when Kiln knows it (some, e.g. Chroma's, are not in diffusers' auto-mappings)."""
    derive = getattr(base, "derive", None)
    if derive is not None:  # fakes and custom pipelines that know how
        return derive(task)
    import diffusers

    named = info.edit_pipeline if task == "edit" else info.inpaint_pipeline
    if named:
        factory = getattr(diffusers, named)
    else:
        auto = {"edit": "AutoPipelineForImage2Image", "inpaint": "AutoPipelineForInpainting"}
        factory = getattr(diffusers, auto[task])
    pipe = factory.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe
