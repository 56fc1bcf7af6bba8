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


def test_going_on_from_a_pipeline_keeps_its_autoencoder_and_trains_the_unet(tmp_path):
    """`--init` (the FINETUNE recipe's shape): no autoencoder or text stage, the latent scale and the
    autoencoder's weights of the starting pipeline, letter losses from the first step, and the
    starting pipeline's training summary kept beside the new one."""
    from dataclasses import replace

    from diffusers import AutoencoderKL, UNet2DConditionModel

    first = tmp_path / "first"
    train.main(["--smoke", "--work", str(tmp_path / "w1"), "--out", str(first), "--threads", "2"])
    recipe = replace(
        train.SMOKE, init_from=str(first), seed=train.FINETUNE.seed, vae_steps=0, decoder_steps=0,
        text_steps=0, letter_losses_by=train.FINETUNE.letter_losses_by,
    )
    work, out = tmp_path / "w2", tmp_path / "second"
    train.run(recipe, work, out)

    log = (work / "train.log").read_text()
    assert "vae step" not in log and "decoder step" not in log and "text step" not in log
    assert "unet step" in log or "eval step 3" in log
    summary = json.loads((out / "training.json").read_text())
    assert summary["letter_losses_from_step"] == 0
    assert summary["continued_from"] == json.loads((first / "training.json").read_text())
    vae_before, vae_after = (AutoencoderKL.from_pretrained(str(p / "vae")) for p in (first, out))
    assert vae_after.config.scaling_factor == vae_before.config.scaling_factor
    for (name, a), b in zip(vae_before.state_dict().items(), vae_after.state_dict().values()):
        assert (a == b).all(), name
    unet_before, unet_after = (UNet2DConditionModel.from_pretrained(str(p / "unet")) for p in (first, out))
    assert any(
        not (a == b).all() for a, b in zip(unet_before.state_dict().values(), unet_after.state_dict().values())
    )


def test_a_stage_of_no_steps_is_done_from_the_start():
    assert train.Budget(0, None).done(0) and train.Budget(0, 5.0).progress(0) == 1.0
    assert not train.Budget(10, None).done(9) and train.Budget(10, None).done(10)
