"""A compositional caption grammar for procedural scenes, with a fixed train / held-out split.

A *phrasing* is the structure of a caption with the scene left out: the sentence frame (clause
order), prefix, noun-phrase form, position form, background form and ending. Whole phrasings are
held out by a stable hash, so the scorecard can ask the model for sentences it never saw. Synonyms
(small/little/tiny, circle/disc/dot, ...) are drawn per caption, in both splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from kiln.embedded.scenes import COLORS, SHAPES, Scene

HELD_OUT_PERCENT = 12

COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet"),
    "orange": ("orange",),
    "yellow": ("yellow",),
    "green": ("green",),
    "blue": ("blue",),
    "purple": ("purple", "violet"),
    "white": ("white",),
    "black": ("black",),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk", "dot", "round shape"),
    "square": ("square", "box", "block", "square shape"),
    "triangle": ("triangle", "triangle shape", "triangular shape"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}
# Position forms: the k-th entry of every list is the same phrasing for another place.
POSITION_FORMS: dict[str, tuple[str, ...]] = {
    "left": (
        "on the left",
        "at the left",
        "to the left",
        "on the left side",
        "in the left half",
        "on the left-hand side",
        "on the left",
    ),
    "right": (
        "on the right",
        "at the right",
        "to the right",
        "on the right side",
        "in the right half",
        "on the right-hand side",
        "on the right",
    ),
    "top": (
        "at the top",
        "near the top",
        "up top",
        "at the top edge",
        "in the upper half",
        "at the top of the picture",
        "on the top",
    ),
    "bottom": (
        "at the bottom",
        "near the bottom",
        "down below",
        "at the bottom edge",
        "in the lower half",
        "at the bottom of the picture",
        "on the bottom",
    ),
    "centre": (
        "in the centre",
        "in the center",
        "in the middle",
        "at the centre",
        "in the middle of the picture",
        "right in the middle",
        "on the centre",
    ),
}
N_POSITION_FORMS = 7
CANONICAL_POSITION_FORM = 6
"""`on the {position}`: the form the prompt composer writes (`on the centre` included)."""
# Noun-phrase forms for the object: {a} is the article, {s} size, {c} colour, {n} shape.
NOUN_FORMS = (
    "{a} {s} {c} {n}",
    "{a} {s} {n} in {c}",
    "{a} {c} {n} that is {s}",
    "{a} {s} {n} coloured {c}",
    "{a} {n} that is {s} and {c}",
    "{a} {s} {c} coloured {n}",
    "{a} {c} {n}, {s},",
)
# Background forms that follow the object ({b} is the colour).
BACKGROUND_TRAILING = (
    "on {a} {b} background",
    "against {a} {b} background",
    "over {a} {b} backdrop",
    "with {a} {b} background",
    "on {b}",
    "on a plain {b} background",
    "set against {b}",
)
# Background forms that open the sentence, before a comma.
BACKGROUND_LEADING = (
    "on {a} {b} background",
    "against {b}",
    "{b} background",
    "over {a} {b} backdrop",
    "on plain {b}",
)
# Background forms that stand as a clause of their own.
BACKGROUND_CLAUSE = (
    "the background is {b}",
    "the backdrop is {b}",
    "everything else is {b}",
    "the rest is {b}",
    "the background colour is {b}",
)
PREFIXES = (
    "",
    "draw ",
    "paint ",
    "show ",
    "an image of ",
    "a picture of ",
    "please draw ",
    "there is ",
    "render ",
)
ENDINGS = ("", ".")
# Frames: the clause order. {np} object, {p} position, {t} trailing background,
# {l} leading background, {k} background clause, {x} prefix.
FRAMES = (
    ("{x}{np} {p} {t}", "t"),
    ("{x}{np} {t} {p}", "t"),
    ("{p}, {x}{np} {t}", "t"),
    ("{l}, {x}{np} {p}", "l"),
    ("{x}{np} {p}. {k}", "k"),
    ("{k}. {x}{np} {p}", "k"),
    ("{x}{np} {p}, and {k}", "k"),
    ("{k}, with {np} {p}", "k"),
    ("{x}{bnp} with {np} {p}", "n"),
)
# Background as a noun phrase, for the last frame.
BACKGROUND_NOUN = ("{a} {b} background", "{a} plain {b} backdrop", "{a} {b} canvas")


@dataclass(frozen=True)
class Phrasing:
    """The structure of one caption: indices into the grammar's tables."""

    frame: int
    prefix: int
    noun: int
    position: int
    background: int
    ending: int

    @property
    def key(self) -> str:
        return f"{self.frame}.{self.prefix}.{self.noun}.{self.position}.{self.background}.{self.ending}"


def _background_table(frame: int) -> tuple[str, ...]:
    kind = FRAMES[frame][1]
    return {"t": BACKGROUND_TRAILING, "l": BACKGROUND_LEADING, "k": BACKGROUND_CLAUSE, "n": BACKGROUND_NOUN}[
        kind
    ]


def all_phrasings() -> list[Phrasing]:
    """Every phrasing the grammar can produce, in a fixed order."""
    out = []
    for frame in range(len(FRAMES)):
        prefixes = range(len(PREFIXES)) if "{x}" in FRAMES[frame][0] else range(1)
        for prefix, noun, position, background, ending in itertools.product(
            prefixes,
            range(len(NOUN_FORMS)),
            range(N_POSITION_FORMS),
            range(len(_background_table(frame))),
            range(len(ENDINGS)),
        ):
            out.append(Phrasing(frame, prefix, noun, position, background, ending))
    return out


CANONICAL = Phrasing(0, 0, 0, CANONICAL_POSITION_FORM, 0, 0)
"""`a {size} {color} {shape} on the {position} on a {background} background`: always trained."""


def hash_held_out(key: str) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


def is_held_out(phrasing: Phrasing) -> bool:
    """A stable split: the same phrasings are held out on every machine and every run.

    Position form 0 and the canonical form say the same for left and right ("on the left"), so
    twins that differ only in those two forms are held out together or not at all: no held-out
    sentence is ever one a training phrasing makes."""
    if phrasing.position not in (0, CANONICAL_POSITION_FORM):
        return hash_held_out(phrasing.key)
    twins = [dataclasses.replace(phrasing, position=k) for k in (0, CANONICAL_POSITION_FORM)]
    return CANONICAL not in twins and all(hash_held_out(t.key) for t in twins)


@lru_cache(maxsize=2)
def _phrasings(split: str) -> tuple[Phrasing, ...]:
    want = split == "held_out"
    return tuple(p for p in all_phrasings() if is_held_out(p) == want)


def phrasings(split: str) -> list[Phrasing]:
    """The phrasings of one split: "train" or "held_out"."""
    if split not in ("train", "held_out"):
        raise ValueError(f"unknown split {split!r}")
    return list(_phrasings(split))


@lru_cache(maxsize=1)
def all_phrasings_cached() -> tuple[Phrasing, ...]:
    return tuple(all_phrasings())


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _with_articles(text: str) -> str:
    # "{a}" placeholders become "a" or "an" according to the word that follows.
    return re.sub(r"\{a\} (\w)", lambda m: f"{_article(m.group(1))} {m.group(1)}", text)


def caption(scene: Scene, phrasing: Phrasing, rng: random.Random) -> str:
    """Describe `scene` with `phrasing`, drawing synonyms from `rng`."""
    words = {
        "s": rng.choice(SIZE_WORDS[scene.size]),
        "c": rng.choice(COLOR_WORDS[scene.color]),
        "n": rng.choice(SHAPE_WORDS[scene.shape]),
    }
    noun = NOUN_FORMS[phrasing.noun].format(a="{a}", **words)
    bg_word = rng.choice(COLOR_WORDS[scene.background])
    bg = _background_table(phrasing.frame)[phrasing.background].format(a="{a}", b=bg_word)
    frame = FRAMES[phrasing.frame][0]
    text = frame.format(
        x=PREFIXES[phrasing.prefix],
        np=noun,
        p=POSITION_FORMS[scene.position][phrasing.position],
        t=bg,
        l=bg,
        k=bg,
        bnp=bg,
    )
    text = _with_articles(text).replace(",,", ",").replace(",.", ".").rstrip(",")
    return text + ENDINGS[phrasing.ending]


def sample_caption(
    scene: Scene, rng: random.Random, split: str = "train", pool: list[Phrasing] | None = None
) -> str:
    """A caption for `scene` in a random phrasing of `split`."""
    return caption(scene, rng.choice(pool if pool is not None else _phrasings(split)), rng)


def vocabulary_texts() -> list[str]:
    """Every fragment of text the grammar can emit, for building the tokenizer's vocabulary."""
    texts = [
        " ".join(w)
        for table in (COLOR_WORDS, SHAPE_WORDS, SIZE_WORDS, POSITION_FORMS)
        for w in table.values()
    ]
    texts += list(NOUN_FORMS + BACKGROUND_TRAILING + BACKGROUND_LEADING + BACKGROUND_CLAUSE)
    texts += list(PREFIXES + ENDINGS + BACKGROUND_NOUN) + [f[0] for f in FRAMES]
    texts += ["a an", "colour color colored background backdrop", " ".join(COLORS), " ".join(SHAPES)]
    return [re.sub(r"\{\w+\}", " ", t) for t in texts]
