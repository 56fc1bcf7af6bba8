"""Settings: defaults < TOML file < KILN_* environment < explicit arguments; bounds are enforced."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kiln.config import EMBEDDED_MODEL_NAME, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("KILN_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kiln.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings()
    assert settings.port == 8000 and settings.database_url == "sqlite:///var/kiln.db"
    assert settings.default_model == EMBEDDED_MODEL_NAME
    assert settings.resolve_model("gpt-image-1") == EMBEDDED_MODEL_NAME
    assert settings.resolve_model("nope") is None
    assert settings.plans["free"].images_per_day == 3 and settings.plans["enterprise"].images_per_day is None


def test_toml_then_env_then_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, 'port = 9000\nhost = "0.0.0.0"\nmax_batch_size = 4\n'
                             '[plans.free]\nimages_per_day = 7\n')
    from_file = load_settings(config)
    assert (from_file.port, from_file.host, from_file.max_batch_size) == (9000, "0.0.0.0", 4)
    assert from_file.plans["free"].images_per_day == 7
    monkeypatch.setenv("KILN_PORT", "9100")
    monkeypatch.setenv("KILN_PLANS__FREE__IMAGES_PER_DAY", "9")
    from_env = load_settings(config)
    assert from_env.port == 9100 and from_env.host == "0.0.0.0"  # env wins only where it is set
    assert from_env.plans["free"].images_per_day == 9
    assert load_settings(config, port=9200).port == 9200


def test_bad_settings_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        load_settings(write(tmp_path, "port = 70000\n"))
    with pytest.raises(ValidationError):
        load_settings(write(tmp_path, "no_such_setting = 1\n"))
    with pytest.raises(ValidationError):
        load_settings(write(tmp_path, "models = {}\n"))
    monkeypatch.setenv("KILN_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValidationError):
        Settings()
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


def test_engine_knobs_reach_the_engine_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kiln.engine import EngineConfig

    monkeypatch.setenv("KILN_PREEMPTION", "both")
    monkeypatch.setenv("KILN_PLAN_MAX_RUNNING_IMAGES", '{"free": 4}')
    settings = load_settings(write(tmp_path, "throughput_prior_units_per_s = 3.5\nrefuse_at_target_x = 3\n"))
    config = EngineConfig.from_settings(settings)
    assert config.preemption == "both" and config.plan_max_running_images == {"free": 4}
    assert config.throughput_prior_units_per_s == 3.5 and config.refuse_at_target_x == 3.0
    for bad in ({"preemption": "sometimes"}, {"refuse_at_target_x": 0.5}, {"job_lease_s": 0}):
        with pytest.raises(ValidationError):
            load_settings(**bad)
