import json

from kiln.embedded import train


def test_smoke_training_writes_a_loadable_pipeline_and_resumes(tmp_path):
    from diffusers import DiffusionPipeline

    work, out = tmp_path / "work", tmp_path / "model"
    train.main(["--smoke", "--work", str(work), "--out", str(out), "--threads", "2"])
    assert {"vae.pt", "text.pt", "unet.pt", "latents.pt", "train.log"} <= {p.name for p in work.iterdir()}
    defaults = json.loads((out / "kiln.json").read_text())
    assert defaults["native_size"] == 64 and defaults["scheduler"]
    assert len(defaults["latent_rgb_factors"]) == 4 and len(defaults["latent_rgb_bias"]) == 3

    pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    image = pipe('a sign that says "KILN"', num_inference_steps=1, output_type="np").images[0]
    assert image.shape == (64, 64, 3)

    # A second run finds every stage finished and trains nothing more.
    log_lines = (work / "train.log").read_text().count("\n")
    train.main(["--smoke", "--work", str(work), "--out", str(out), "--threads", "2"])
    new = (work / "train.log").read_text().splitlines()[log_lines:]
    assert not any(" step " in line and "eval" not in line for line in new), new
