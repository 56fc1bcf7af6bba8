import random

import numpy as np

from kiln.embedded.analyze import read_image, score
from kiln.embedded.scenes import (
    COLORS,
    WORD_GRID,
    LETTER_PITCH,
    NATIVE_SIZE,
    PALETTE,
    all_scenes,
    draw_scene,
    random_word,
    sample_scene,
    sample_text_scene,
    scene_batch,
    text_box,
)


def test_vocabulary_of_scenes():
    assert len(COLORS) >= 8
    scenes = all_scenes()
    assert len(scenes) == len(set(scenes)) == 8 * 7 * 3 * 5 * 2
    assert all(s.color != s.background for s in scenes)


def test_draw_is_native_size_and_uses_the_palette():
    rng = random.Random(0)
    scene = sample_scene(rng)
    image = draw_scene(scene, rng)
    assert image.size == (NATIVE_SIZE, NATIVE_SIZE) == (64, 64)
    assert tuple(np.asarray(image)[0, 0]) == PALETTE[scene.background]


def test_scene_batch_is_in_unit_range():
    rng = random.Random(1)
    batch = scene_batch([sample_scene(rng) for _ in range(3)], rng)
    assert batch.shape == (3, 3, NATIVE_SIZE, NATIVE_SIZE)
    assert batch.min() >= -1.0 and batch.max() <= 1.0


def test_pixel_analysis_reads_drawn_scenes_back():
    # The scorecard is only as good as its reader: on true drawings it must be (nearly) perfect.
    rng = random.Random(2)
    wrong = 0
    for _ in range(300):
        scene = sample_scene(rng)
        wrong += sum(not ok for ok in score(read_image(draw_scene(scene, rng)), scene).values())
    assert wrong <= 2


def test_words_sit_on_the_word_grid_inside_the_picture():
    for word in ("AB", "KILN", "ABCDEF"):
        for centre in ((0.5, 0.5), (0.28, 0.5), (0.72, 0.72), (0.0, 1.0)):
            x0, y0, x1, y1 = text_box(word, centre)
            assert (x1 - x0, y1 - y0) == (LETTER_PITCH * len(word), LETTER_PITCH)
            assert x0 % WORD_GRID == 0 and y0 % WORD_GRID == 0
            assert 0 < x0 and x1 < NATIVE_SIZE and 0 < y0 and y1 < NATIVE_SIZE


def test_text_scenes_draw_their_letters_in_their_colour():
    rng = random.Random(3)
    for kind in ("shape_word", "sign", "word"):
        scene = sample_text_scene(rng, random_word(rng), kind)
        assert scene.kind == kind and 2 <= len(scene.word) <= 6 and scene.word.isupper()
        assert scene.text_color not in (scene.background,) and (kind == "word" or scene.text_color != scene.color)
        pixels = np.asarray(draw_scene(scene, rng)).reshape(-1, 3).astype(int)
        near = (np.abs(pixels - PALETTE[scene.text_color]).max(axis=1) < 10).sum()
        assert near >= 5 * len(scene.word), (scene, near)


def test_the_word_reader_reads_true_drawings():
    # Calibration: on the drawer's own pictures Tesseract must read (nearly) every word.
    from kiln.embedded.ocr import read_word
    from kiln.embedded.text_captions import HELD_OUT_WORDS

    rng = random.Random(4)
    words = rng.sample(HELD_OUT_WORDS, 12)
    scenes = [sample_text_scene(rng, w, ("shape_word", "sign", "word")[i % 3]) for i, w in enumerate(words)]
    read = [read_word(draw_scene(s, rng), s) for s in scenes]
    assert sum(r == w for r, w in zip(read, words)) >= 11, list(zip(words, read))
