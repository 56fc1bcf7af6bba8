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
    # The letter losses wait for the colours (or step letter_losses_by, 2 in the smoke recipe).
    log = (work / "train.log").read_text()
    assert "unet step 2: the letter-slot and letter-attention losses switch on" in log
    assert "unet step 1: the letter" not in log
    assert json.loads((out / "training.json").read_text())["letter_losses_from_step"] == 2

    # A second run finds every stage finished and trains nothing more.
    log_lines = (work / "train.log").read_text().count("\n")
    train.main(["--smoke", "--work", str(work), "--out", str(out), "--threads", "2"])
    new = (work / "train.log").read_text().splitlines()[log_lines:]
    assert not any(" step " in line and "eval" not in line for line in new), new


def test_letter_losses_wait_for_colour_and_background():
    recipe = train.Recipe()
    learnt = {"color": 0.95, "background": 0.9}
    assert train.letter_losses_due(recipe, 400, learnt)
    assert not train.letter_losses_due(recipe, 400, {"color": 0.95, "background": 0.85})
    assert not train.letter_losses_due(recipe, 401, None)
    assert train.letter_losses_due(recipe, recipe.letter_losses_by, None)
