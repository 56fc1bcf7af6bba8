"""The letter-slot targets the text encoder is grounded with in the UNet stage: each letter of a
quoted word, its place in the word, and the word's length at the closing quote."""

from kiln.embedded import components
from kiln.embedded.scenes import LETTERS
from kiln.embedded.train_text import letter_slot_targets, tokenize


def test_every_letter_of_a_quoted_word_gets_its_letter_and_place():
    tokenizer = components.build_tokenizer()
    ids = tokenize(tokenizer, ['a sign that says "KILN" on a green background', "a red circle", 'the word "GO"'])
    letters, closings = letter_slot_targets(tokenizer, ids)
    by_row = {b: [(LETTERS[letter], slot) for row, _, letter, slot in letters.tolist() if row == b] for b in range(3)}
    assert by_row == {0: [("K", 0), ("I", 1), ("L", 2), ("N", 3)], 1: [], 2: [("G", 0), ("O", 1)]}
    # each letter's position in the token ids is a letter token, and the closing quote follows the word
    quote = tokenizer.convert_tokens_to_ids('"')
    for row, pos, letter, _ in letters.tolist():
        assert ids[row, pos] == tokenizer.convert_tokens_to_ids(LETTERS[letter].lower())
    assert [(row, length + 1) for row, _, length in closings.tolist()] == [(0, 4), (2, 2)]
    assert all(ids[row, pos] == quote for row, pos, _ in closings.tolist())


def test_a_quote_that_is_not_a_word_of_letters_is_skipped():
    tokenizer = components.build_tokenizer()
    letters, closings = letter_slot_targets(tokenizer, tokenize(tokenizer, ['a sign that says "TOOLONGWORD"', '""']))
    assert len(letters) == 0 and len(closings) == 0
