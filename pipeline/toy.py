"""The embedded toy dataset: coloured shapes on textured backgrounds, in the COCO 2014 layout.

Why it exists: every stage of CPGAN (YOLOv3 regions, the Bottom-Up/Top-Down attention, the
memory of Eq. 7, DAMSM, the GAN) must run end to end without downloading COCO, and on data whose
ground truth is known exactly. Each image holds 1-3 filled shapes (8 categories, 8 colours) on
one of 6 procedural textures, with COCO instance annotations (boxes, visible-mask polygons and
the colour as an extra ``color`` field) and 5 captions that are all *true* of the image: shapes,
synonyms ("ball" for circle), colours, sizes, counts, spatial relations and the background.
Because the truth is known, later stages can measure what they got right, e.g. whether the
memory m_r of "ball" (Eq. 7) was built from circle regions (:func:`category_words`), and
:func:`caption_truth` checks any caption's claims against an image's instances.

Every image is drawn from its own generator seeded by (seed, split, index): the output is
byte-identical for the same arguments, the splits are independent of each other's sizes, and
the work could be spread over workers without changing a byte.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from cpgan.errors import CpganError
from cpgan.pipeline.artifacts import atomic_dir
from cpgan.pipeline.text import plural

TOY_CATEGORIES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart",
)

# Caption word -> category. Only words that truthfully name the flat 2-D shape; plurals are
# included because count captions use them ("two red balls").
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "star": ("star",),
    "hexagon": ("hexagon",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus"),
    "heart": ("heart",),
}


SHAPE_SYNONYMS: dict[str, str] = {
    form: category
    for category, words in _SYNONYMS.items()
    for word in words
    for form in (word, plural(word))
}

TOY_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 190, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 190),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}

# Background name -> its mean RGB (the texture varies around it per image).
TOY_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grass": (70, 135, 50),
    "sky": (140, 185, 232),
    "water": (35, 85, 150),
    "sand": (214, 188, 140),
    "snow": (236, 240, 246),
    "brick": (160, 72, 52),
}

# Object colours never drawn on a background they would blend into.
_CLASHES: dict[str, frozenset[str]] = {
    "grass": frozenset({"green"}),
    "sky": frozenset({"blue", "white"}),
    "water": frozenset({"blue"}),
    "sand": frozenset({"yellow"}),
    "snow": frozenset({"white"}),
    "brick": frozenset({"red", "orange"}),
}

_BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "grass": ("on the grass", "on grass", "on grassy ground"),
    "sky": ("in the sky", "against the sky", "in a cloudy sky"),
    "water": ("over the water", "on the water", "on calm water"),
    "sand": ("on the sand", "on sandy ground", "on a sandy beach"),
    "snow": ("in the snow", "on the snow", "on snowy ground"),
    "brick": ("against a brick wall", "in front of a brick wall", "on a brick wall"),
}

BACKGROUND_WORDS: dict[str, str] = {
    "grass": "grass", "grassy": "grass", "sky": "sky", "cloudy": "sky", "water": "water",
    "sand": "sand", "sandy": "sand", "beach": "sand", "snow": "snow", "snowy": "snow",
    "brick": "brick", "wall": "brick",
}

SIZE_WORDS: dict[str, str] = {
    "tiny": "tiny", "small": "small", "little": "small", "large": "large", "big": "large",
}
COUNT_WORDS: dict[str, int] = {"two": 2, "three": 3}
RELATION_WORDS: dict[str, str] = {
    "left": "left", "right": "right", "above": "above",
    "below": "below", "under": "below", "beneath": "below",
}
GENERIC_WORDS: frozenset[str] = frozenset({"shape", "shapes", "object", "objects"})

_RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above",),
    "below": ("below", "under", "beneath"),
}
_FRAMES: tuple[str, ...] = ("a picture of", "an image of", "a drawing of", "a photo of")
_NUMBERS: dict[int, str] = {2: "two", 3: "three"}

# Size truth: r = longest side of the shape's box / image side. The gap between "small" and
# "large" keeps the words unambiguous; shapes are drawn with r in [0.15, 0.45].
_TINY_BELOW = 0.22
_SMALL_BELOW = 0.28
_LARGE_ABOVE = 0.36
_SIZE_RANGE = (0.15, 0.45)
# Relations need the box centres apart by this fraction of the image side.
_RELATION_MARGIN = 0.10
_MIN_VISIBLE = 0.5
_CAPTIONS_PER_IMAGE = 5
_CAPTION_WORDS = (6, 16)
_SPLIT_IDS = {"train2014": (0, 1), "val2014": (1, 1_000_001)}  # split -> (seed code, first id)
_MIN_IMAGE_SIZE = 32
_INFO = {"description": "CPGAN toy COCO", "version": "1.0", "year": 2026,
         "contributor": "CPGAN project", "url": ""}
_LICENSES = [{"id": 1, "name": "CC0 1.0",
              "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]


def category_words() -> dict[str, str]:
    """Which caption words name which category (for grounding and memory-purity reports)."""
    return dict(SHAPE_SYNONYMS)


def background_words() -> dict[str, str]:
    """Which caption words name which background."""
    return dict(BACKGROUND_WORDS)


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------

def _normalised(points: np.ndarray) -> np.ndarray:
    """Centre a polygon's box on the origin and scale its longest side to 1.

    With every shape normalised this way, the drawn size s is the box's longest side and the
    placement point is the box centre, so size and relation truths read straight off the box.
    """
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (points - (lo + hi) / 2) / float((hi - lo).max())


def _regular(count: int, start_deg: float, radii: Sequence[float] = (1.0,)) -> np.ndarray:
    """Vertices of a regular (or, with two radii, star) polygon; y grows downwards."""
    angles = np.deg2rad(start_deg + np.arange(count) * 360.0 / count)
    r = np.resize(np.asarray(radii, dtype=np.float64), count)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    """The classic parametric heart, flipped so its point faces down in image coordinates."""
    t = np.linspace(0.0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y], axis=1)


def _cross() -> np.ndarray:
    """A plus sign whose arms are a third of its width."""
    a, b = 1.0, 3.0
    return np.array([[a, 0], [b - a, 0], [b - a, a], [b, a], [b, b - a], [b - a, b - a],
                     [b - a, b], [a, b], [a, b - a], [0, b - a], [0, a], [a, a]], dtype=np.float64)


_UNIT_OUTLINES: dict[str, np.ndarray] = {
    "circle": _normalised(_regular(64, 0.0)),
    "square": _normalised(np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)),
    "triangle": _normalised(np.array([[0.5, 0], [1, 1], [0, 1]], dtype=np.float64)),
    "star": _normalised(_regular(10, -90.0, (1.0, 0.48))),
    "hexagon": _normalised(_regular(6, 0.0)),
    "diamond": _normalised(np.array([[0.35, 0], [0.7, 0.5], [0.35, 1], [0, 0.5]],
                                    dtype=np.float64)),
    "cross": _normalised(_cross()),
    "heart": _normalised(_heart()),
}

_SHIFT = 4  # fixed-point fractional bits for cv2.fillPoly: smooth sub-pixel outlines


def _fixed_point(category: str, cx: float, cy: float, size: float) -> np.ndarray:
    """The shape's outline at (cx, cy) with longest side ``size``, in cv2 fixed point."""
    points = _UNIT_OUTLINES[category] * size + (cx, cy)
    return np.round(points * (1 << _SHIFT)).astype(np.int32)


def shape_mask(category: str, cx: float, cy: float, size: float, image_size: int) -> np.ndarray:
    """Binary (bool) mask of a whole shape in a square image of side ``image_size``."""
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    cv2.fillPoly(mask, [_fixed_point(category, cx, cy, size)], 1, cv2.LINE_8, _SHIFT)
    return mask.astype(bool)


# ---------------------------------------------------------------------------------------------
# Backgrounds
# ---------------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, side: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Gaussian noise on a coarse grid, upsampled: blobs or streaks depending on the grid."""
    coarse = rng.standard_normal((cells_y, cells_x)).astype(np.float32)
    return cv2.resize(coarse, (side, side), interpolation=cv2.INTER_CUBIC)


def _tinted(base: tuple[int, int, int], shade: np.ndarray,
            tint: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """base + shade * tint per channel, as float32 HxWx3."""
    return np.asarray(base, np.float32) + shade[..., None] * np.asarray(tint, np.float32)


def _grass(rng: np.random.Generator, side: int) -> np.ndarray:
    """Green with vertical blade streaks: few noise cells down, many across."""
    streaks = _smooth_noise(rng, side, max(2, side // 32), max(4, side // 2))
    grain = rng.standard_normal((side, side)).astype(np.float32)
    return _tinted(TOY_BACKGROUNDS["grass"], 22 * streaks + 8 * grain, (0.6, 1.0, 0.5))


def _sky(rng: np.random.Generator, side: int) -> np.ndarray:
    """Blue vertical gradient (darker at the top) with soft white clouds."""
    y = np.linspace(-1.0, 1.0, side, dtype=np.float32)[:, None, None]
    base = np.asarray(TOY_BACKGROUNDS["sky"], np.float32) + y * np.float32([35, 25, 10])
    sky = np.broadcast_to(base, (side, side, 3))
    cloud = np.clip((_smooth_noise(rng, side, 4, 5) - 0.7) * 1.2, 0.0, 0.7)[..., None]
    return sky * (1 - cloud) + 245.0 * cloud


def _water(rng: np.random.Generator, side: int) -> np.ndarray:
    """Deep blue with horizontal wobbling wave bands and bright crests."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    wobble = 0.6 * np.sin(2 * np.pi * x * rng.uniform(1.0, 3.0) + rng.uniform(0, 2 * np.pi))
    wave = np.sin(2 * np.pi * rng.uniform(6.0, 10.0) * y + wobble + _smooth_noise(rng, side, 3, 3))
    crest = 35 * (wave > 0.9)
    return _tinted(TOY_BACKGROUNDS["water"], 18 * wave + crest, (0.5, 0.8, 1.0))


def _sand(rng: np.random.Generator, side: int) -> np.ndarray:
    """Beige speckle over diagonal dune ripples."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    theta = rng.uniform(0, np.pi)
    phase = 2 * np.pi * rng.uniform(3.0, 6.0) * (x * np.cos(theta) + y * np.sin(theta))
    ripples = np.sin(phase + 1.5 * _smooth_noise(rng, side, 3, 3))
    speckle = rng.standard_normal((side, side)).astype(np.float32)
    return _tinted(TOY_BACKGROUNDS["sand"], 9 * ripples + 12 * speckle, (1.0, 0.95, 0.85))


def _snow(rng: np.random.Generator, side: int) -> np.ndarray:
    """Near white with blue-grey drifts and sparse sparkles."""
    drifts = -np.abs(_smooth_noise(rng, side, 3, 3)) * 14
    sparkle = 10 * (rng.random((side, side)) < 0.02).astype(np.float32)
    return _tinted(TOY_BACKGROUNDS["snow"], drifts + sparkle, (1.0, 0.9, 0.6))


def _brick(rng: np.random.Generator, side: int) -> np.ndarray:
    """Running-bond brick wall: per-brick colour jitter, light mortar lines."""
    height = max(4, int(round(side * rng.uniform(0.09, 0.14))))
    width = 2 * height
    mortar = max(1, height // 6)
    y, x = np.mgrid[0:side, 0:side]
    y = y + int(rng.integers(0, height))
    row = y // height
    xs = x + int(rng.integers(0, width)) + (row % 2) * (width // 2)
    col = xs // width
    jitter = rng.normal(0.0, 14.0, size=(int(row.max()) + 1, int(col.max()) + 1)).astype(np.float32)
    grain = rng.standard_normal((side, side)).astype(np.float32)
    wall = _tinted(TOY_BACKGROUNDS["brick"], jitter[row, col] + 5 * grain)
    joints = ((y % height) < mortar) | ((xs % width) < mortar)
    wall[joints] = (205, 200, 188)
    return wall


_PAINTERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "grass": _grass, "sky": _sky, "water": _water, "sand": _sand, "snow": _snow, "brick": _brick,
}


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------

@dataclass
class ToyObject:
    """One drawn shape: what it is, where, and which of its pixels remain visible."""

    category: str
    colour: str
    cx: float
    cy: float
    size: float
    mask: np.ndarray     # bool, the whole shape
    visible: np.ndarray  # bool, the part not covered by shapes drawn later


@dataclass
class ToyImage:
    """A rendered toy image (RGB uint8) with its background and objects in drawing order."""

    pixels: np.ndarray
    background: str
    objects: list[ToyObject]


def _pick_category_and_colour(rng: np.random.Generator, placed: list[ToyObject],
                              allowed: list[str]) -> tuple[str, str]:
    """Mostly fresh draws; sometimes repeat a placed category (and colour) so counts occur."""
    if placed and rng.random() < 0.3:
        twin = placed[int(rng.integers(len(placed)))]
        colour = twin.colour if rng.random() < 0.5 else allowed[int(rng.integers(len(allowed)))]
        return twin.category, colour
    category = TOY_CATEGORIES[int(rng.integers(len(TOY_CATEGORIES)))]
    return category, allowed[int(rng.integers(len(allowed)))]


def _try_place(rng: np.random.Generator, side: int, category: str, colour: str,
               placed: list[ToyObject], attempts: int = 30) -> ToyObject | None:
    """Sample size and position until every shape keeps >= half of its pixels visible."""
    for _ in range(attempts):
        size = rng.uniform(*_SIZE_RANGE) * side
        half = size / 2
        cx = rng.uniform(half, side - 1 - half)
        cy = rng.uniform(half, side - 1 - half)
        mask = shape_mask(category, cx, cy, size, side)
        if not mask.any():
            continue
        if all(_still_fine(obj, mask) for obj in placed):
            return ToyObject(category, colour, cx, cy, size, mask, mask.copy())
    return None


def _still_fine(obj: ToyObject, cover: np.ndarray) -> bool:
    """After ``cover`` is drawn on top, is >= half of ``obj`` visible, with no hole in it?

    A hole (a shape drawn wholly inside another) cannot be written as a COCO polygon, so such
    placements are redrawn rather than annotated wrongly.
    """
    if not (obj.visible & cover).any():
        return True
    visible = obj.visible & ~cover
    if visible.sum() < _MIN_VISIBLE * obj.mask.sum():
        return False
    _, hierarchy = cv2.findContours(visible.astype(np.uint8), cv2.RETR_CCOMP,
                                    cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is None or bool((hierarchy[0, :, 3] < 0).all())


def render_toy_image(rng: np.random.Generator, image_size: int) -> ToyImage:
    """Draw one image: a textured background, then 1-3 filled shapes, later ones on top."""
    background = tuple(TOY_BACKGROUNDS)[int(rng.integers(len(TOY_BACKGROUNDS)))]
    allowed = [c for c in TOY_COLOURS if c not in _CLASHES[background]]
    pixels = np.clip(_PAINTERS[background](rng, image_size), 0, 255)
    pixels = np.ascontiguousarray(np.round(pixels).astype(np.uint8))
    wanted = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    placed: list[ToyObject] = []
    for _ in range(wanted):
        category, colour = _pick_category_and_colour(rng, placed, allowed)
        obj = _try_place(rng, image_size, category, colour, placed)
        if obj is None:
            break
        for other in placed:
            other.visible &= ~obj.mask
        placed.append(obj)
        points = _fixed_point(category, obj.cx, obj.cy, obj.size)
        cv2.fillPoly(pixels, [points], TOY_COLOURS[colour], cv2.LINE_AA, _SHIFT)
    return ToyImage(pixels, background, placed)


# ---------------------------------------------------------------------------------------------
# Truth of caption claims
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Fact:
    """What a caption may claim about one instance, read from its annotation."""

    category: str
    colour: str
    bbox: tuple[float, float, float, float]


def _facts(instances: Iterable[dict]) -> list[_Fact]:
    """Instance annotations (category_id 1..8, color, bbox) as facts."""
    return [_Fact(TOY_CATEGORIES[int(a["category_id"]) - 1], str(a.get("color", "")),
                  tuple(float(v) for v in a["bbox"])) for a in instances]


def size_holds(word: str, bbox: Sequence[float], image_size: tuple[int, int]) -> bool:
    """Is size word ``word`` (tiny/small/little/large/big) true of a box in this image?"""
    ratio = max(bbox[2], bbox[3]) / min(image_size)
    kind = SIZE_WORDS[word]
    if kind == "tiny":
        return ratio < _TINY_BELOW
    if kind == "small":
        return ratio < _SMALL_BELOW
    return ratio > _LARGE_ABOVE


def relation_holds(relation: str, a: Sequence[float], b: Sequence[float],
                   image_size: tuple[int, int]) -> bool:
    """Is box ``a`` left of / right of / above / below box ``b``, by centres with a margin?"""
    width, height = image_size
    dx = (b[0] + b[2] / 2) - (a[0] + a[2] / 2)
    dy = (b[1] + b[3] / 2) - (a[1] + a[3] / 2)
    gap = {"left": dx / width, "right": -dx / width, "above": dy / height, "below": -dy / height}
    return gap[RELATION_WORDS.get(relation, relation)] > _RELATION_MARGIN


@dataclass
class _Phrase:
    """A noun phrase of a caption: [count] [size|colour]* shape-word."""

    word: str
    count: int | None
    colours: list[str]
    sizes: list[str]


def _tokens(caption: str) -> list[str]:
    """Lower-case ``\\w+`` tokens, the vocabulary's tokenizer (DESIGN §3)."""
    return re.findall(r"\w+", caption.lower())


_Relation = tuple[int, str, int]  # (subject phrase, relation, object phrase)


def _parse(tokens: list[str]) -> tuple[list[_Phrase], list[_Relation], list[str], list[str]]:
    """Split a caption into noun phrases, relations between neighbours, background words.

    Returns (phrases, relations, background words, problems): modifiers that name no shape
    and relations missing a side are problems of the caption itself.
    """
    phrases: list[_Phrase] = []
    relations: list[_Relation] = []
    backgrounds: list[str] = []
    problems: list[str] = []
    count, colours, sizes = None, [], []
    pending: tuple[int, str] | None = None
    for tok in tokens:
        if tok in COUNT_WORDS:
            count = COUNT_WORDS[tok]
        elif tok in TOY_COLOURS:
            colours.append(tok)
        elif tok in SIZE_WORDS:
            sizes.append(tok)
        elif tok in SHAPE_SYNONYMS or tok in GENERIC_WORDS:
            phrases.append(_Phrase(tok, count, colours, sizes))
            if pending is not None:
                relations.append((pending[0], pending[1], len(phrases) - 1))
                pending = None
            count, colours, sizes = None, [], []
        else:
            if count is not None or colours or sizes:
                problems.append(f"modifier before '{tok}' names no shape")
                count, colours, sizes = None, [], []
            if tok in RELATION_WORDS and not phrases:
                problems.append(f"relation '{tok}' has no subject")
            elif tok in RELATION_WORDS:
                pending = (len(phrases) - 1, RELATION_WORDS[tok])
            elif tok in BACKGROUND_WORDS:
                backgrounds.append(tok)
    if count is not None or colours or sizes:
        problems.append("trailing modifier names no shape")
    if pending is not None:
        problems.append(f"relation '{pending[1]}' has no object")
    return phrases, relations, backgrounds, problems


def _matches(phrase: _Phrase, fact: _Fact, image_size: tuple[int, int]) -> bool:
    """Does one instance fit the phrase's shape, colour and size words?"""
    if phrase.word not in GENERIC_WORDS and SHAPE_SYNONYMS[phrase.word] != fact.category:
        return False
    if any(colour != fact.colour for colour in phrase.colours):
        return False
    return all(size_holds(size, fact.bbox, image_size) for size in phrase.sizes)


def caption_truth(caption: str, instances: list[dict], image_size: tuple[int, int], *,
                  background: str | None = None) -> list[str]:
    """The false claims of ``caption`` about an image; an empty list means it is all true.

    ``instances`` are the image's COCO instance annotations (category_id, color, bbox) and
    ``image_size`` is (width, height). Checked: every noun phrase names an instance present
    (shape word or synonym, colour, size); a count ("two red balls") equals the number of
    matching instances; a relation between neighbouring phrases holds by box centres; a
    background word names ``background`` (when given). Semantics are existential, as people
    read "a red circle left of a blue square".
    """
    facts = _facts(instances)
    phrases, relations, backgrounds, problems = _parse(_tokens(caption))
    for phrase in phrases:
        found = sum(_matches(phrase, fact, image_size) for fact in facts)
        if phrase.count is not None and found != phrase.count:
            problems.append(f"'{phrase.word}': says {phrase.count}, image has {found}")
        elif found == 0:
            said = " ".join(phrase.sizes + phrase.colours + [phrase.word])
            problems.append(f"'{said}': not in image")
    for left, relation, right in relations:
        if not _related(phrases[left], relation, phrases[right], facts, image_size):
            problems.append(f"relation '{relation}' does not hold")
    for word in backgrounds:
        if background is not None and BACKGROUND_WORDS[word] != background:
            problems.append(f"'{word}': background is {background}")
    return problems


def _related(a: _Phrase, relation: str, b: _Phrase, facts: list[_Fact],
             image_size: tuple[int, int]) -> bool:
    """Is some instance fitting ``a`` in ``relation`` to a different instance fitting ``b``?"""
    return any(
        i != j and _matches(a, fa, image_size) and _matches(b, fb, image_size)
        and relation_holds(relation, fa.bbox, fb.bbox, image_size)
        for i, fa in enumerate(facts) for j, fb in enumerate(facts)
    )


# ---------------------------------------------------------------------------------------------
# Caption writing
# ---------------------------------------------------------------------------------------------

def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One of ``options``, drawn with the image's generator (never the global one)."""
    return options[int(rng.integers(len(options)))]


def _shape_word(rng: np.random.Generator, category: str) -> str:
    """The category's own name, or one of its synonyms a third of the time."""
    words = _SYNONYMS[category]
    return words[0] if len(words) == 1 or rng.random() < 0.67 else _choice(rng, words[1:])


def _noun_phrase(rng: np.random.Generator, fact: _Fact, image_size: tuple[int, int]) -> str:
    """'a small red ball', 'the blue square': article, true size (sometimes), colour, shape.

    The colour is always said: with 8 shapes x 8 colours, "a triangle" is true of about a
    third of all images, and captions that many images satisfy cap what any text-image
    matcher can score (R-precision; see :func:`write_captions`)."""
    words: list[str] = []
    true_sizes = [w for w in SIZE_WORDS if size_holds(w, fact.bbox, image_size)]
    if true_sizes and rng.random() < 0.45:
        words.append(_choice(rng, true_sizes))
    words.append(fact.colour)
    words.append(_shape_word(rng, fact.category))
    article = "the" if rng.random() < 0.2 else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([article] + words)


def _same_words(first: str, second: str) -> bool:
    """Would two noun phrases read alike ('a red cross' ... 'the red cross')? Then skip them."""
    return first.split()[1:] == second.split()[1:]


def _background_phrase(rng: np.random.Generator, background: str) -> str:
    return _choice(rng, _BACKGROUND_PHRASES[background])


def _single(rng: np.random.Generator, facts: list[_Fact], background: str,
            size: tuple[int, int]) -> str | None:
    """The only object of a one-object image, and the background (an image with more objects
    gets a caption that names more of them: see :func:`write_captions`)."""
    if len(facts) != 1:
        return None
    phrase = _noun_phrase(rng, facts[int(rng.integers(len(facts)))], size)
    where = _background_phrase(rng, background)
    forms = (f"{phrase} {where}", f"there is {phrase} {where}",
             f"{_choice(rng, _FRAMES)} {phrase} {where}", f"{where}, there is {phrase}")
    return _choice(rng, forms)


def _relation(rng: np.random.Generator, facts: list[_Fact], background: str,
              size: tuple[int, int]) -> str | None:
    """Two objects and a spatial relation that holds between their box centres."""
    pairs = [(a, b, rel) for a in facts for b in facts if a is not b for rel in _RELATION_PHRASES
             if relation_holds(rel, a.bbox, b.bbox, size)]
    if not pairs:
        return None
    a, b, rel = pairs[int(rng.integers(len(pairs)))]
    first, second = _noun_phrase(rng, a, size), _noun_phrase(rng, b, size)
    if _same_words(first, second):
        return None
    said = _choice(rng, _RELATION_PHRASES[rel])
    where = _background_phrase(rng, background)
    forms = (f"{first} {said} {second} {where}", f"{first} is {said} {second} {where}",
             f"{where}, {first} {said} {second}")
    return _choice(rng, forms)


def _listing(rng: np.random.Generator, facts: list[_Fact], background: str,
             size: tuple[int, int]) -> str | None:
    """Every object, in a random order."""
    if len(facts) < 2:
        return None
    phrases = [_noun_phrase(rng, facts[i], size) for i in rng.permutation(len(facts))]
    if any(_same_words(p, q) for i, p in enumerate(phrases) for q in phrases[i + 1:]):
        return None
    listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    where = _background_phrase(rng, background)
    return _choice(rng, (f"{listed} {where}", f"there is {listed} {where}", f"{where}, {listed}"))


def _counting(rng: np.random.Generator, facts: list[_Fact], background: str,
              size: tuple[int, int]) -> str | None:
    """'two red balls', 'three shapes': exact counts of a repeated category or of everything."""
    groups: list[tuple[int, str]] = []
    for category in TOY_CATEGORIES:
        same = [f for f in facts if f.category == category]
        if len(same) < 2:
            continue
        colours = sorted({f.colour for f in same})
        groups.append((len(same), plural(_shape_word(rng, category))))
        groups += [(n, f"{colour} {plural(_shape_word(rng, category))}") for colour in colours
                   if (n := sum(f.colour == colour for f in same)) >= 2]
    if not groups:
        return None
    count, words = groups[int(rng.integers(len(groups)))]
    counted = f"{_NUMBERS[count]} {words}"
    where = _background_phrase(rng, background)
    return _choice(rng, (f"{counted} {where}", f"there are {counted} {where}",
                         f"{_choice(rng, _FRAMES)} {counted} {where}"))


_TEMPLATES: tuple[tuple[Callable[..., str | None], float], ...] = (
    (_single, 1.0), (_relation, 3.0), (_listing, 1.5), (_counting, 1.5),
)


def _styled(rng: np.random.Generator, text: str) -> str:
    """Vary capitalisation and the final full stop, as human captions do."""
    if rng.random() < 0.65:
        text = text[0].upper() + text[1:]
    return text + "." if rng.random() < 0.6 else text


def write_captions(rng: np.random.Generator, instances: list[dict], background: str,
                   image_size: tuple[int, int], count: int = _CAPTIONS_PER_IMAGE) -> list[str]:
    """``count`` different true captions of 6-16 words for one image.

    ``instances`` are its COCO instance annotations, the same facts :func:`caption_truth`
    checks against; ``image_size`` is (width, height).
    """
    facts = _facts(instances)
    weights = np.array([w for _, w in _TEMPLATES])
    captions: list[str] = []
    seen: set[str] = set()
    for _ in range(400):
        template = _TEMPLATES[int(rng.choice(len(_TEMPLATES), p=weights / weights.sum()))][0]
        text = template(rng, facts, background, image_size)
        if text is None:
            continue
        key = " ".join(_tokens(text))
        if key in seen or not _CAPTION_WORDS[0] <= len(key.split()) <= _CAPTION_WORDS[1]:
            continue
        seen.add(key)
        captions.append(_styled(rng, text))
        if len(captions) == count:
            return captions
    raise RuntimeError(f"toy captions: only {len(captions)} distinct captions for {facts}")


# ---------------------------------------------------------------------------------------------
# COCO records and the dataset tree
# ---------------------------------------------------------------------------------------------

def _polygons(visible: np.ndarray) -> list[list[float]]:
    """COCO polygons of a visible mask (outer contours with at least 3 points)."""
    contours, _ = cv2.findContours(visible.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    return [[float(v) for v in c.reshape(-1)] for c in contours if len(c) >= 3]


def _instance(obj: ToyObject, image_id: int, number: int) -> dict:
    """COCO instance annotation: box of the whole drawn shape, area/polygons of its visible part."""
    x, y, w, h = cv2.boundingRect(obj.mask.astype(np.uint8))
    return {
        "id": image_id * 10 + number,
        "image_id": image_id,
        "category_id": TOY_CATEGORIES.index(obj.category) + 1,
        "bbox": [float(x), float(y), float(w), float(h)],
        "area": float(obj.visible.sum()),
        "iscrowd": 0,
        "segmentation": _polygons(obj.visible),
        "color": obj.colour,
    }


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent stream per (seed, split, index): splits and images never share draws."""
    return np.random.default_rng([seed, _SPLIT_IDS[split][0], index])


def _encode_jpeg(rgb: np.ndarray, path: Path) -> None:
    """JPEG quality 95; OpenCV writes BGR, so the channels are swapped first."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise CpganError(f"{path}: OpenCV could not encode the JPEG")
    path.write_bytes(data.tobytes())


def _dump_json(path: Path, payload: dict) -> None:
    """Compact, key-ordered as built, ASCII: the same data always gives the same bytes."""
    path.write_text(json.dumps(payload, ensure_ascii=True, separators=(",", ":")), encoding="ascii")


def _write_split(root: Path, split: str, count: int, image_size: int, seed: int,
                 progress: bool) -> None:
    """Render ``count`` images of one split and write its JPEGs and two annotation files."""
    folder = root / split
    folder.mkdir()
    images, instances, captions = [], [], []
    size = (image_size, image_size)
    for index in tqdm(range(count), desc=f"toy {split}", unit="img", disable=not progress):
        rng = _image_rng(seed, split, index)
        image = render_toy_image(rng, image_size)
        image_id = _SPLIT_IDS[split][1] + index
        file_name = f"COCO_{split}_{image_id:012d}.jpg"
        _encode_jpeg(image.pixels, folder / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": image_size,
                       "height": image_size, "license": 1, "background": image.background})
        records = [_instance(obj, image_id, n + 1) for n, obj in enumerate(image.objects)]
        instances += records
        texts = write_captions(rng, records, image.background, size)
        captions += [{"id": image_id * 10 + n + 1, "image_id": image_id, "caption": text}
                     for n, text in enumerate(texts)]
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(TOY_CATEGORIES)]
    head = {"info": _INFO, "licenses": _LICENSES, "images": images}
    _dump_json(root / "annotations" / f"captions_{split}.json", {**head, "annotations": captions})
    _dump_json(root / "annotations" / f"instances_{split}.json",
               {**head, "annotations": instances, "categories": categories})


def _validate(train_images: int, val_images: int, image_size: int, seed: int, out: Path) -> None:
    """Refuse arguments that cannot make a valid dataset, naming the output folder."""
    if seed < 0:
        raise CpganError(f"{out}: seed must be a non-negative integer, got {seed}")
    if not (0 <= train_images < 1_000_000 and 0 <= val_images < 1_000_000):
        raise CpganError(f"{out}: image counts must be in [0, 999999], "
                         f"got {train_images} train / {val_images} val")
    if image_size < _MIN_IMAGE_SIZE:
        raise CpganError(f"{out}: image size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")
    if out.exists():
        raise CpganError(f"{out}: already exists; remove it or choose another folder")


def generate_toy_coco(out: Path, train_images: int = 4000, val_images: int = 1000,
                      image_size: int = 128, seed: int = 0, progress: bool = True) -> Path:
    """Write the toy dataset under ``out`` in the official COCO 2014 layout; return ``out``.

    The tree (annotations/{captions,instances}_{train,val}2014.json, train2014/, val2014/) is
    built in a temporary folder and renamed into place, so ``out`` either is complete or does
    not exist. Train image ids are 1..N, val ids start at 1,000,001.
    """
    out = Path(out)
    _validate(train_images, val_images, image_size, seed, out)
    try:
        with atomic_dir(out) as tmp:
            (tmp / "annotations").mkdir()
            for split, count in (("train2014", train_images), ("val2014", val_images)):
                _write_split(tmp, split, count, image_size, seed, progress)
    except FileExistsError as exc:
        raise CpganError(f"{out}: already exists; remove it or choose another folder") from exc
    return out
