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


def test_the_composers_phrasings_are_trained_exactly():
    from kiln.embedded import text_captions as tc
    from kiln.embedded.captions import CANONICAL

    assert not is_held_out(CANONICAL) and CANONICAL in phrasings("train")
    rng = FirstChoice()
    assert caption(Scene("red", "circle", "left", "large", "blue"), CANONICAL, rng) == (
        "a large red circle on the left on a blue background"
    )
    assert caption(Scene("red", "circle", "centre", "large", "blue"), CANONICAL, rng) == (
        "a large red circle on the centre on a blue background"
    )
    word_scene = Scene("red", "circle", "top", "small", "blue", "KILN", "white", "shape_word")
    assert not tc.shape_word_held_out(CANONICAL, 0)
    assert tc.shape_word_caption(word_scene, CANONICAL, 0, rng) == (
        'a small red circle on the top with the word "KILN" on it, on a blue background'
    )
    sign, word = tc.CANONICAL_TEXT
    assert sign in tc.text_phrasings("sign", "train") and word in tc.text_phrasings("word", "train")
    white = Scene("white", "sign", "centre", "large", "green", "KILN", "black", "sign")
    red = Scene("red", "sign", "centre", "large", "green", "KILN", "white", "sign")
    texts = {tc.text_caption(white, sign, random.Random(i)) for i in range(20)}
    assert texts == {'a sign that says "KILN" on a green background', 'a white sign that says "KILN" on a green background'}
    assert tc.text_caption(red, sign, rng) == 'a red sign that says "KILN" on a green background'
    alone = Scene("red", "text", "centre", "large", "green", "KILN", "red", "word")
    assert tc.text_caption(alone, word, rng) == 'the word "KILN" in red on a green background'


def test_text_captions_quote_the_word_and_held_out_words_are_never_trained():
    from kiln.embedded import text_captions as tc
    from kiln.embedded.components import MAX_TOKENS, build_tokenizer
    from kiln.embedded.scenes import sample_any_scene

    assert len(tc.HELD_OUT_WORDS) >= 100 and not set(tc.HELD_OUT_WORDS) & set(tc.TRAINING_WORDS)
    assert all(map(tc.is_training_word, tc.TRAINING_WORDS)) and not any(map(tc.is_training_word, tc.HELD_OUT_WORDS))
    rng = random.Random(2)
    assert not {tc.training_word(rng) for _ in range(20000)} & set(tc.HELD_OUT_WORDS)
    tok = build_tokenizer()
    for split in ("train", "held_out"):
        for _ in range(300):
            scene = sample_any_scene(rng, tc.training_word)
            text = tc.describe(scene, rng, split)
            ids = tok(text).input_ids
            assert tok.unk_token_id not in ids and len(ids) <= MAX_TOKENS, text
            if scene.word:
                assert f'"{scene.word}"' in text and any(w in text for w in COLOR_WORDS[scene.background])


def test_tokenizer_spells_quoted_words_letter_by_letter():
    from kiln.embedded.components import build_tokenizer

    tok = build_tokenizer()
    tokens = tok.convert_ids_to_tokens(tok('a sign that says "ZEBRA" on a green background').input_ids)
    assert tokens[5:12] == ['"', "z", "e", "b", "r", "a", '"']
    assert tok.unk_token_id not in tok("the word \u201cQUIZ\u201d in red on a black background").input_ids
    assert tok("the word zebra").input_ids[-2] == tok.unk_token_id  # unquoted, it is just an unknown word
