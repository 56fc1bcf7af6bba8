"""The model registry: names, aliases, missing paths, lazy loading through the configured loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.config import ModelSpec, load_settings
from kiln.errors import ConfigError, ModelNotFound
from kiln.worker.registry import ModelRegistry, read_model_info

FAKE = "kiln.testing:load_fake_pipeline"


def fake_settings(tmp_path: Path, **extra: object):
    return load_settings(
        models={"fake": ModelSpec(path=tmp_path, loader=FAKE, native_size=32, steps=4)},
        default_model="fake",
        model_aliases={"gpt-image-1": "fake", "dangling": "nope"},
        **extra,
    )


def test_resolves_names_and_aliases_and_refuses_unknown(tmp_path: Path) -> None:
    registry = ModelRegistry.from_settings(fake_settings(tmp_path))
    assert registry.resolve(None) == "fake"
    assert registry.resolve("gpt-image-1") == "fake"
    assert "dangling" not in registry.aliases  # aliases of models that are not loaded are dropped
    with pytest.raises(ModelNotFound) as caught:
        registry.resolve("dall-e-9")
    assert caught.value.param == "model"


def test_missing_model_path_is_one_clear_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_index.json missing"):
        read_model_info("broken", ModelSpec(path=tmp_path / "nowhere"))


def test_kiln_json_supplies_serving_defaults_and_the_spec_overrides_them(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "kiln.json").write_text(json.dumps({"native_size": 64, "steps": 12, "guidance_scale": 3.0}))
    info = read_model_info("m", ModelSpec(path=tmp_path))
    assert (info.native_size, info.steps, info.guidance_scale) == (64, 12, 3.0)
    info = read_model_info("m", ModelSpec(path=tmp_path, steps=20))
    assert info.steps == 20


def test_pipelines_load_once_and_edit_pipelines_share_the_base(tmp_path: Path) -> None:
    registry = ModelRegistry.from_settings(fake_settings(tmp_path))
    base = registry.pipeline("gpt-image-1")
    assert registry.pipeline("fake") is base
    edit = registry.pipeline("fake", "edit")
    assert edit is not base and edit.task == "edit"
    assert registry.pipeline("fake", "edit") is edit


def test_unimportable_loader_is_a_config_error(tmp_path: Path) -> None:
    settings = load_settings(
        models={"x": ModelSpec(path=tmp_path, loader="kiln.nothing:here")}, default_model="x"
    )
    registry = ModelRegistry.from_settings(settings)
    with pytest.raises(ConfigError, match="cannot import model loader"):
        registry.pipeline("x")
