"""Which caption words name an instance category, and whether a region shows that category.

The grounding report (attend) and the purity report (build-memory) measure how often the region
chosen for a word like "circle" or "dog" overlaps (IoU >= 0.5) an annotated instance of that
category. On the toy dataset the words are the shape names and their synonyms ("ball" ->
circle); on COCO they are the single-word category names and their plural (multi-word names
such as "traffic light" are split by the tokeniser, so no single word names them).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torchvision.ops import box_iou

from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.text import plural

HIT_IOU = 0.5


# Berlin and Kay's basic colour terms, each the colour it names ("gray" is "grey").
COLOUR_WORDS: dict[str, str] = {
    **{name: name for name in ("black", "white", "red", "green", "yellow", "blue", "brown",
                               "orange", "pink", "purple", "grey")},
    "gray": "grey",
}


def category_words(split: CocoSplit) -> dict[str, int]:
    """Caption word -> category id for the split's categories."""
    from cpgan.pipeline.toy import TOY_CATEGORIES, category_words as toy_words

    names = split.categories()
    ids = {name: cid for cid, name in names.items()}
    if tuple(names[c] for c in sorted(names)) == TOY_CATEGORIES:
        return {word: ids[name] for word, name in sorted(toy_words().items())}
    words: dict[str, int] = {}
    for cid, name in sorted(names.items()):
        if " " in name or not name.isalpha():
            continue
        words[name] = cid
        words.setdefault(plural(name), cid)
    return words


def swappable_words(split: CocoSplit) -> dict[str, tuple[str, str]]:
    """Caption words that make a caption false when one replaces another: word -> (slot,
    value). Words of one slot stand in for one another ("object", "objects" for plurals,
    "colour"); a different value (category id, colour) makes the caption untrue of its image,
    a synonym (same value) does not. Plurals keep their own slot so that a swap never leaves
    "two circle", which the text alone would give away."""
    words = category_words(split)
    plurals = {plural(word) for word in words}
    slots = {word: ("objects" if word in plurals else "object", str(cid))
             for word, cid in words.items()}
    slots.update({word: ("colour", colour) for word, colour in COLOUR_WORDS.items()})
    return slots


def xywh_to_xyxy(boxes: Iterable[Iterable[float]]) -> torch.Tensor:
    """COCO ``bbox`` [x, y, w, h] rows as an ``[N, 4]`` x1, y1, x2, y2 tensor."""
    t = torch.tensor([list(b) for b in boxes], dtype=torch.float32).reshape(-1, 4)
    return torch.cat([t[:, :2], t[:, :2] + t[:, 2:]], dim=1)


def region_hits(region_box: Iterable[float], instances: list[dict], category_id: int) -> bool:
    """True when ``region_box`` (x1, y1, x2, y2, original pixels) overlaps an instance of
    ``category_id`` with IoU >= 0.5."""
    same = [ann["bbox"] for ann in instances if ann["category_id"] == category_id]
    if not same:
        return False
    box = torch.tensor([list(region_box)], dtype=torch.float32)
    return bool((box_iou(box, xywh_to_xyxy(same)) >= HIT_IOU).any())
