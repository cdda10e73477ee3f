"""COCO reader: annotation validation, per-image failures, path safety and RGB decoding.

Every fixture (good and bad) is built here in ``tmp_path``; nothing binary is committed.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cpgan.errors import CpganError, ItemError
from cpgan.pipeline.coco import ImageFailure, CocoSplit, iter_images, read_image_rgb

SPLIT = "train2014"
RED_BGR = (0, 0, 255)
BLUE_BGR = (255, 0, 0)


# ---------------------------------------------------------------------------------------------
# Fixture builders
# ---------------------------------------------------------------------------------------------


def encode(array: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, array, list(params))
    assert ok
    return buf.tobytes()


def two_colour_bgr(height: int = 4, width: int = 6) -> np.ndarray:
    """Left half red, right half blue, in OpenCV's BGR: catches channel and axis swaps."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = RED_BGR
    image[:, width // 2 :] = BLUE_BGR
    return image


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite IHDR's width/height (the CRC goes stale, so only a header-first check can pass)."""
    return png[:16] + width.to_bytes(4, "big") + height.to_bytes(4, "big") + png[24:]


def build_split(
    root: Path,
    images: list[tuple[int, str, int, int]],
    captions: list[tuple[int, int, str]],
    instances: list[tuple[int, int, int, list[float]]] | None,
    categories: list[tuple[int, str]] = ((1, "person"), (18, "dog")),
) -> Path:
    """Write annotations/captions_ and instances_train2014.json and the image folder."""
    image_entries = [
        {"id": i, "file_name": name, "width": w, "height": h} for i, name, w, h in images
    ]
    caption_data = {
        "images": image_entries,
        "annotations": [{"id": c, "image_id": i, "caption": text} for c, i, text in captions],
    }
    write(root / "annotations" / f"captions_{SPLIT}.json", json.dumps(caption_data).encode())
    if instances is not None:
        instance_data = {
            "images": image_entries,
            "annotations": [
                {"id": a, "image_id": i, "category_id": c, "bbox": box, "iscrowd": 0}
                for a, i, c, box in instances
            ],
            "categories": [{"id": c, "name": n, "supercategory": n} for c, n in categories],
        }
        write(root / "annotations" / f"instances_{SPLIT}.json", json.dumps(instance_data).encode())
    (root / SPLIT).mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Three images: a two-colour PNG with captions (written out of order) and boxes, a grey JPEG,
    and one PNG without any caption."""
    root = tmp_path / "coco"
    build_split(
        root,
        images=[(3, "a.png", 6, 4), (1, "b.jpg", 5, 5), (2, "nocap.png", 2, 2)],
        captions=[(12, 3, "second caption"), (11, 3, "first caption"), (13, 1, "a grey square")],
        instances=[(41, 3, 18, [3.0, 0.0, 3.0, 4.0]), (40, 3, 1, [0.0, 0.0, 3.0, 4.0])],
    )
    write(root / SPLIT / "a.png", encode(two_colour_bgr(), ".png"))
    write(root / SPLIT / "b.jpg", encode(np.full((5, 5), 90, np.uint8), ".jpg"))
    write(root / SPLIT / "nocap.png", encode(np.zeros((2, 2, 3), np.uint8), ".png"))
    return root


def captions_path(root: Path) -> Path:
    return root / "annotations" / f"captions_{SPLIT}.json"


def instances_path(root: Path) -> Path:
    return root / "annotations" / f"instances_{SPLIT}.json"


# ---------------------------------------------------------------------------------------------
# Decoding to RGB
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext, tolerance", [(".png", 0), (".jpg", 3), (".bmp", 0)])
def test_colour_image_reads_as_rgb(tmp_path: Path, ext: str, tolerance: int) -> None:
    path = write(tmp_path / f"x{ext}", encode(two_colour_bgr(), ext, cv2.IMWRITE_JPEG_QUALITY, 100))
    rgb = read_image_rgb(path)
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb[:, 0].astype(int) - (255, 0, 0)).max() <= tolerance
    assert np.abs(rgb[:, -1].astype(int) - (0, 0, 255)).max() <= tolerance


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    path = write(tmp_path / "g.png", encode(np.full((3, 5), 77, np.uint8), ".png"))
    rgb = read_image_rgb(path)
    assert rgb.shape == (3, 5, 3)
    assert (rgb == 77).all()


def test_alpha_is_dropped_not_composited(tmp_path: Path) -> None:
    bgra = np.zeros((2, 3, 4), np.uint8)
    bgra[:] = (0, 100, 200, 0)  # fully transparent orange: compositing on white would give white
    rgb = read_image_rgb(write(tmp_path / "a.png", encode(bgra, ".png")))
    assert rgb.shape == (2, 3, 3)
    assert (rgb == (200, 100, 0)).all()


def test_sixteen_bit_is_rescaled_not_truncated(tmp_path: Path) -> None:
    gray = np.array([[65535, 32768], [0, 65280]], np.uint16)
    rgb = read_image_rgb(write(tmp_path / "g16.png", encode(gray, ".png")))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    # 65280 >> 8 would be 255; 65280 / 257 rounds to 254.
    assert rgb[..., 0].tolist() == [[255, 128], [0, 254]]
    colour = np.zeros((2, 2, 3), np.uint16)
    colour[:] = (0, 32768, 65535)  # BGR
    rgb = read_image_rgb(write(tmp_path / "c16.png", encode(colour, ".png")))
    assert (rgb == (255, 128, 0)).all()


def test_cmyk_jpeg_is_converted(tmp_path: Path) -> None:
    Image = pytest.importorskip("PIL.Image")
    for name, cmyk, expected in [
        ("red", (0, 255, 255, 0), (255, 0, 0)),
        ("blue", (255, 255, 0, 0), (0, 0, 255)),
        ("black", (0, 0, 0, 255), (0, 0, 0)),
    ]:
        buf = io.BytesIO()
        Image.new("CMYK", (8, 8), cmyk).save(buf, "JPEG", quality=100)
        rgb = read_image_rgb(write(tmp_path / f"{name}.jpg", buf.getvalue()))
        assert rgb.shape == (8, 8, 3)
        assert np.abs(rgb.astype(int) - expected).max() <= 8, name


def test_palette_png_is_converted(tmp_path: Path) -> None:
    Image = pytest.importorskip("PIL.Image")
    image = Image.new("P", (3, 2), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    rgb = read_image_rgb(write(tmp_path / "p.png", buf.getvalue()))
    assert rgb.shape == (2, 3, 3)
    assert (rgb == (10, 200, 30)).all()


def test_exif_orientation_is_not_applied(tmp_path: Path) -> None:
    """COCO boxes are in the stored pixel grid, as PIL and skimage (AttnGAN, cocoapi) read it."""
    Image = pytest.importorskip("PIL.Image")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    Image.new("RGB", (8, 4), (255, 0, 0)).save(buf, "JPEG", exif=exif.tobytes())
    assert read_image_rgb(write(tmp_path / "rot.jpg", buf.getvalue())).shape == (4, 8, 3)


# ---------------------------------------------------------------------------------------------
# Per-image failures
# ---------------------------------------------------------------------------------------------


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each bad input with the word its reason must contain."""
    png = encode(two_colour_bgr(16, 16), ".png")
    jpg = encode(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8), ".jpg")
    idat = png.index(b"IDAT") + 8
    corrupt_png = png[:idat] + bytes(b ^ 0x5A for b in png[idat : idat + 20]) + png[idat + 20 :]
    (folder / "dir.jpg").mkdir(parents=True)
    return {
        "missing": (folder / "missing.jpg", "missing"),
        "empty": (write(folder / "empty.jpg", b""), "empty"),
        "text": (write(folder / "text.jpg", b"this is not an image\n" * 10), "not an image"),
        "truncated jpeg": (write(folder / "half.jpg", jpg[: len(jpg) // 2]), "truncated"),
        "jpeg without EOI": (write(folder / "noeoi.jpg", jpg[:-2]), "truncated"),
        "truncated png": (write(folder / "half.png", png[: len(png) // 2]), "truncated"),
        "corrupt": (write(folder / "corrupt.png", corrupt_png), "corrupt"),
        "zero size": (write(folder / "zero.png", patch_png_size(png, 0, 16)), "zero-size"),
        "huge header": (write(folder / "huge.png", patch_png_size(png, 30000, 30000)), "too large"),
        "directory": (folder / "dir.jpg", "not a file"),
    }


def test_bad_files_raise_item_error_with_distinct_reasons(tmp_path: Path) -> None:
    reasons = {}
    for kind, (path, word) in bad_files(tmp_path).items():
        with pytest.raises(ItemError) as info:
            read_image_rgb(path)
        reasons[kind] = str(info.value)
        assert word in reasons[kind], (kind, reasons[kind])
    distinct = {k: r for k, r in reasons.items() if k not in ("jpeg without EOI", "truncated png")}
    assert len(set(distinct.values())) == len(distinct)


def test_pixel_limit_applies_to_header_and_decoded_sizes(tmp_path: Path) -> None:
    for ext in (".png", ".jpg", ".bmp"):  # PNG/JPEG by header, BMP after decoding
        path = write(tmp_path / f"x{ext}", encode(two_colour_bgr(4, 4), ext))
        assert read_image_rgb(path, max_pixels=16).shape == (4, 4, 3)
        with pytest.raises(ItemError, match="too large"):
            read_image_rgb(path, max_pixels=15)


# ---------------------------------------------------------------------------------------------
# Annotation files
# ---------------------------------------------------------------------------------------------


def test_split_returns_what_was_written(dataset: Path) -> None:
    split = CocoSplit.open(dataset, SPLIT, require_instances=True)
    assert split.has_instances
    assert split.image_ids() == [1, 2, 3]
    assert split.captioned_image_ids() == [1, 3]
    assert split.image_info(3) == {"id": 3, "file_name": "a.png", "width": 6, "height": 4}
    assert split.captions(3) == [(11, "first caption"), (12, "second caption")]
    assert split.captions(2) == []
    assert [(a["id"], a["category_id"], a["bbox"]) for a in split.instances(3)] == [
        (40, 1, [0.0, 0.0, 3.0, 4.0]),
        (41, 18, [3.0, 0.0, 3.0, 4.0]),
    ]
    assert split.instances(1) == []
    assert split.categories() == {1: "person", 18: "dog"}
    assert split.image_path(3) == dataset / SPLIT / "a.png"
    rgb = split.load_image(3)
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[0, -1]) == (0, 0, 255)
    with pytest.raises(KeyError):
        split.image_info(99)


def test_opening_prints_nothing(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    CocoSplit.open(dataset, SPLIT)
    assert capsys.readouterr().out == ""


def test_instances_file_is_optional_unless_required(dataset: Path) -> None:
    instances_path(dataset).unlink()
    split = CocoSplit.open(dataset, SPLIT)
    assert not split.has_instances
    assert split.instances(3) == [] and split.categories() == {}
    assert split.captions(3)[0] == (11, "first caption")
    with pytest.raises(CpganError, match=f"instances_{SPLIT}.json: annotation file is missing"):
        CocoSplit.open(dataset, SPLIT, require_instances=True)


def edit_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


CAPTION_DEFECTS = {
    "missing": (lambda p: p.unlink(), "missing"),
    "empty": (lambda p: p.write_bytes(b""), "empty"),
    "not json": (lambda p: p.write_text("{not json"), "invalid JSON"),
    "a list": (lambda p: p.write_text("[1, 2]"), "not a COCO annotation file"),
    "a folder": (lambda p: (p.unlink(), p.mkdir()), "cannot read annotation file"),
    "an image not an object": (
        lambda p: edit_json(p, lambda d: d["images"].__setitem__(1, 5)),
        "images[1] is not an object",
    ),
    "zero width": (
        lambda p: edit_json(p, lambda d: d["images"][0].update(width=0)),
        "has a non-positive width or height",
    ),
    "no images": (lambda p: p.write_text('{"annotations": []}'), 'no "images" list'),
    "no file_name": (
        lambda p: edit_json(p, lambda d: d["images"][0].pop("file_name")),
        'images[0] has no "file_name"',
    ),
    "string id": (
        lambda p: edit_json(p, lambda d: d["images"][1].update(id="7")),
        'images[1] has a non-int "id"',
    ),
    "boolean id": (
        lambda p: edit_json(p, lambda d: d["annotations"][0].update(id=True)),
        'annotations[0] has a non-int "id"',
    ),
    "duplicate image id": (
        lambda p: edit_json(p, lambda d: d["images"][2].update(id=3)),
        "duplicate image id 3",
    ),
    "duplicate caption id": (
        lambda p: edit_json(p, lambda d: d["annotations"][0].update(id=11)),
        "duplicate annotation id 11",
    ),
    "unknown image": (
        lambda p: edit_json(p, lambda d: d["annotations"][2].update(image_id=5)),
        "refers to unknown image id 5",
    ),
}


@pytest.mark.parametrize("defect", sorted(CAPTION_DEFECTS))
def test_bad_captions_file_is_a_one_line_error(dataset: Path, defect: str) -> None:
    damage, words = CAPTION_DEFECTS[defect]
    damage(captions_path(dataset))
    with pytest.raises(CpganError) as info:
        CocoSplit.open(dataset, SPLIT)
    message = str(info.value)
    assert message.startswith(str(captions_path(dataset)) + ":")
    assert "\n" not in message
    assert words in message


INSTANCE_DEFECTS = {
    "undeclared category": (
        lambda d: d["annotations"][0].update(category_id=5),
        "undeclared category id 5",
    ),
    "short bbox": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "not 4 numbers"),
    "no categories": (lambda d: d.pop("categories"), 'no "categories" list'),
    "other split": (lambda d: d["images"].pop(), "image ids differ"),
}


@pytest.mark.parametrize("defect", sorted(INSTANCE_DEFECTS))
def test_bad_instances_file_is_a_one_line_error(dataset: Path, defect: str) -> None:
    change, words = INSTANCE_DEFECTS[defect]
    edit_json(instances_path(dataset), change)
    with pytest.raises(CpganError) as info:
        CocoSplit.open(dataset, SPLIT)
    message = str(info.value)
    assert message.startswith(str(instances_path(dataset)) + ":")
    assert "\n" not in message and words in message


def test_missing_image_folder_and_bad_split_name_are_fatal(dataset: Path) -> None:
    (dataset / SPLIT / "a.png").unlink()
    (dataset / SPLIT / "b.jpg").unlink()
    (dataset / SPLIT / "nocap.png").unlink()
    (dataset / SPLIT).rmdir()
    with pytest.raises(CpganError, match="image folder is missing"):
        CocoSplit.open(dataset, SPLIT)
    with pytest.raises(CpganError, match="invalid split name"):
        CocoSplit.open(dataset, "../annotations")


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x.png", "/etc/passwd", "sub/../../x.png", "link.png"])
def test_file_names_leaving_the_image_folder_are_refused(tmp_path: Path, name: str) -> None:
    root = build_split(tmp_path / "coco", [(1, name, 6, 4)], [(1, 1, "x")], None)
    outside = write(root / "x.png", encode(two_colour_bgr(), ".png"))  # a real image, readable
    (root / SPLIT / "sub").mkdir()
    (root / SPLIT / "link.png").symlink_to(outside)
    split = CocoSplit.open(root, SPLIT)
    with pytest.raises(ItemError, match="image folder"):
        split.image_path(1)
    with pytest.raises(ItemError, match="image folder"):
        split.load_image(1)


def test_links_that_stay_inside_are_followed(tmp_path: Path) -> None:
    """A split folder that is itself a link (a shared dataset) and an inner link both work."""
    store = tmp_path / "store"
    write(store / "a.png", encode(two_colour_bgr(), ".png"))
    (store / "inner.png").symlink_to(store / "a.png")
    root = build_split(
        tmp_path / "coco", [(1, "a.png", 6, 4), (2, "inner.png", 6, 4)], [(1, 1, "x")], None
    )
    (root / SPLIT).rmdir()
    (root / SPLIT).symlink_to(store)
    split = CocoSplit.open(root, SPLIT)
    for image_id in (1, 2):
        assert tuple(split.load_image(image_id)[0, 0]) == (255, 0, 0)


# ---------------------------------------------------------------------------------------------
# Iterating with failures
# ---------------------------------------------------------------------------------------------


def test_iter_images_yields_every_id_with_image_or_reason(tmp_path: Path) -> None:
    folder = tmp_path / "coco" / SPLIT
    bad = bad_files(folder)
    good = {
        "good.png": encode(two_colour_bgr(), ".png"),
        "good.jpg": encode(two_colour_bgr(), ".jpg", cv2.IMWRITE_JPEG_QUALITY, 100),
    }
    for name, data in good.items():
        write(folder / name, data)
    write(folder / "small.png", encode(two_colour_bgr(4, 4), ".png"))  # annotated as 6x4
    names = (
        ["good.png"]
        + [path.name for path, _ in bad.values()]
        + ["../x.png", "small.png", "good.jpg"]
    )
    images = [(i, name, 6, 4) for i, name in enumerate(names, start=100)]
    root = build_split(tmp_path / "coco", images, [(1, 100, "x")], None)
    split = CocoSplit.open(root, SPLIT)

    failures: list[ImageFailure] = []
    results = list(iter_images(split, split.image_ids(), failures=failures))

    assert [r[0] for r in results] == split.image_ids()
    by_name = {names[i - 100]: (rgb, reason) for i, rgb, reason in results}
    for name in good:
        rgb, reason = by_name[name]
        assert reason is None and rgb.shape == (4, 6, 3)
        assert np.abs(rgb[0, 0].astype(int) - (255, 0, 0)).max() <= 3
    failed = [name for name in names if name not in good]
    for name in failed:
        rgb, reason = by_name[name]
        assert rgb is None and reason
    assert "annotation says 6x4" in by_name["small.png"][1]
    assert "image folder" in by_name["../x.png"][1]
    assert [f.file_name for f in failures] == failed
    assert all(f.reason == by_name[f.file_name][1] for f in failures)
    assert [f.image_id for f in failures] == [names.index(n) + 100 for n in failed]
