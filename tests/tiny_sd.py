"""A tiny random-weight Stable Diffusion pipeline saved to disk (built from configs, nothing downloaded),
and a tiny LoRA for its UNet saved with diffusers' own `save_lora_weights`: real parts in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_tiny_sd(seed: int = 0) -> Any:
    import torch

    from kiln.embedded import components as parts

    torch.manual_seed(seed)
    tokenizer = parts.build_tokenizer()
    sizes = parts.TINY
    text_encoder = parts.build_text_encoder(tokenizer, sizes)
    pipe = parts.assemble_pipeline(parts.build_vae(sizes), text_encoder, tokenizer, parts.build_unet(sizes))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd(path: Path, seed: int = 0) -> Path:
    build_tiny_sd(seed).save_pretrained(path)
    return path


def save_tiny_lora(model_dir: Path, out: Path, seed: int = 1, rank: int = 4) -> Path:
    """A LoRA on the UNet's attention projections with random, non-zero weights (peft's
    `init_lora_weights=False`, so it changes the images), as diffusers' save_lora_weights writes it."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS,
                                     init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return out
