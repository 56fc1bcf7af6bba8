import random

import pytest

from kiln.embedded.captions import (
    COLOR_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    all_phrasings,
    caption,
    is_held_out,
    phrasings,
)
from kiln.embedded.scenes import Scene, sample_scene


class FirstChoice(random.Random):
    """Always picks the first synonym, so two captions differ only by their phrasing."""

    def choice(self, seq):
        return seq[0]


def test_grammar_has_hundreds_of_phrasings_and_a_held_out_split():
    train, held = phrasings("train"), phrasings("held_out")
    assert len(held) >= 300 and len(train) >= 10 * len(held) // 2
    assert not set(train) & set(held)
    assert len(train) + len(held) == len(all_phrasings())
    with pytest.raises(ValueError):
        phrasings("test")


def test_split_is_stable():
    assert [p.key for p in phrasings("held_out")[:5]] == [p.key for p in all_phrasings() if is_held_out(p)][
        :5
    ]


def test_held_out_sentences_are_never_produced_by_training_phrasings():
    scene = Scene("red", "circle", "left", "small", "blue")
    train_texts = {caption(scene, p, FirstChoice()) for p in phrasings("train")}
    held_texts = {caption(scene, p, FirstChoice()) for p in phrasings("held_out")}
    assert not train_texts & held_texts


def test_every_caption_names_every_attribute():
    rng = random.Random(0)
    for phrasing in rng.sample(all_phrasings(), 300):
        scene = sample_scene(rng)
        text = caption(scene, phrasing, rng)
        assert any(w in text for w in COLOR_WORDS[scene.color])
        assert any(w in text for w in COLOR_WORDS[scene.background])
        assert any(w in text for w in SHAPE_WORDS[scene.shape])
        assert any(w in text for w in SIZE_WORDS[scene.size])
        assert "{" not in text and " a o" not in text


def test_tokenizer_covers_the_grammar_and_maps_other_words_to_unk():
    from kiln.embedded.components import MAX_TOKENS, build_tokenizer

    tok = build_tokenizer()
    rng = random.Random(1)
    for phrasing in rng.sample(all_phrasings(), 500):
        ids = tok(caption(sample_scene(rng), phrasing, rng)).input_ids
        assert tok.unk_token_id not in ids
        assert len(ids) <= MAX_TOKENS
    ids = tok(
        "a Zebra riding a ünicycle!",
        padding="max_length",
        max_length=MAX_TOKENS,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids.shape == (1, MAX_TOKENS)
    assert tok.unk_token_id in ids[0].tolist()
    empty = tok("", padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids[0]
    assert empty[:2].tolist() == [tok.bos_token_id, tok.eos_token_id]
