"""Start aquiles-image 0.8.3 on a CPU, run by its own virtual environment's Python (never Kiln's).

As shipped it only serves on CUDA (see ../../shared/PEERS.md facts, repeated in the report). Three
run-time replacements, no edits to its files:
1. `ModelPipelineInit.__init__` picks "cuda" or else "mps": the device becomes "cpu".
2. `AutoPipelineDiffusers.start` loads the model only when CUDA is available: it loads it on the CPU in
   fp32 from local files.
3. Its smallest size is 256x256; Kiln's model draws at 64x64 and Kiln serves 256x256 by resizing. So
   that both denoise the same 64×64 latents, "256x256" is mapped to 64×64 here (otherwise the peer
   would denoise 16× the pixels of a model never trained at that size).
"""

import sys

import torch
import uvicorn
from aquilesimage.pipelines import pipelines
from aquilesimage.pipelines.image.auto import text2img
from diffusers.pipelines.auto_pipeline import AutoPipelineForText2Image

_original_init = pipelines.ModelPipelineInit.__init__


def _init_on_cpu(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    self.device = "cpu"


def _start_on_cpu(self):
    self.pipeline = AutoPipelineForText2Image.from_pretrained(
        self.model_name, local_files_only=True, torch_dtype=torch.float32
    )
    self.pipeline.set_progress_bar_config(disable=True)


_original_run = uvicorn.run


def _run_with_native_size(app, *args, **kwargs):
    from aquilesimage import main as aquiles_main  # imported by the CLI only after it wrote its config

    aquiles_main.SIZE_MAP["256x256"] = (64, 64)
    return _original_run(app, *args, **kwargs)


pipelines.ModelPipelineInit.__init__ = _init_on_cpu
text2img.AutoPipelineDiffusers.start = _start_on_cpu
uvicorn.run = _run_with_native_size

if __name__ == "__main__":
    from aquilesimage.cli.cli import cli

    sys.argv[0] = "aquiles-image"
    cli()
