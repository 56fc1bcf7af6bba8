"""Captions for scenes with words (a shape with a word on it, a sign, a word alone), with a fixed
train / held-out split of phrasings like the shape grammar's, and a fixed split of the words
themselves: HELD_OUT_WORDS are real-looking words that are never drawn in training.

The quoted word is always written in capitals between double quotes; the tokenizer spells what
is between quotes letter by letter, so any word can be asked for.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from kiln.embedded import captions as shape_captions
from kiln.embedded.captions import (
    BACKGROUND_CLAUSE,
    BACKGROUND_LEADING,
    BACKGROUND_TRAILING,
    COLOR_WORDS,
    ENDINGS,
    PREFIXES,
    Phrasing,
    hash_held_out,
)
from kiln.embedded.scenes import WORD_LENGTHS, Scene, random_word

# Clauses that put the word on a shape; {w} is the quoted word.
WORD_CLAUSES = (
    "with the word {w} on it",
    "that says {w}",
    "reading {w}",
    "labelled {w}",
    "with {w} written on it",
    "with the text {w}",
    "bearing the word {w}",
    "marked {w}",
    "with the letters {w} on it",
    "labeled {w}",
)
# Sign noun phrases, in pairs: without the sign's colour (only for a white sign), and with it ({c}).
SIGN_FORMS = (
    ("{a} sign that says {w}", "{a} {c} sign that says {w}"),
    ("{a} sign reading {w}", "{a} {c} sign reading {w}"),
    ("{a} sign with the word {w}", "{a} {c} sign with the word {w}"),
    ("{a} sign labelled {w}", "{a} {c} sign labelled {w}"),
    ("{a} sign with {w} written on it", "{a} {c} sign with {w} on it"),
    ("{a} board that says {w}", "{a} {c} board that says {w}"),
    ("{a} signboard reading {w}", "{a} {c} signboard reading {w}"),
    ("{a} placard saying {w}", "{a} {c} placard saying {w}"),
    ("{a} sign with the text {w}", "{a} {c} sign with the text {w}"),
    ("{a} label that says {w}", "{a} {c} label that says {w}"),
)
# A word alone; {t} is the letters' colour.
WORD_FORMS = (
    "the word {w} in {t}",
    "the word {w} written in {t}",
    "{w} in {t} letters",
    "{w} written in {t}",
    "the text {w} in {t}",
    "{t} letters that spell {w}",
    "{t} text reading {w}",
    "the word {w} in {t} letters",
    "{t} lettering that says {w}",
    "the letters {w} in {t}",
    "{t} writing that says {w}",
)
# Frames for signs and words: {x} prefix, {s} the sign or word phrase, {t} trailing background,
# {l} leading background, {k} background clause.
FRAMES = (
    ("{x}{s} {t}", "t"),
    ("{l}, {x}{s}", "l"),
    ("{x}{s}. {k}", "k"),
    ("{x}{s}, and {k}", "k"),
    ("{k}, with {s}", "k"),
    ("{x}{s} in the middle {t}", "t"),
)
_TABLES = {"t": BACKGROUND_TRAILING, "l": BACKGROUND_LEADING, "k": BACKGROUND_CLAUSE}

HELD_OUT_WORDS = tuple(
    """
    ACE ACT AIR ALL ANT APE ARM ART ASH BAG BAT BED BEE BIG BOX BUS CAKE CAMP CAT COW CUP DAY
    DOG DOOR DUCK EAR EGG ELF FAN FARM FISH FLAG FOX FROG GAME GATE GOLD HAT HEN HILL HOME HOPE
    ICE INK JAM JAR JET KEY KID KING KITE LAKE LAMP LEAF LION LOG MAP MILK MOON MOUSE NEST NET
    NOTE OAK OWL PAN PEN PIG PINE RAIN RING ROAD ROSE SALT SAND SEED SHIP SHOE SNOW SOAP SOCK
    STAR SUN TAXI TEA TENT TIGER TOY TREE VAN VASE WAVE WEB WOLF WOOD YARN ZEBRA ZOO APPLE BREAD
    CHAIR CLOUD DREAM EARTH GHOST GRAPE HONEY HOUSE JUICE LEMON MAGIC MUSIC OCEAN PIANO PIZZA
    QUEEN RIVER ROBOT SMILE STONE SUGAR TABLE TRAIN WATER WHALE BRIDGE CASTLE DRAGON FOREST
    GARDEN JUNGLE MARKET ORANGE PENCIL PLANET POCKET ROCKET SILVER SPRING TURTLE WINDOW YELLOW
    """.split()
)
"""Real words never drawn in training (the scorecard asks for them)."""
TRAINING_WORDS = tuple(
    """
    KILN OPEN STOP SALE EXIT HELLO WORLD CAFE SHOP BANK HOTEL PARK BOOK FIRE LOVE HELP PUSH PULL
    YES NO OK GO UP ON OFF IN OUT NEW OLD HOT COLD BEST FREE MENU NEAR FAR LEFT RIGHT
    BIRD BOAT CAR CLOCK CODE CORN DESK DRUM FORK GIFT GIRL BOY HAND HEART HORSE JUMP LAND LIGHT
    MAIL MILE NAME NIGHT PAPER PARTY PHONE PLANT RADIO ROOM SEA SHIRT SKY SOUP SPOON SPORT STORE
    STREET TOWN TRUCK WALL WINE WIND WINTER SUMMER AUTUMN PEACE POWER QUIET RED BLUE GREEN BLACK
    WHITE PINK GRAY BROWN MAPLE OLIVE PEARL ROYAL SOLAR TIMBER VELVET ZONE QUIZ JAZZ FIZZ
    """.split()
)
"""Real words drawn in training, beside random letter strings (so training words include some
that read like words). None is a held-out word."""
REAL_WORD_SHARE = 0.25


def is_held_out_word(word: str) -> bool:
    return word in _held_out_set()


@lru_cache(maxsize=1)
def _held_out_set() -> frozenset[str]:
    return frozenset(HELD_OUT_WORDS)


def training_word(rng: random.Random) -> str:
    """A word for a training scene: a real training word, or a random 2–6 letter string that is
    not a held-out word."""
    if rng.random() < REAL_WORD_SHARE:
        return rng.choice(_training_words())
    while True:
        word = random_word(rng)
        if not is_held_out_word(word):
            return word


def is_training_word(word: str) -> bool:
    """2–6 capitals A–Z and not held out."""
    return WORD_LENGTHS[0] <= len(word) <= WORD_LENGTHS[1] and word.isascii() and word.isalpha() \
        and word.isupper() and not is_held_out_word(word)


@lru_cache(maxsize=1)
def _training_words() -> tuple[str, ...]:
    return tuple(sorted({w for w in TRAINING_WORDS if is_training_word(w)}))


def quoted(word: str) -> str:
    return f'"{word}"'


@dataclass(frozen=True)
class TextPhrasing:
    """The structure of a caption of a sign or word: indices into this module's tables."""

    kind: str
    frame: int
    prefix: int
    form: int
    background: int
    ending: int

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.frame}.{self.prefix}.{self.form}.{self.background}.{self.ending}"


CANONICAL_TEXT = (TextPhrasing("sign", 0, 0, 0, 0, 0), TextPhrasing("word", 0, 0, 0, 0, 0))
"""`a [colour] sign that says "W" on a {bg} background`, `the word "W" in {t} on a {bg} background`."""


def all_text_phrasings(kind: str) -> list[TextPhrasing]:
    forms = SIGN_FORMS if kind == "sign" else WORD_FORMS
    out = []
    for frame, (text, table) in enumerate(FRAMES):
        prefixes = range(len(PREFIXES)) if "{x}" in text else range(1)
        for prefix, form, background, ending in itertools.product(
            prefixes, range(len(forms)), range(len(_TABLES[table])), range(len(ENDINGS))
        ):
            out.append(TextPhrasing(kind, frame, prefix, form, background, ending))
    return out


def is_held_out_text(phrasing: TextPhrasing) -> bool:
    return phrasing not in CANONICAL_TEXT and hash_held_out(phrasing.key)


@lru_cache(maxsize=4)
def text_phrasings(kind: str, split: str) -> tuple[TextPhrasing, ...]:
    if split not in ("train", "held_out"):
        raise ValueError(f"unknown split {split!r}")
    want = split == "held_out"
    return tuple(p for p in all_text_phrasings(kind) if is_held_out_text(p) == want)


def _clean(text: str) -> str:
    text = shape_captions._with_articles(text)
    text = re.sub(r",\s*,", ",", text).replace(",.", ".").replace(", .", ".")
    return re.sub(r"\s+", " ", text).strip().rstrip(",")


def text_caption(scene: Scene, phrasing: TextPhrasing, rng: random.Random) -> str:
    """Describe a sign or word scene with `phrasing`."""
    w = quoted(scene.word)
    if scene.kind == "sign":
        plain, coloured = SIGN_FORMS[phrasing.form]
        form = plain if scene.color == "white" and rng.random() < 0.5 else coloured
        phrase = form.format(a="{a}", c=rng.choice(COLOR_WORDS[scene.color]), w=w)
    else:
        phrase = WORD_FORMS[phrasing.form].format(t=rng.choice(COLOR_WORDS[scene.text_color]), w=w)
    frame, table = FRAMES[phrasing.frame]
    bg = _TABLES[table][phrasing.background].format(a="{a}", b=rng.choice(COLOR_WORDS[scene.background]))
    text = frame.format(x=PREFIXES[phrasing.prefix], s=phrase, t=bg, l=bg, k=bg)
    return _clean(text) + ENDINGS[phrasing.ending]


def shape_word_caption(scene: Scene, phrasing: Phrasing, clause: int, rng: random.Random) -> str:
    """A shape caption with a word clause: after the position (`... on the left with the word
    "W" on it, on a blue background`) when the position follows the noun, else after the noun."""
    text = shape_captions.caption(scene, phrasing, rng)
    position_forms = shape_captions.POSITION_FORMS[scene.position]
    where = position_forms[phrasing.position]
    wc = WORD_CLAUSES[clause].format(w=quoted(scene.word))
    frame = shape_captions.FRAMES[phrasing.frame][0]
    if frame.index("{p}") > frame.index("{np}") and where in text:
        i = text.index(where) + len(where)
        rest = text[i:]
        sep = "," if rest.strip() and not rest.lstrip().startswith((",", ".")) else ""
        return _clean(text[:i] + " " + wc + sep + rest)
    return _clean(text.replace(where, f"{where} {wc}", 1) if where in text else f"{text} {wc}")


def shape_word_held_out(phrasing: Phrasing, clause: int) -> bool:
    if phrasing == shape_captions.CANONICAL and clause == 0:
        return False
    return hash_held_out(f"word.{phrasing.key}.{clause}")


def describe(scene: Scene, rng: random.Random, split: str = "train") -> str:
    """A caption for a scene of any kind, in a random phrasing of `split`."""
    if scene.kind == "shape":
        return shape_captions.sample_caption(scene, rng, split)
    if scene.kind == "shape_word":
        pool = shape_captions.all_phrasings_cached()
        while True:
            phrasing, clause = rng.choice(pool), rng.randrange(len(WORD_CLAUSES))
            if shape_word_held_out(phrasing, clause) == (split == "held_out"):
                return shape_word_caption(scene, phrasing, clause, rng)
    return text_caption(scene, rng.choice(text_phrasings(scene.kind, split)), rng)


def vocabulary_texts() -> list[str]:
    texts = list(WORD_CLAUSES) + [f for pair in SIGN_FORMS for f in pair] + list(WORD_FORMS)
    texts += [f[0] for f in FRAMES]
    return [re.sub(r"\{\w+\}", " ", t) for t in texts] + ['"']


assert max(len(w) for w in HELD_OUT_WORDS) <= WORD_LENGTHS[1]
