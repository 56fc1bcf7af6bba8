"""Serving facts read from a saved pipeline's JSON files agree with what the loaded pipeline itself
computes, the family table agrees with diffusers, and reading facts never imports torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.config import EMBEDDED_MODEL_PATH, ModelSpec, load_settings
from kiln.errors import ConfigError
from kiln.worker.families import FAMILIES as TABLE
from kiln.worker.families import read_facts
from kiln.worker.registry import ModelRegistry, read_model_info
from models.conftest import FAMILIES


def _pipeline_native_and_factor(pipe) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """The default side and size multiple as the pipeline computes them (its own attributes)."""
    name = type(pipe).__name__
    vae = pipe.vae_scale_factor
    if name == "ZImagePipeline":
        return 1024, vae * 2
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None:
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        sample = denoiser.config.sample_size
    patch = 1
    if name in (
        "FluxPipeline",
        "Flux2KleinPipeline",
        "QwenImagePipeline",
        "Lumina2Pipeline",
        "ChromaPipeline",
    ):
        patch = 2
    elif name in ("StableDiffusion3Pipeline", "CogView4Pipeline"):
        patch = pipe.transformer.config.patch_size
    checked = {
        "StableDiffusionPipeline": 8,
        "StableDiffusionXLPipeline": 8,
        "PixArtSigmaPipeline": 8,
        "SanaPipeline": 32,
        "SanaSprintPipeline": 32,
        "CogView4Pipeline": 16,
    }.get(name, 1)  # what each pipeline's check_inputs insists on
    return sample * vae, max(vae * patch, checked)


@pytest.mark.parametrize("family", FAMILIES)
def test_facts_from_json_match_the_loaded_pipeline(tiny_paths, family: str) -> None:
    from diffusers import DiffusionPipeline

    facts = read_facts(tiny_paths[family])
    pipe = DiffusionPipeline.from_pretrained(tiny_paths[family], local_files_only=True)
    assert (facts.native_size, facts.latent_factor) == _pipeline_native_and_factor(pipe)
    assert facts.family == {"sd2": "sd"}.get(family, family)


def test_the_family_table_names_real_diffusers_classes_and_agrees_with_its_auto_mappings() -> None:
    import diffusers
    from diffusers.pipelines.auto_pipeline import (
        AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
        AUTO_INPAINT_PIPELINES_MAPPING,
        AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
    )

    def auto(mapping, text2image: str) -> str | None:  # type: ignore[no-untyped-def]
        for key, cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.items():
            if cls.__name__ == text2image and key in mapping:
                return mapping[key].__name__
        return None

    for family in TABLE:
        for name in (*family.classes, family.edit, family.inpaint):
            assert name is None or hasattr(diffusers, name), name
        for cls in family.classes:
            if family.edit and auto(AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, cls):
                assert auto(AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, cls) == family.edit
            if family.inpaint and auto(AUTO_INPAINT_PIPELINES_MAPPING, cls):
                assert auto(AUTO_INPAINT_PIPELINES_MAPPING, cls) == family.inpaint
            # diffusers' img2img mapping for FLUX.2 is the text-to-image class itself (reference images):
            # Kiln does not offer that as an img2img edit
            edit = auto(AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, cls)
            assert family.edit is not None or edit in (None, cls)


def _copy_configs(source: Path, target: Path) -> Path:
    """Only the JSON files: facts must not need the weights."""
    for path in source.rglob("*.json"):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out)
    return target


def test_distilled_checkpoints_get_few_steps_and_no_guidance(tiny_paths, tmp_path: Path) -> None:
    schnell = _copy_configs(tiny_paths["flux"], tmp_path / "flux1-schnell")
    config = schnell / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "guidance_embeds": False}))
    assert (read_facts(schnell).steps, read_facts(schnell).guidance_scale) == (4, 0.0)
    dev = read_facts(tiny_paths["flux"])
    assert (dev.steps, dev.guidance_scale, dev.distilled) == (28, 3.5, False)
    turbo = _copy_configs(tiny_paths["sd"], tmp_path / "sd-turbo")
    assert (read_facts(turbo).steps, read_facts(turbo).guidance_scale) == (4, 0.0)
    klein = read_facts(tiny_paths["flux2"])  # built with is_distilled=True
    assert (klein.steps, klein.guidance_scale) == (4, 0.0)
    info = read_model_info("schnell", ModelSpec(path=schnell, steps=8, guidance_scale=1.5))
    assert (info.steps, info.guidance_scale) == (8, 1.5)  # the operator's settings win


def test_facts_are_read_without_importing_torch(tiny_paths) -> None:
    code = (
        "import sys; from pathlib import Path; from kiln.worker.families import read_facts; "
        "from kiln.service import image_requests; "
        f"facts = [read_facts(Path(p)) for p in {[str(p) for p in tiny_paths.values()]!r}]; "
        "assert 'torch' not in sys.modules, 'torch was imported'; print(len(facts))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(len(tiny_paths))


def test_the_embedded_model_keeps_its_serving_facts() -> None:
    info = ModelRegistry.from_settings(load_settings()).info(None)
    assert (info.native_size, info.steps, info.guidance_scale) == (64, 6, 3.0)
    assert info.family == "sd" and info.tasks == ("generate", "edit", "inpaint")
    assert len(info.preview_factors) == 4  # its own projection, fitted to its VAE (kiln.json)
    assert read_facts(EMBEDDED_MODEL_PATH).pipeline_class == "StableDiffusionPipeline"


def test_extra_sizes_must_be_ones_the_model_draws(tiny_paths) -> None:
    ok = read_model_info("x", ModelSpec(path=tiny_paths["sdxl"], sizes=["48x32"]))
    assert ok.sizes == ("48x32",) and ok.draws_natively(48, 32)
    with pytest.raises(ConfigError, match="cannot draw 52x32: its sizes are multiples of 8"):
        read_model_info("x", ModelSpec(path=tiny_paths["sdxl"], sizes=["52x32"]))
    with pytest.raises(ConfigError, match="cannot draw 512x512"):  # four times its native side
        read_model_info("x", ModelSpec(path=tiny_paths["sdxl"], sizes=["512x512"]))


def test_families_without_edit_pipelines_do_not_offer_edits(tiny_paths) -> None:
    assert read_model_info("p", ModelSpec(path=tiny_paths["pixart-sigma"])).tasks == ("generate",)
    assert read_model_info("q", ModelSpec(path=tiny_paths["qwen-image"])).tasks == (
        "generate",
        "edit",
        "inpaint",
    )
    forced = read_model_info("p", ModelSpec(path=tiny_paths["sd"], inpaint=False))
    assert forced.tasks == ("generate", "edit")
