"""The letter-attention supervision of the UNet stage: targets from where the drawer put each letter,
and a recording processor that computes exactly what the stock one does."""

import random

import numpy as np
import torch

from kiln.embedded import components
from kiln.embedded.scenes import PALETTE, draw_scene, layout, letter_boxes, sample_text_scene
from kiln.embedded.train_attention import install_recorders, letter_attention_loss, letter_targets
from kiln.embedded.train_text import letter_slot_targets, tokenize


def test_each_letter_cell_targets_its_own_token():
    tokenizer = components.build_tokenizer()
    rng = random.Random(3)
    scene = sample_text_scene(rng, "KILN", "sign")
    box = layout(scene, rng).word_box
    ids = tokenize(tokenizer, ['a sign that says "KILN" on a green background', "a red circle"])
    letters, _ = letter_slot_targets(tokenizer, ids)
    targets, mask = letter_targets([box, None], letters, 16, ids.shape[1])
    assert not mask[1].any()  # no word, nothing supervised
    positions = {slot: pos for _, pos, _, slot in letters.tolist()}
    for slot, (x0, y0, x1, y1) in enumerate(letter_boxes(box, 4)):
        # the latent cell (4 native pixels) holding the letter cell's centre points at that letter
        row, col = int((y0 + y1) / 2 // 4), int((x0 + x1) / 2 // 4)
        cell = row * 16 + col
        assert mask[0, cell]
        assert targets[0, cell].argmax().item() == positions[slot]
    assert torch.allclose(targets[0][mask[0]].sum(dim=1), torch.ones(int(mask[0].sum())))
    # a cell far from the word (the corner) is not supervised
    assert not mask[0, 0]


def test_the_drawn_letters_lie_in_their_cells():
    rng = random.Random(5)
    scene = sample_text_scene(rng, "HI", "word")
    where = layout(scene, random.Random(0))
    pixels = np.asarray(draw_scene(scene, random.Random(0))).astype(int)
    bg = np.array(PALETTE[scene.background])
    ink = np.abs(pixels - bg).max(axis=2) > 60
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = letter_boxes(where.word_box, 2)
    inside = ink[ay0:ay1, ax0:ax1].sum() + ink[by0:by1, bx0:bx1].sum()
    assert ink.sum() > 0 and inside / ink.sum() > 0.95


def test_recording_processor_computes_what_the_stock_one_does_and_the_loss_has_gradients():
    torch.manual_seed(0)
    tokenizer = components.build_tokenizer()
    unet = components.build_unet(components.TINY).eval()
    text = components.build_text_encoder(tokenizer, components.TINY)
    ids = tokenize(tokenizer, ['a sign that says "GO" on a red background', 'the word "SUN" in yellow'])
    cond = text(ids).last_hidden_state
    latents, t = torch.randn(2, 4, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        stock = unet(latents, t, cond).sample
    recorders = install_recorders(unet)
    assert len(recorders) > 0
    recorded = unet(latents, t, cond).sample
    assert torch.allclose(stock, recorded, atol=1e-5)
    rng = random.Random(1)
    boxes = [layout(sample_text_scene(rng, w, "sign"), rng).word_box for w in ("GO", "SUN")]
    letters, _ = letter_slot_targets(tokenizer, ids)
    loss = letter_attention_loss(recorders, boxes, letters, (16, 8))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    q = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_q.weight
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert text.get_input_embeddings().weight.grad.abs().sum() > 0
    # every recording was consumed: the next step starts clean
    assert all(r.log_probs is None for r in recorders)


def test_attention_accuracy_reads_the_supervised_head_and_leaves_the_unet_as_it_was():
    from kiln.embedded.train import SMOKE, held_out_prompts
    from kiln.embedded.train_attention import letter_attention_accuracy

    torch.manual_seed(0)
    tokenizer = components.build_tokenizer()
    unet = components.build_unet(components.TINY).eval()
    vae = components.build_vae(components.TINY).eval()
    text = components.build_text_encoder(tokenizer, components.TINY).eval()
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    cases = held_out_prompts(SMOKE, 6)
    accuracy = letter_attention_accuracy(unet, vae, text, tokenizer, cases, (16, 8))
    assert 0.0 <= accuracy < 0.9  # random weights do not look at the right letter
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before


def test_word_boxes_of_an_older_cache_are_laid_out_again_exactly():
    from kiln.embedded.scenes import scene_batch_with_layouts
    from kiln.embedded.train import SMOKE, dataset_scenes, dataset_word_boxes

    recipe = SMOKE
    rng, scenes = dataset_scenes(recipe)  # what encode_dataset draws, in its order
    drawn = []
    for i in range(0, len(scenes), 5):
        drawn += [where.word_box for where in scene_batch_with_layouts(scenes[i : i + 5], rng)[1]]
    assert any(box is not None for box in drawn)
    assert dataset_word_boxes(recipe) == drawn
