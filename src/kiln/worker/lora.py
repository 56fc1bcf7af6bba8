"""LoRA adapters per batch, through diffusers' own loader: each adapter is loaded into a model once
(`load_lora_weights(adapter_name=…)`, kept for later batches), and every batch activates exactly its
own set at its scales (`set_adapters`), or none (`disable_lora`). Weights are never merged, so any
batch can use any set without reloading the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.worker.registry import ModelInfo

Loras = tuple[tuple[str, float], ...]
"""(adapter name, scale) pairs, sorted by name: a batch key's `loras`."""


def apply_loras(pipe: Any, info: ModelInfo, loras: Loras) -> None:
    """Make the next call of `pipe` use exactly `loras` (an empty set: the base model)."""
    loaded = loaded_adapters(pipe)
    if not loras:
        if loaded:
            pipe.disable_lora()
        return
    if not hasattr(pipe, "set_adapters"):
        raise ValueError(f"model {info.name!r}: {type(pipe).__name__} cannot load LoRA adapters")
    for name, _ in loras:
        if name not in loaded:
            _load(pipe, info, name)
    pipe.enable_lora()
    pipe.set_adapters([name for name, _ in loras], [scale for _, scale in loras])


def loaded_adapters(pipe: Any) -> set[str]:
    """Adapter names already in the pipeline's models (derived edit pipelines share them)."""
    listing = getattr(pipe, "get_list_adapters", None)
    if listing is None:
        return set()
    return {name for names in listing().values() for name in names}


def _load(pipe: Any, info: ModelInfo, name: str) -> None:
    where = info.lora_path(name)
    if where is None:  # admission refuses unknown names; a stale batch after a config change lands here
        raise ValueError(f"model {info.name!r} has no LoRA adapter named {name!r}")
    path = Path(where)
    if path.is_file():
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    else:
        pipe.load_lora_weights(str(path), adapter_name=name)
