import random

import numpy as np

from kiln.embedded.analyze import read_image, score
from kiln.embedded.scenes import COLORS, PALETTE, all_scenes, draw_scene, sample_scene, scene_batch


def test_vocabulary_of_scenes():
    assert len(COLORS) >= 8
    scenes = all_scenes()
    assert len(scenes) == len(set(scenes)) == 8 * 7 * 3 * 5 * 2
    assert all(s.color != s.background for s in scenes)


def test_draw_is_native_size_and_uses_the_palette():
    rng = random.Random(0)
    scene = sample_scene(rng)
    image = draw_scene(scene, rng)
    assert image.size == (64, 64)
    assert tuple(np.asarray(image)[0, 0]) == PALETTE[scene.background]


def test_scene_batch_is_in_unit_range():
    rng = random.Random(1)
    batch = scene_batch([sample_scene(rng) for _ in range(3)], rng)
    assert batch.shape == (3, 3, 64, 64)
    assert batch.min() >= -1.0 and batch.max() <= 1.0


def test_pixel_analysis_reads_drawn_scenes_back():
    # The scorecard is only as good as its reader: on true drawings it must be (nearly) perfect.
    rng = random.Random(2)
    wrong = 0
    for _ in range(300):
        scene = sample_scene(rng)
        wrong += sum(not ok for ok in score(read_image(draw_scene(scene, rng)), scene).values())
    assert wrong <= 2
