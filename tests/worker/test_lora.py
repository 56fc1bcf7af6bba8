"""apply_loras: each adapter loaded once per model, each call gets exactly its set, none disables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiln.config import ModelSpec
from kiln.testing import FakePipeline
from kiln.worker.lora import apply_loras
from kiln.worker.registry import read_model_info


class LoraRecorder:
    """The part of diffusers' LoRA loader interface apply_loras uses, recording every call."""

    def __init__(self) -> None:
        self.adapters: list[str] = []
        self.calls: list[tuple[Any, ...]] = []

    def load_lora_weights(self, path: str, adapter_name: str, **kwargs: Any) -> None:
        self.calls.append(("load", adapter_name, Path(path).name, kwargs.get("weight_name")))
        self.adapters.append(adapter_name)

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {"unet": list(self.adapters)} if self.adapters else {}

    def enable_lora(self) -> None:
        self.calls.append(("enable",))

    def disable_lora(self) -> None:
        self.calls.append(("disable",))

    def set_adapters(self, names: list[str], weights: list[float]) -> None:
        self.calls.append(("set", tuple(names), tuple(weights)))


def info(tmp_path: Path):
    (tmp_path / "style").mkdir()
    (tmp_path / "ink.safetensors").touch()
    spec = ModelSpec(path=tmp_path, loader="kiln.testing:load_fake_pipeline",
                     loras={"style": tmp_path / "style", "ink": tmp_path / "ink.safetensors"})
    return read_model_info("m", spec)


def test_adapters_load_once_and_each_call_sets_its_own(tmp_path: Path) -> None:
    model, pipe = info(tmp_path), LoraRecorder()
    apply_loras(pipe, model, ())  # nothing loaded yet: nothing to disable
    apply_loras(pipe, model, (("ink", 0.5), ("style", 1.0)))
    apply_loras(pipe, model, (("style", 0.3),))
    apply_loras(pipe, model, ())
    assert pipe.calls == [
        ("load", "ink", tmp_path.name, "ink.safetensors"),  # a file: its folder plus weight_name
        ("load", "style", "style", None),
        ("enable",), ("set", ("ink", "style"), (0.5, 1.0)),
        ("enable",), ("set", ("style",), (0.3,)),
        ("disable",),
    ]


def test_a_pipeline_without_lora_support_or_an_unknown_name_fails_the_batch(tmp_path: Path) -> None:
    model = info(tmp_path)
    apply_loras(FakePipeline(), model, ())  # fine without adapters
    with pytest.raises(ValueError, match="cannot load LoRA"):
        apply_loras(FakePipeline(), model, (("style", 1.0),))
    with pytest.raises(ValueError, match="no LoRA adapter named 'gone'"):
        apply_loras(LoraRecorder(), model, (("gone", 1.0),))
