"""The scorecard's page is written from a saved result: its numbers and how the weights were trained."""

import copy
import json
from pathlib import Path

from kiln.embedded.scorecard_doc import write_doc

RESULT = json.loads((Path(__file__).parents[2] / "docs" / "embedded-scorecard.json").read_text())


def test_the_page_quotes_the_held_out_word_accuracy(tmp_path):
    page = tmp_path / "embedded-model.md"
    write_doc(page, RESULT)
    text = page.read_text()
    words = RESULT["words_held_out"]["words"]
    assert f"{words * 100:.1f} %" in text
    assert "What falls short" in text


def test_a_run_that_went_on_from_earlier_weights_says_so(tmp_path):
    result = copy.deepcopy(RESULT)
    training = result["training"]
    first = {"recipe": training["recipe"], "unet_steps_done": 6_000}  # trained from scratch
    earlier = {"recipe": training["recipe"], "unet_steps_done": 3_200, "continued_from": first}
    training["recipe"] |= {"init_from": "src/kiln/embedded/model", "seed": 1235, "letter_losses_by": 0}
    training |= {"continued_from": earlier, "unet_steps_done": 4_400}
    page = tmp_path / "embedded-model.md"
    write_doc(page, result)
    text = page.read_text()
    # every run the starting weights went through counts: 6,000 from scratch, then 3,200 more
    assert "UNet then trained 9,200 steps) for 4,400 more UNet steps" in text
    assert "seed 1235" in text
    assert "on from this run's first step" in text
