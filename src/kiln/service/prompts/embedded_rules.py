"""Follow-ups for the embedded model, attribute by attribute, in the words of its own caption grammar.

A prompt is read clause by clause into a `Picture` (subject, shape, colour, size, position,
background, word); a follow-up changes only the attributes it names; the result is written back in
one canonical phrasing (`render`), which the embedded model's training grammar includes:

    a {size} {color} {shape} {position} on a {background} background
    a {size} {color} {shape} {position} with the word "{WORD}" on it, on a {background} background
    a {size} {color} sign that says "{WORD}" {position} on a {background} background
    the word "{WORD}" in {color} {position} on a {background} background

`{position}` is the grammar's canonical form of each place (`PLACE_FORM`); the word is written in
capitals, as the model draws it; an attribute never said is left out with its words. A clause that is
not wholly understood ("add a hat") is never applied in part: it is kept, in the user's words, after
the canonical phrasing, so nothing said is lost. Pure functions: no I/O, no model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from kiln.embedded.captions import COLOR_WORDS, POSITION_FORMS, SHAPE_WORDS, SIZE_WORDS
from kiln.embedded.scenes import contrast_color

PLACE_FORM = 0
"""Which of the grammar's position forms `render` writes: its first (on the left · on the right · at
the top · at the bottom · in the centre), which the shipped weights learnt and every training split
keeps (the words fine-tune's `on the {position}` form reads oddly and the shipped weights never saw it)."""


@dataclasses.dataclass(frozen=True)
class Picture:
    """What a prompt for the embedded model says; None where it says nothing."""

    subject: str | None = None
    """shape · sign · word (the word alone)"""
    shape: str | None = None
    color: str | None = None
    """The shape's, the sign's or the word's colour."""
    size: str | None = None
    position: str | None = None
    background: str | None = None
    word: str | None = None
    """The word written on the shape or sign (or alone), in capitals as the model draws it."""
    extras: tuple[str, ...] = ()
    """Clauses kept in the user's words (not understood, so never applied)."""


# -- vocabulary: the grammar's own words, and the verbs and comparatives of follow-ups --------------

_COLOR_OF = {w: c for c, words in COLOR_WORDS.items() for w in words}
_SHAPE_OF = {w: s for s, words in SHAPE_WORDS.items() for w in words}
_SHAPE_OF.update({"triangular": "triangle", "round": "circle", "ball": "circle", "rectangle": "square"})
_SIZE_OF = {w: s for s, words in SIZE_WORDS.items() for w in words}
_SIZE_OF.update({"bigger": "large", "larger": "large", "huger": "large", "enlarge": "large",
                 "grow": "large", "smaller": "small", "tinier": "small", "shrink": "small"})
_POSITION_OF = {form: place for place, forms in POSITION_FORMS.items() for form in forms}
_POSITION_OF.update({"left-hand": "left", "right-hand": "right", "left": "left", "right": "right",
                     "top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom", "below": "bottom",
                     "centre": "centre", "center": "centre", "middle": "centre", "centred": "centre",
                     "centered": "centre"})


def _alternation(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOR = _alternation(_COLOR_OF)
_SHAPE = _alternation(_SHAPE_OF)
_BACKDROP = r"(?:background|backdrop|canvas)"
_ARTICLE = r"(?:(?:a|an|the)\s+)?"
_BACKGROUND_PATTERNS = [re.compile(p) for p in (
    rf"\b{_ARTICLE}(?:plain\s+)?({_COLOR})(?:\s+colou?red)?\s+{_BACKDROP}\b",
    rf"\b(?:the\s+)?{_BACKDROP}(?:\s+colou?r)?\s*(?:is|to|into|should be|be|of|in|:|=)?\s*{_ARTICLE}"
    rf"(?:plain\s+)?({_COLOR})\b",
    rf"\b(?:everything else|the rest)\s+(?:is\s+|in\s+|to\s+)?({_COLOR})\b",
    rf"\b(?:set\s+)?against\s+{_ARTICLE}(?:plain\s+)?({_COLOR})\b",
    rf"\bon\s+(?:an?\s+)?(?:plain\s+)?({_COLOR})\b(?!\s+(?:{_SHAPE}|sign|colou?red|one)\b)",
)]
_POSITION = re.compile(rf"(?<![\w-])({_alternation(_POSITION_OF)})(?![\w-])")
_MOVE_UP_DOWN = re.compile(r"\b(?:move|shift|push|put|nudge|bring)\s+(?:it|the\s+\w+(?:\s+\w+)?)?\s*"
                           r"(up|down)\b")
_DEGREE = re.compile(r"\b(?:a\s+(?:little\s+)?bit|a\s+little|a\s+lot|slightly|much|even|way|far|lots)\s+"
                     r"(?=(?:bigger|larger|smaller|tinier|huger)\b)")
_SIZE = re.compile(rf"\b({_alternation(_SIZE_OF)})\b")
_SHAPE_WORD = re.compile(rf"\b({_SHAPE})\b")
_COLOR_WORD = re.compile(rf"\b({_COLOR})\b")
_FROM = re.compile(r"\b(?:from|instead of|rather than|not)\s+(?:the\s+|a\s+|an\s+)?[\w-]+"
                   r"(?:\s+(?:side|half|one|" + _SHAPE + r"))?(?=\s|$)")
_QUOTED = re.compile(r"\"([^\"]{1,64})\"|“([^”]{1,64})”|(?<![\w])'([^'\s][^']{0,63})'(?![\w])")
_SAYS = re.compile(r"\b(?:say|says|saying|read|reads|reading|spell|spells|spelling|write|writes|written)"
                   r"\s+(?:the\s+(?:word|text)\s+)?([A-Za-z0-9][\w!?-]{0,63})")
_THE_WORD = re.compile(r"\bthe\s+(?:word|text)\s+([A-Za-z0-9][\w!?-]{0,63})")
_NO_WORD = re.compile(r"\b(?:remove|delete|erase|drop)\s+(?:the\s+)?(?:word|text|writing|letters)\b|"
                      r"\b(?:without|no)\s+(?:the\s+|any\s+)?(?:word|words|text|writing|letters)\b")
_WORD_ALONE = re.compile(r"\b(?:just|only)\s+the\s+(?:word|text)\b")
_SIGN = re.compile(r"\b(?:sign|signboard|board|placard|label)\b")
_CLAUSE_BREAK = re.compile(r"(\s*[.;!?]+(?:\s+|$)|\s*,\s*(?:and\s+|then\s+)?|\s+and\s+(?:then\s+)?|"
                           r"\s+then\s+|\s+but\s+)")
_TOKEN = re.compile(r"[a-z']+|\d+")

# Words a clause may hold besides the attributes and still be wholly understood.
FILLERS = frozenset("""
a an the it its it's this that these those now please pls can could would you will i i'd i'm want
like to make turn change set move put place shift push nudge bring be is are was should so and then
also instead just only same but keep let let's lets me us draw paint show render there here picture
image photo one thing object shape colour color coloured colored in into on at of with side half hand
edge near toward towards over against plain background backdrop canvas word words text say says
saying read reads written write letters sign go goes bit little slightly much more even way lot far
very really too rest everything else up down top bottom do try again instead rather than not from
give have has make made ok okay great nice thanks thank cool good perfect awesome lovely hmm hey
yes yeah wow love size as well some kind sort signboard board placard label labelled labeled
reading marked bearing lettering spell spelling writing switch swap replace convert transform recolour
recolor fill use slide drag position
""".split())


def _words_of(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _quoted_word(text: str) -> tuple[str | None, str]:
    """The quoted word (as typed) and the text without it."""
    match = _QUOTED.search(text)
    if match is None:
        return None, text
    word = next(g for g in match.groups() if g is not None).strip()
    return word or None, text[: match.start()] + " " + text[match.end():]


def _bare_word(text: str) -> tuple[str | None, str]:
    """An unquoted word after "say", "says", "the word" … that is no word of the grammar."""
    for pattern in (_SAYS, _THE_WORD):
        for match in pattern.finditer(text):
            word = match.group(1).rstrip("!?.-")
            lower = word.lower()
            if word and lower not in FILLERS and lower not in _COLOR_OF and lower not in _SHAPE_OF:
                return word, text[: match.start(1)] + " " + text[match.end(1):]
    return None, text


def _pick(found: list[str], current: str | None) -> str | None:
    """Of the values a clause names, the new one: "make the red circle green" names red (the current
    colour) and green. None when it names none, or several without one being the current value."""
    distinct = list(dict.fromkeys(found))
    if len(distinct) == 1:
        return distinct[0]
    if len(distinct) == 2 and current in distinct:
        return distinct[1] if distinct[0] == current else distinct[0]
    return None


def _remove(text: str, pattern: re.Pattern[str]) -> tuple[list[str], str]:
    found = [m.group(1) for m in pattern.finditer(text)]
    return found, pattern.sub(" ", text)


def apply_clause(picture: Picture, clause: str) -> Picture | None:
    """`picture` changed by one clause, or None if the clause holds a word the rules do not know
    (or names two values of one attribute), so that it must be kept as said."""
    word, text = _quoted_word(clause)
    if word is None:
        word, text = _bare_word(text)
    text = re.sub(r"['’]s\b", " ", text.lower().replace("’", "'"))  # "the circle's colour"
    remove_word = bool(_NO_WORD.search(text))
    text = _NO_WORD.sub(" ", text)
    word_alone = bool(_WORD_ALONE.search(text))
    text = _FROM.sub(" ", text)  # "from red to green", "instead of the circle": the old value
    changes: dict[str, str | None] = {}
    backgrounds: list[str] = []
    for pattern in _BACKGROUND_PATTERNS:
        found, text = _remove(text, pattern)
        backgrounds += [_COLOR_OF[c] for c in found]
    moved, text = _remove(text, _MOVE_UP_DOWN)
    places, text = _remove(text, _POSITION)
    places = [_POSITION_OF[p] for p in places] + ["top" if m == "up" else "bottom" for m in moved]
    text = _DEGREE.sub(" ", text)
    sizes, text = _remove(text, _SIZE)
    shapes, text = _remove(text, _SHAPE_WORD)
    colors, text = _remove(text, _COLOR_WORD)
    if any(w not in FILLERS for w in _words_of(text)):
        return None
    for name, found, current in (
        ("background", backgrounds, picture.background),
        ("position", places, picture.position),
        ("size", [_SIZE_OF[s] for s in sizes], picture.size),
        ("shape", [_SHAPE_OF[s] for s in shapes], picture.shape),
        ("color", [_COLOR_OF[c] for c in colors], picture.color),
    ):
        if found:
            value = _pick(found, current)
            if value is None:
                return None
            changes[name] = value
    subject = picture.subject
    if _SIGN.search(text):
        subject = "sign"
    elif "shape" in changes and subject != "shape":
        subject = "shape"
    elif word_alone:
        subject = "word"
    if word is not None:
        changes["word"] = word.upper()
        subject = subject or "word"
    elif remove_word:
        if subject in ("sign", "word"):
            return None  # a sign or a word with nothing written has no phrasing of its own
        changes["word"] = None
    if subject == "word" and "size" in changes:
        return None  # the word alone has no size in the grammar: keep the user's words instead
    return dataclasses.replace(picture, subject=subject, **changes)


def _clauses(text: str) -> list[tuple[str, str]]:
    """(clause, the separator after it), the quoted word kept whole."""
    quoted = [m.group(0) for m in _QUOTED.finditer(text)]
    masked = _QUOTED.sub(lambda m: f"\x00{quoted.index(m.group(0))}\x00", text)
    parts = _CLAUSE_BREAK.split(masked)
    pairs = [(parts[i], parts[i + 1] if i + 1 < len(parts) else "") for i in range(0, len(parts), 2)]

    def unmask(s: str) -> str:
        return re.sub(r"\x00(\d+)\x00", lambda m: quoted[int(m.group(1))], s)

    return [(unmask(c), unmask(sep)) for c, sep in pairs]


def read(text: str, picture: Picture | None = None) -> Picture:
    """`picture` (empty by default) changed by each clause of `text` in turn; runs of clauses that are
    not understood become one extra each, in the user's words (separators included)."""
    picture = picture or Picture()
    kept: list[str] = []
    run = ""
    for clause, separator in _clauses(text):
        if not clause.strip():
            continue
        changed = apply_clause(picture, clause)
        if changed is None:
            run += clause + separator
            continue
        if run:
            kept.append(run)
            run = ""
        picture = changed
    if run:
        kept.append(run)
    extras = list(picture.extras)
    for extra in (_tidy(k) for k in kept):
        if extra and extra not in extras:
            extras.append(extra)
    return dataclasses.replace(picture, subject=_subject(picture), extras=tuple(extras))


def _tidy(text: str) -> str:
    return " ".join(text.split()).strip(" ,;.")


def _subject(picture: Picture) -> str | None:
    if picture.subject is not None:
        return picture.subject
    if picture.shape is not None:
        return "shape"
    return "word" if picture.word is not None else None


def _with_article(text: str) -> str:
    return ("an " if text[0] in "aeiou" else "a ") + text


def _background(picture: Picture) -> str:
    return f"on {_with_article(picture.background + ' background')}" if picture.background else ""


def render(picture: Picture) -> str | None:
    """The canonical phrasing of `picture` (its extras after it), or None when it has no subject."""
    subject = _subject(picture)
    if subject is None or (subject in ("sign", "word") and picture.word is None):
        return None
    place = POSITION_FORMS[picture.position][PLACE_FORM] if picture.position else ""
    quoted = f'"{picture.word}"' if picture.word is not None else ""
    if subject == "word":
        parts = [f"the word {quoted}", f"in {picture.color}" if picture.color else "", place,
                 _background(picture)]
    else:
        noun = " ".join(w for w in (picture.size, picture.color, picture.shape or "shape") if w)
        if subject == "sign":
            noun = " ".join(w for w in (picture.size, picture.color, "sign") if w) + f" that says {quoted}"
            parts = [_with_article(noun), place, _background(picture)]
        elif picture.word is not None:
            background = _background(picture)
            clause = f"with the word {quoted} on it" + ("," if background else "")
            parts = [_with_article(noun), place, clause, background]
        else:
            parts = [_with_article(noun), place, _background(picture)]
    text = " ".join(p for p in parts if p)
    return ". ".join([text, *picture.extras])


def compose(previous: str, instruction: str) -> str | None:
    """The prompt after `instruction`, in the canonical phrasing; None when `previous` does not read as
    a picture the embedded model draws (the caller then keeps both in the user's words)."""
    before = read(previous)
    if render(before) is None:
        return None
    return render(read(instruction, before))


FIRST_PROMPT_DEFAULTS = {"color": "red", "size": "large", "position": "centre"}
"""What a first prompt that leaves it unsaid gets: the grammar's captions always say a shape's colour,
size and place (and a word alone's colour), so a prompt without them is one the model never saw."""
BACKGROUND_CHOICES = ("white", "black", "blue")
"""An unsaid background: the first of these that is neither the object's colour nor its letters'."""


def complete(prompt: str) -> str | None:
    """A first prompt in the canonical phrasing, with what the training captions always say and the user
    left unsaid filled in (as DALL·E 3 revises a prompt before drawing it): `a blue circle with the word
    "HELLO" on it` → `a large blue circle in the centre with the word "HELLO" on it, on a white
    background`. None when `prompt` does not read as a picture the embedded model draws."""
    picture = read(prompt)
    subject = _subject(picture)
    if render(picture) is None:
        return None
    fill: dict[str, str] = {}
    if subject == "shape":
        fill = dict(FIRST_PROMPT_DEFAULTS)
    elif subject == "word":
        fill = {"color": FIRST_PROMPT_DEFAULTS["color"]}
    filled = dataclasses.replace(picture, **{k: v for k, v in fill.items() if getattr(picture, k) is None})
    if filled.background is None:
        colour = filled.color or "white"  # a sign said without a colour is white
        letters = colour if subject == "word" else contrast_color(colour) if filled.word else None
        background = next(c for c in BACKGROUND_CHOICES if c not in (colour, letters))
        filled = dataclasses.replace(filled, background=background)
    return render(filled)
