"""The toy COCO generator: layout, COCO validity, determinism, truthful captions, true colours."""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from cpgan.errors import CpganError
from cpgan.pipeline.toy import (
    BACKGROUND_WORDS, COUNT_WORDS, RELATION_WORDS, SHAPE_SYNONYMS, SIZE_WORDS, TOY_BACKGROUNDS,
    TOY_CATEGORIES, TOY_COLOURS, caption_truth, category_words, generate_toy_coco,
    render_toy_image,
)

SPLITS = ("train2014", "val2014")
SIDE = 96


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~100 images: enough for every category, colour and background to turn up."""
    return generate_toy_coco(tmp_path_factory.mktemp("toy") / "coco", train_images=60,
                             val_images=40, image_size=SIDE, seed=3, progress=False)


def _load(root: Path, kind: str, split: str) -> dict:
    return json.loads((root / "annotations" / f"{kind}_{split}.json").read_text())


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_layout_and_pycocotools_reads_every_file(toy_root: Path) -> None:
    ids = {}
    for split in SPLITS:
        instances = COCO(str(toy_root / "annotations" / f"instances_{split}.json"))
        captions = COCO(str(toy_root / "annotations" / f"captions_{split}.json"))
        assert sorted(instances.getImgIds()) == sorted(captions.getImgIds())
        names = [c["name"] for c in instances.loadCats(instances.getCatIds())]
        assert names == list(TOY_CATEGORIES)
        assert {c["supercategory"] for c in instances.dataset["categories"]} == {"shape"}
        for image in instances.dataset["images"]:
            assert image["file_name"] == f"COCO_{split}_{image['id']:012d}.jpg"
            pixels = _rgb(toy_root / split / image["file_name"])
            assert pixels.shape == (image["height"], image["width"], 3) == (SIDE, SIDE, 3)
            assert image["background"] in TOY_BACKGROUNDS
        ids[split] = set(instances.getImgIds())
        assert len(list((toy_root / split).iterdir())) == len(ids[split])
    assert len(ids["train2014"]) == 60 and len(ids["val2014"]) == 40
    assert min(ids["train2014"]) >= 1 and not ids["train2014"] & ids["val2014"]


def test_five_distinct_captions_per_image_of_6_to_16_words(toy_root: Path) -> None:
    for split in SPLITS:
        data = _load(toy_root, "captions", split)
        per_image: dict[int, list[str]] = {image["id"]: [] for image in data["images"]}
        for ann in data["annotations"]:
            per_image[ann["image_id"]].append(ann["caption"])
        assert len({ann["id"] for ann in data["annotations"]}) == len(data["annotations"])
        for captions in per_image.values():
            assert len(captions) == 5
            assert len({" ".join(re.findall(r"\w+", c.lower())) for c in captions}) == 5
            assert all(6 <= len(re.findall(r"\w+", c)) <= 16 and c.isascii() for c in captions)


def test_boxes_areas_and_masks_are_consistent(toy_root: Path) -> None:
    for split in SPLITS:
        coco = COCO(str(toy_root / "annotations" / f"instances_{split}.json"))
        per_image = {i: len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()}
        assert set(per_image.values()) <= {1, 2, 3} and 3 in per_image.values()
        for ann in coco.dataset["annotations"]:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= SIDE and y + h <= SIDE
            assert 0.12 * SIDE <= max(w, h) <= 0.47 * SIDE
            assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h
            # The polygon runs through the boundary pixels' centres, so it rasterises a little
            # smaller than the pixel mask whose count is the area (most on small stars).
            mask = coco.annToMask(ann)
            assert 0.5 * ann["area"] <= mask.sum() <= 1.02 * ann["area"]
            ys, xs = np.nonzero(mask)
            assert xs.min() >= x - 1 and xs.max() <= x + w
            assert ys.min() >= y - 1 and ys.max() <= y + h


def test_every_shape_keeps_at_least_half_visible() -> None:
    for index in range(60):
        image = render_toy_image(np.random.default_rng([11, index]), 64)
        assert 1 <= len(image.objects) <= 3
        for obj in image.objects:
            assert obj.visible.sum() >= 0.5 * obj.mask.sum() > 0
        for index, obj in enumerate(image.objects):
            for covering in image.objects[index + 1:]:
                assert not (obj.visible & covering.mask).any()


def test_variety_of_categories_colours_backgrounds(toy_root: Path) -> None:
    anns, images = [], []
    for split in SPLITS:
        data = _load(toy_root, "instances", split)
        anns += data["annotations"]
        images += data["images"]
    assert len({a["category_id"] for a in anns}) >= 6
    assert len({a["color"] for a in anns}) >= 6 and {a["color"] for a in anns} <= set(TOY_COLOURS)
    assert len({i["background"] for i in images}) >= 4


def test_every_generated_caption_is_true_of_its_image(toy_root: Path) -> None:
    words: set[str] = set()
    for split in SPLITS:
        instances = _load(toy_root, "instances", split)
        captions = _load(toy_root, "captions", split)
        images = {i["id"]: i for i in instances["images"]}
        for ann in captions["annotations"]:
            image = images[ann["image_id"]]
            own = [a for a in instances["annotations"] if a["image_id"] == image["id"]]
            size = (image["width"], image["height"])
            false = caption_truth(ann["caption"], own, size, background=image["background"])
            assert false == [], (ann, false)
            words |= set(re.findall(r"\w+", ann["caption"].lower()))
    # The truths checked above must include every kind of claim the generator makes.
    assert words & set(RELATION_WORDS) >= {"left", "right", "above"}
    assert words & set(COUNT_WORDS) and words & set(SIZE_WORDS) and words & set(BACKGROUND_WORDS)
    assert {w for w in words if w in SHAPE_SYNONYMS and not w.startswith(SHAPE_SYNONYMS[w])}


def test_captions_are_specific_enough_to_tell_images_apart(toy_root: Path) -> None:
    """Every caption names the background and a colour for every shape; only one-object
    images get one-object captions. Then few captions of other images are true of an image
    (the tie rate that caps R-precision for any matcher); the old generic captions ("three
    shapes on the snow", "a triangle") put this at ~0.6, these at ~0.93 on 500 images."""
    instances = _load(toy_root, "instances", "val2014")
    captions = _load(toy_root, "captions", "val2014")
    images = {i["id"]: i for i in instances["images"]}
    own = {i: [a for a in instances["annotations"] if a["image_id"] == i] for i in images}
    chosen = {}
    for ann in captions["annotations"]:
        tokens = re.findall(r"\w+", ann["caption"].lower())
        assert set(tokens) & set(BACKGROUND_WORDS), ann
        for i, token in enumerate(tokens):
            if token in SHAPE_SYNONYMS:  # a colour (or a count) just before the shape
                assert set(tokens[max(0, i - 2):i]) & (set(TOY_COLOURS) | set(COUNT_WORDS)), ann
        if len(own[ann["image_id"]]) > 1:  # a one-object caption of a multi-object image
            assert sum(t in SHAPE_SYNONYMS for t in tokens) > 1 or \
                set(tokens) & set(COUNT_WORDS), ann
        chosen.setdefault(ann["image_id"], ann["caption"])
    hit_rates = []
    for i, image in images.items():
        size = (image["width"], image["height"])
        ties = sum(not caption_truth(text, own[i], size, background=image["background"])
                   for j, text in chosen.items() if j != i)
        hit_rates.append(1.0 / (1 + ties * 99 / (len(images) - 1)))
    assert np.mean(hit_rates) > 0.85


def test_caption_truth_catches_false_claims() -> None:
    # A tiny red circle at the left, a large blue square at the right; two yellow stars below.
    instances = [
        {"category_id": 1, "color": "red", "bbox": [5.0, 10.0, 20.0, 20.0]},
        {"category_id": 2, "color": "blue", "bbox": [70.0, 8.0, 52.0, 50.0]},
        {"category_id": 4, "color": "yellow", "bbox": [10.0, 90.0, 30.0, 28.0]},
        {"category_id": 4, "color": "yellow", "bbox": [60.0, 92.0, 30.0, 28.0]},
    ]
    size = (128, 128)

    def false_claims(caption: str) -> list[str]:
        return caption_truth(caption, instances, size, background="grass")

    assert false_claims("A tiny red ball to the left of a big blue box on the grass.") == []
    assert false_claims("two yellow stars below the blue square") == []
    for wrong in ("A blue circle on the grass.", "A red ball right of a blue box.",
                  "A large red circle", "a red heart", "three yellow stars",
                  "a red circle on the sand", "a blue square above the red circle",
                  "two red shapes", "a red star below a blue box", "a small blue square",
                  "the red circle is left of", "a green and a star"):
        assert false_claims(wrong), wrong


def test_drawn_colours_match_annotations_in_rgb(toy_root: Path) -> None:
    """Pixels inside each shape must carry its annotated colour: catches any BGR/RGB swap."""
    checked = 0
    for split in SPLITS:
        coco = COCO(str(toy_root / "annotations" / f"instances_{split}.json"))
        for image in coco.dataset["images"]:
            pixels = _rgb(toy_root / split / image["file_name"]).astype(np.int32)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
                inner = cv2.erode(coco.annToMask(ann), np.ones((5, 5), np.uint8)).astype(bool)
                if inner.sum() < 10:
                    continue
                median = np.median(pixels[inner], axis=0)
                assert np.abs(median - TOY_COLOURS[ann["color"]]).max() <= 40, ann
                checked += _centre_matches(pixels, coco.annToMask(ann), ann)
    assert checked >= 20


def _centre_matches(pixels: np.ndarray, mask: np.ndarray, ann: dict) -> int:
    """For shapes solid at their box centre, the 3x3 centre patch has the annotated colour."""
    if TOY_CATEGORIES[ann["category_id"] - 1] not in ("circle", "square", "hexagon", "diamond"):
        return 0
    x, y, w, h = ann["bbox"]
    cx, cy = int(x + w / 2), int(y + h / 2)
    if w < 12 or not mask[cy - 3:cy + 4, cx - 3:cx + 4].all():
        return 0
    patch = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(axis=0)
    assert np.abs(patch - TOY_COLOURS[ann["color"]]).max() <= 30, ann
    return 1


def test_backgrounds_are_recorded_and_distinguishable(toy_root: Path) -> None:
    """The mean colour away from the shapes identifies the recorded background."""
    names = list(TOY_BACKGROUNDS)
    centres = np.array([TOY_BACKGROUNDS[n] for n in names], dtype=np.float64)
    for split in SPLITS:
        data = _load(toy_root, "instances", split)
        for image in data["images"]:
            pixels = _rgb(toy_root / split / image["file_name"]).astype(np.float64)
            free = np.ones((SIDE, SIDE), dtype=bool)
            for ann in data["annotations"]:
                if ann["image_id"] == image["id"]:
                    x, y, w, h = (int(v) for v in ann["bbox"])
                    free[max(0, y - 2):y + h + 2, max(0, x - 2):x + w + 2] = False
            mean = pixels[free].mean(axis=0)
            nearest = names[int(np.argmin(np.linalg.norm(centres - mean, axis=1)))]
            assert nearest == image["background"], (image["file_name"], mean)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    args = dict(train_images=6, val_images=4, image_size=64, progress=False)
    first = _tree_bytes(generate_toy_coco(tmp_path / "a", seed=5, **args))
    again = _tree_bytes(generate_toy_coco(tmp_path / "b", seed=5, **args))
    other = _tree_bytes(generate_toy_coco(tmp_path / "c", seed=6, **args))
    assert len(first) == 4 + 6 + 4 and first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if name.endswith(".jpg"))
    captions = "annotations/captions_train2014.json"
    assert first[captions] != other[captions]


def test_val_split_does_not_depend_on_train_size(tmp_path: Path) -> None:
    small = _tree_bytes(generate_toy_coco(tmp_path / "s", 2, 3, 64, seed=1, progress=False))
    large = _tree_bytes(generate_toy_coco(tmp_path / "l", 5, 3, 64, seed=1, progress=False))
    val = [name for name in small if "val2014" in name]
    assert len(val) == 5 and all(small[name] == large[name] for name in val)


def test_existing_output_is_refused_and_left_intact(tmp_path: Path) -> None:
    out = tmp_path / "coco"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CpganError, match="already exists"):
        generate_toy_coco(out, 2, 1, 64, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco"]


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    for kwargs in (dict(image_size=16), dict(train_images=-1), dict(val_images=1_000_000),
                   dict(seed=-1)):
        with pytest.raises(CpganError) as info:
            generate_toy_coco(tmp_path / "x", progress=False, **kwargs)
        assert "\n" not in str(info.value) and str(tmp_path / "x") in str(info.value)
    assert not (tmp_path / "x").exists()


def test_category_words_name_their_categories() -> None:
    words = category_words()
    assert all(words[name] == name for name in TOY_CATEGORIES)
    assert words["ball"] == "circle" and words["boxes"] == "square" and words["crosses"] == "cross"
    assert set(words.values()) == set(TOY_CATEGORIES)
    assert len(TOY_COLOURS) >= 8 and len(TOY_BACKGROUNDS) >= 4
