"""Read the official COCO 2014 layout: captions, instances and images (DESIGN §4, Data).

Layout under ``root``::

    annotations/captions_{split}.json    required: images + caption annotations
    annotations/instances_{split}.json   boxes + categories (optional for text-only stages)
    {split}/<file_name>                  the images

Annotation files are validated before pycocotools indexes them, because pycocotools trusts its
input: a duplicate id silently overwrites an entry and a malformed file fails deep inside with a
``KeyError``. Any problem with an annotation file is fatal (:class:`CpganError`, one line naming
the file). Any problem with one image (missing, corrupt, truncated, a name escaping the image
folder) is an :class:`ItemError` that the calling stage records in its index and skips.

Images are decoded with OpenCV and always returned as 8-bit RGB ``H x W x 3``: BGR/RGB mix-ups
are the classic cause of irreproducible scores. Decoding follows what AttnGAN's
``Image.open(path).convert("RGB")`` sees, so features match the original pipeline: EXIF
orientation is *not* applied (COCO's boxes and its ``width``/``height`` refer to the stored pixel
grid) and an alpha channel is dropped, not composited.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import cv2
import numpy as np
from pycocotools.coco import COCO

from cpgan import layout
from cpgan.errors import CpganError, ItemError

SPLITS = ("train2014", "val2014")
MAX_PIXELS = 100_000_000
"""Largest image decoded (width x height); COCO's largest is 640 x 640. Guards memory."""

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_SIDE = 2**31 - 1
_IMAGE_FIELDS = {"id": int, "file_name": str, "width": int, "height": int}
_CAPTION_FIELDS = {"id": int, "image_id": int, "caption": str}
_INSTANCE_FIELDS = {"id": int, "image_id": int, "category_id": int, "bbox": list}
_CATEGORY_FIELDS = {"id": int, "name": str}

_JPEG_SIGNATURE = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole, fixed 12-byte IEND chunk


# ---------------------------------------------------------------------------------------------
# Annotation files
# ---------------------------------------------------------------------------------------------


def _load_json(path: Path) -> dict[str, Any]:
    """Parse an annotation file, turning every way it can be unusable into a one-line error."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CpganError(f"{path}: annotation file is missing") from None
    except OSError as err:
        raise CpganError(f"{path}: cannot read annotation file ({err.strerror})") from None
    if not raw.strip():
        raise CpganError(f"{path}: annotation file is empty")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise CpganError(f"{path}: annotation file is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise CpganError(
            f"{path}: invalid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    if not isinstance(data, dict):
        raise CpganError(f"{path}: not a COCO annotation file (top level is not an object)")
    return data


def _entries(data: dict[str, Any], key: str, fields: dict[str, type], path: Path) -> list[dict]:
    """Return ``data[key]``, checked to be a list of objects carrying ``fields`` with their types.

    ``bool`` is rejected where an ``int`` is expected (JSON ``true`` would otherwise pass as 1).
    """
    entries = data.get(key)
    if not isinstance(entries, list):
        raise CpganError(f'{path}: not a COCO annotation file (no "{key}" list)')
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CpganError(f"{path}: {key}[{index}] is not an object")
        for name, kind in fields.items():
            if name not in entry:
                raise CpganError(f'{path}: {key}[{index}] has no "{name}"')
            value = entry[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise CpganError(
                    f'{path}: {key}[{index}] has a non-{kind.__name__} "{name}" ({value!r:.40})'
                )
    return entries


def _unique_ids(entries: list[dict], what: str, path: Path) -> set[int]:
    """The set of ``id`` values; a repeated id is fatal because pycocotools would drop one entry,
    and so is one beyond int64, the type every artifact stores ids in."""
    seen: set[int] = set()
    for entry in entries:
        if not _INT64_MIN <= entry["id"] <= _INT64_MAX:
            raise CpganError(f"{path}: {what} id {entry['id']} does not fit in 64 bits")
        if entry["id"] in seen:
            raise CpganError(f"{path}: duplicate {what} id {entry['id']}")
        seen.add(entry["id"])
    return seen


def _check_images(data: dict[str, Any], path: Path) -> set[int]:
    """Validate the ``images`` list and return its ids."""
    images = _entries(data, "images", _IMAGE_FIELDS, path)
    for image in images:
        if image["width"] <= 0 or image["height"] <= 0:
            raise CpganError(f"{path}: image id {image['id']} has a non-positive width or height")
        if max(image["width"], image["height"]) > _MAX_SIDE:  # int32 in regions/index.parquet
            raise CpganError(f"{path}: image id {image['id']} has a width or height above "
                             f"{_MAX_SIDE}")
    return _unique_ids(images, "image", path)


def _check_annotations(
    data: dict[str, Any], fields: dict[str, type], image_ids: set[int], path: Path
) -> list[dict]:
    """Validate the ``annotations`` list: unique ids, each pointing at a listed image."""
    annotations = _entries(data, "annotations", fields, path)
    _unique_ids(annotations, "annotation", path)
    for ann in annotations:
        if ann["image_id"] not in image_ids:
            raise CpganError(
                f"{path}: annotation id {ann['id']} refers to unknown image id {ann['image_id']}"
            )
    return annotations


def _check_instances(data: dict[str, Any], image_ids: set[int], path: Path) -> None:
    """Validate boxes (COCO ``[x, y, w, h]``) and that every category used is declared."""
    categories = _unique_ids(_entries(data, "categories", _CATEGORY_FIELDS, path), "category", path)
    for ann in _check_annotations(data, _INSTANCE_FIELDS, image_ids, path):
        box = ann["bbox"]
        if len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in box
        ):
            raise CpganError(f"{path}: annotation id {ann['id']} has a bbox that is not 4 numbers")
        if ann["category_id"] not in categories:
            raise CpganError(
                f"{path}: annotation id {ann['id']} has undeclared category id {ann['category_id']}"
            )


annotation_file = layout.annotation_file  # in cpgan.layout: read without torch


def _index(data: dict[str, Any]) -> COCO:
    """Build a pycocotools index over already-validated data, without its progress prints."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ---------------------------------------------------------------------------------------------
# One split
# ---------------------------------------------------------------------------------------------


class CocoSplit:
    """One split (``train2014``/``val2014``) of a COCO-layout dataset, validated and indexed.

    The image list comes from the captions file. Images without any caption stay listed (a stage
    indexing images must account for every one) and :meth:`captioned_image_ids` gives the ones a
    text stage can use.
    """

    def __init__(self, root: Path, split: str, captions: COCO, instances: COCO | None) -> None:
        self.root = root
        self.split = split
        self.folder = root / split
        self._folder_resolved = self.folder.resolve()
        self._captions = captions
        self._instances = instances
        self._image_ids = sorted(captions.imgs)

    @classmethod
    def open(cls, root: Path, split: str, require_instances: bool = False) -> CocoSplit:
        """Load and validate ``annotations/{captions,instances}_{split}.json`` under ``root``.

        The instances file is optional unless ``require_instances``; when present its image ids
        must equal the captions file's, which catches a train/val mix-up.
        """
        root = Path(root)
        if split in ("", ".", "..") or Path(split).name != split:
            raise CpganError(f"{root}: invalid split name {split!r}")
        folder = root / split
        if not folder.is_dir():
            raise CpganError(f"{folder}: image folder is missing")
        captions_path = annotation_file(root, "captions", split)
        captions_data = _load_json(captions_path)
        image_ids = _check_images(captions_data, captions_path)
        _check_annotations(captions_data, _CAPTION_FIELDS, image_ids, captions_path)

        instances_path = annotation_file(root, "instances", split)
        instances = None
        if require_instances or instances_path.exists():
            instances_data = _load_json(instances_path)
            instance_image_ids = _check_images(instances_data, instances_path)
            if instance_image_ids != image_ids:
                raise CpganError(
                    f"{instances_path}: image ids differ from {captions_path.name} "
                    f"({len(instance_image_ids - image_ids)} only here, "
                    f"{len(image_ids - instance_image_ids)} only there)"
                )
            _check_instances(instances_data, image_ids, instances_path)
            instances = _index(instances_data)
        return cls(root, split, _index(captions_data), instances)

    @property
    def captions_file(self) -> Path:
        return annotation_file(self.root, "captions", self.split)

    @property
    def instances_file(self) -> Path:
        return annotation_file(self.root, "instances", self.split)

    @property
    def has_instances(self) -> bool:
        """Whether an instances file was loaded (otherwise :meth:`instances` is always empty)."""
        return self._instances is not None

    def image_ids(self) -> list[int]:
        """Every image id of the split, ascending."""
        return list(self._image_ids)

    def captioned_image_ids(self) -> list[int]:
        """Image ids that have at least one caption, ascending."""
        return [i for i in self._image_ids if self._captions.imgToAnns.get(i)]

    def _image(self, image_id: int) -> dict[str, Any]:
        try:
            return self._captions.imgs[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id} is not in {self.split}") from None

    def image_info(self, image_id: int) -> dict[str, Any]:
        """``id``, ``file_name``, ``width``, ``height`` of one image (pixels of the stored grid)."""
        image = self._image(image_id)
        return {key: image[key] for key in _IMAGE_FIELDS}

    def captions(self, image_id: int) -> list[tuple[int, str]]:
        """``(caption id, text)`` pairs of one image, by caption id; text as written in the file."""
        self._image(image_id)
        anns = sorted(self._captions.imgToAnns.get(image_id, []), key=lambda a: a["id"])
        return [(ann["id"], ann["caption"]) for ann in anns]

    def instances(self, image_id: int) -> list[dict[str, Any]]:
        """COCO instance annotations (copies) of one image, by id; ``[]`` without instances."""
        self._image(image_id)
        if self._instances is None:
            return []
        anns = sorted(self._instances.imgToAnns.get(image_id, []), key=lambda a: a["id"])
        return [dict(ann) for ann in anns]

    def categories(self) -> dict[int, str]:
        """Category id -> name; ``{}`` without an instances file."""
        if self._instances is None:
            return {}
        return {cat_id: cat["name"] for cat_id, cat in sorted(self._instances.cats.items())}

    def image_path(self, image_id: int) -> Path:
        """Path of one image; a file name that leads outside the split's folder is refused.

        The check resolves symbolic links, so a link inside the folder pointing elsewhere is
        refused too, while a split folder that is itself a link (common with shared datasets) works.
        """
        name = self._image(image_id)["file_name"]
        relative = Path(name)
        if relative.name == "":
            raise ItemError(f"file name is empty: {name!r}")
        if "\0" in name:  # no file system accepts it; resolve() would raise ValueError
            raise ItemError(f"file name contains a NUL character: {name!r:.80}")
        if relative.is_absolute() or ".." in relative.parts:
            raise ItemError(f"file name escapes the image folder: {name!r}")
        path = self.folder / relative
        if not path.resolve().is_relative_to(self._folder_resolved):
            raise ItemError(f"file name resolves outside the image folder: {name!r}")
        return path

    def load_image(self, image_id: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """Decode one image to uint8 RGB ``H x W x 3``; per-image problems raise ItemError.

        The decoded size must match the annotation's ``width``/``height``: the boxes are in that
        pixel grid, so a mismatch would silently misplace every region.
        """
        info = self.image_info(image_id)
        rgb = read_image_rgb(self.image_path(image_id), max_pixels)
        height, width = rgb.shape[:2]
        if (width, height) != (info["width"], info["height"]):
            raise ItemError(
                f"image is {width}x{height} but the annotation says "
                f"{info['width']}x{info['height']}"
            )
        return rgb


@dataclass
class ImageFailure:
    """One image that could not be used, as recorded in a stage's index."""

    image_id: int
    file_name: str
    reason: str


def iter_images(
    split: CocoSplit,
    image_ids: Iterable[int],
    max_pixels: int = MAX_PIXELS,
    failures: list[ImageFailure] | None = None,
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Yield ``(image_id, rgb, None)`` or ``(image_id, None, reason)`` for every id, in order.

    Nothing is dropped: a caller writes each failure reason into its index instead of wrapping
    every load in try/except. When ``failures`` is given, each failure is also appended to it.
    """
    for image_id in image_ids:
        try:
            yield image_id, split.load_image(image_id, max_pixels), None
        except ItemError as err:
            reason = str(err)
            if failures is not None:
                file_name = split.image_info(image_id)["file_name"]
                failures.append(ImageFailure(image_id, file_name, reason))
            yield image_id, None, reason


# ---------------------------------------------------------------------------------------------
# Image decoding
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    """What the container tells before decoding: ``(width, height)`` if known, and whether the
    file visibly stops before its end marker."""

    size: tuple[int, int] | None
    truncated: bool


def _jpeg_header(data: bytes) -> _Header:
    """Walk the JPEG segments up to the first scan, reading the frame size on the way.

    Segments are skipped by their length, so an EXIF thumbnail (a JPEG inside APP1) is never
    mistaken for the image. Entropy-coded data cannot contain ``FF D9`` (0xFF is byte-stuffed),
    so the end-of-image marker appearing after the first scan means the file was not cut short;
    libjpeg would otherwise decode a truncated file into grey rows with only a warning. A walk
    that meets a non-marker byte is left to the decoder to call corrupt.
    """
    size = None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return _Header(size, truncated=False)
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in _JPEG_SOF and size is None and pos + 9 <= len(data):
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            size = (width, height)
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            return _Header(size, truncated=data.find(_JPEG_EOI, pos) == -1)
    return _Header(size, truncated=True)


def _png_header(data: bytes) -> _Header:
    """Read the size from IHDR (always the first chunk) and check that IEND is present."""
    size = None
    if len(data) >= 24 and data[12:16] == b"IHDR":
        size = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
    return _Header(size, truncated=data.rfind(_PNG_IEND) == -1)


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width == 0 or height == 0:
        raise ItemError("zero-size image")
    if width * height > max_pixels:
        raise ItemError(f"too large: {width}x{height} pixels exceeds the limit of {max_pixels}")


def _decode(data: bytes, path: Path) -> np.ndarray:
    """OpenCV decode keeping depth and channels; tell "corrupt" from "not an image" on failure.

    ``IMREAD_UNCHANGED`` keeps 16-bit data for an exact rescale and skips EXIF rotation. OpenCV
    converts CMYK JPEGs (including Adobe's inverted CMYK) to BGR itself.
    """
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as err:
        raise ItemError(f"corrupt image data ({str(err).strip().splitlines()[-1]})") from None
    if array is None:
        if cv2.haveImageReader(str(path)):
            raise ItemError("corrupt image data")
        raise ItemError("not an image")
    return array


def _to_rgb8(array: np.ndarray) -> np.ndarray:
    """Convert any decoded array to uint8 RGB: 16-bit rescaled, gray expanded, alpha dropped."""
    if array.dtype == np.uint16:
        # Round-to-nearest v/257 maps 0..65535 exactly onto 0..255; >> 8 would bias it low.
        array = ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ItemError(f"unsupported pixel type {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    if array.ndim == 3 and array.shape[2] == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    if array.ndim == 3 and array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    raise ItemError(f"unsupported image shape {array.shape}")


def read_image_rgb(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file into a contiguous uint8 RGB ``H x W x 3`` array.

    Raises :class:`ItemError` with a short reason (missing file, empty file, not an image,
    truncated file, corrupt image data, zero-size image, too large, ...). For JPEG and PNG the size
    is read from the header so an oversized image is refused before any pixel memory is used;
    other formats are checked after decoding (OpenCV's own 2**30 pixel cap bounds that case).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ItemError("missing file") from None
    except IsADirectoryError:
        raise ItemError("not a file (a directory)") from None
    except OSError as err:
        raise ItemError(f"unreadable file ({err.strerror})") from None
    if not data:
        raise ItemError("empty file")
    header = None
    if data.startswith(_JPEG_SIGNATURE):
        header = _jpeg_header(data)
    elif data.startswith(_PNG_SIGNATURE):
        header = _png_header(data)
    if header is not None and header.size is not None:
        _check_size(*header.size, max_pixels)
    if header is not None and header.truncated:
        raise ItemError("truncated file")
    array = _decode(data, path)
    _check_size(array.shape[1], array.shape[0], max_pixels)
    return np.ascontiguousarray(_to_rgb8(array))
