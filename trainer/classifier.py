"""``cpgan-eval fit-classifier``: the toy preset's scoring network for IS and FID.

Inception-v3 knows ImageNet, not coloured shapes, so on the toy dataset its IS and FID would
measure little. DESIGN §4 replaces it there with a classifier fitted on real toy train images:
the class of an image is the (shape, colour) of its largest object, 8 x 8 = 64 classes, and
the classifier's pooled features stand in for Inception's pool3 in FID.

"Largest" is by visible area (the annotation's ``area``, the pixels not covered by shapes
drawn later), since that is what the pixels show; ties go to the lower annotation id. Images
are decoded through :class:`~cpgan.pipeline.coco.CocoSplit`; one that fails to decode, or has
no instance, is skipped and counted.

The recipe: images resized to ``image_size`` with area interpolation and held in memory as
uint8 (4,000 x 64 x 64 x 3 = 49 MB) beside a per-pixel class map (which object covers each
pixel, from the instance polygons); random horizontal flips (every toy shape is mirror-
symmetric about the vertical axis, so flips keep the label) and shifts of up to 4 px applied
to image and map together; AdamW with a one-cycle learning rate; the image cross-entropy plus
the per-cell cross-entropy of the dense auxiliary head, whose targets are the majority class
of each 8 x 8 cell of the shifted map (see :class:`~cpgan.model.classifier.ToyClassifier`).
Every random choice is a function of the seed. The result is ``models/classifier.pt``, a dict
of tensors, lists and ints loadable with ``torch.load(..., weights_only=True)`` (see
:func:`load_classifier`).

Measured on the default toy dataset (4,000 train / 1,000 val images at 128 px, scored at
64 px), 30 epochs, two CPU cores: val accuracy 0.86 (shape 0.89, colour 0.94) in 3.6 minutes.
The remaining errors are mostly near-ties for "largest" (second object within ~20% of the
area) and hexagons read as circles (a 10 px hexagon is nearly round at 64 px). Fewer epochs
cost accuracy quickly: shapes are learnt late (accuracy 0.25 after 7 epochs, 0.55 after 10).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor, nn
from tqdm import tqdm

from cpgan import layout
from cpgan.errors import CpganError
from cpgan.model.classifier import TOY_IMAGE_SIZE, TOY_WIDTH, InceptionScorer, ToyClassifier
from cpgan.pipeline.artifacts import atomic_write
from cpgan.pipeline.coco import CocoSplit, iter_images
from cpgan.pipeline.toy import TOY_CATEGORIES, TOY_COLOURS
from cpgan.torch_file import load_torch_file, refuse_nonfinite

# in cpgan.layout: the up-to-date checks read these without torch
TRAIN_SPLIT = layout.CLASSIFIER_TRAIN_SPLIT
VAL_SPLIT = layout.CLASSIFIER_VAL_SPLIT
MODEL_NAME = layout.CLASSIFIER_NAME
EPOCHS = layout.CLASSIFIER_EPOCHS
BATCH_SIZE = layout.CLASSIFIER_BATCH_SIZE
LR = layout.CLASSIFIER_LR
WEIGHT_DECAY = 1e-4
WARMUP = 0.15
DENSE_WEIGHT = 1.0
BACKGROUND_WEIGHT = 0.2
"""Weight of background cells in the dense loss: ~90% of cells are background."""
DENSE_STRIDE = 8
BACKGROUND = len(TOY_CATEGORIES) * len(TOY_COLOURS)
"""Class index of "no object" in the dense targets, after the 64 (shape, colour) classes."""
SHIFT_FRACTION = 1 / 16
"""Random translations of up to this fraction of the side (4 px at 64 px)."""
SCORING_KINDS = ("classifier", "inception")
_SIZE_KEYS = ("num_shapes", "num_colours", "width", "image_size")


def toy_classes() -> list[tuple[str, str]]:
    """The 64 classes in index order: class ``s * 8 + c`` is (shape s, colour c)."""
    return [(shape, colour) for shape in TOY_CATEGORIES for colour in TOY_COLOURS]


# --------------------------------------------------------------------------------------------
# Labels


def largest_instance(instances: Sequence[dict]) -> dict | None:
    """The instance with the largest visible ``area`` (first by id on ties; the box area when
    an annotation has no ``area``), None if there is none."""
    best, best_area = None, -1.0
    for ann in sorted(instances, key=lambda a: a["id"]):
        area = float(ann.get("area", ann["bbox"][2] * ann["bbox"][3]))
        if area > best_area:
            best, best_area = ann, area
    return best


def instance_class(ann: dict, categories: dict[int, str], where: Path) -> int:
    """Class index of one toy instance from its category and ``color`` attribute."""
    shape, colour = categories.get(ann["category_id"]), ann.get("color")
    if shape not in TOY_CATEGORIES or colour not in TOY_COLOURS:
        raise CpganError(f"{where}: annotation id {ann['id']} is not a toy shape with a toy "
                         f"colour ({shape!r}, {colour!r}); fit-classifier needs the toy dataset")
    return TOY_CATEGORIES.index(shape) * len(TOY_COLOURS) + list(TOY_COLOURS).index(colour)


def image_label(instances: Sequence[dict], categories: dict[int, str], where: Path) -> int | None:
    """Class of an image: its largest object's (shape, colour); None without instances."""
    largest = largest_instance(instances)
    return None if largest is None else instance_class(largest, categories, where)


def _instance_mask(ann: dict, height: int, width: int, where: Path) -> np.ndarray:
    """Visible mask of one instance from its COCO segmentation (the box when it has none)."""
    segmentation = ann.get("segmentation")
    if not segmentation:
        x, y, w, h = ann["bbox"]
        segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    if isinstance(segmentation, dict) and segmentation.get("size") != [height, width]:
        # An RLE decodes to its own size: a hostile one could ask for gigabytes.
        raise CpganError(f"{where}: annotation id {ann['id']} has an RLE segmentation of size "
                         f"{segmentation.get('size')!r:.40}, its image is {height}x{width}")
    try:
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        return mask_utils.decode(rle)
    except Exception as exc:  # pycocotools raises bare Exception for unsupported input
        raise CpganError(f"{where}: annotation id {ann['id']} has an unreadable segmentation "
                         f"({type(exc).__name__})") from None


def class_map(instances: Sequence[dict], categories: dict[int, str], height: int, width: int,
              size: int, where: Path) -> np.ndarray:
    """``[size, size]`` uint8 map of the image resized to ``size``: per pixel, the class of the
    instance covering most of it, or background (class 64) when uncovered area is the majority.
    The dense head's targets are cut from it after augmentation (:func:`cell_targets`)."""
    coverage = [np.ones((size, size), np.float32)]
    classes = [BACKGROUND]
    for ann in instances:
        mask = _instance_mask(ann, height, width, where).astype(np.float32)
        coverage.append(cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA))
        classes.append(instance_class(ann, categories, where))
    stack = np.stack(coverage)
    stack[0] -= stack[1:].sum(axis=0)
    return np.asarray(classes, np.uint8)[stack.argmax(axis=0)]


def cell_targets(maps: Tensor, stride: int = DENSE_STRIDE) -> Tensor:
    """``[B, S / stride, S / stride]`` dense-head targets: the majority class of each cell
    (ties to the lower class), counted with one ``bincount`` over (image, class, cell)."""
    batch, height, width = maps.shape
    rows, cols = height // stride, width // stride
    cell = (torch.arange(rows * stride, device=maps.device) // stride).unsqueeze(1) * cols + \
        torch.arange(cols * stride, device=maps.device) // stride
    cells = rows * cols
    image = torch.arange(batch, device=maps.device).view(-1, 1, 1) * (BACKGROUND + 1) * cells
    index = image + maps[:, :rows * stride, :cols * stride].long() * cells + cell
    counts = torch.bincount(index.flatten(), minlength=batch * (BACKGROUND + 1) * cells)
    return counts.view(batch, BACKGROUND + 1, rows, cols).argmax(dim=1)


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class LabelledImages:
    """A split's usable images in memory: uint8 ``[N, 3, S, S]``, labels ``[N]``, class maps
    uint8 ``[N, S, S]``."""

    image_ids: list[int]
    images: Tensor
    labels: Tensor
    maps: Tensor
    skipped_failed: int
    skipped_empty: int

    def __len__(self) -> int:
        return len(self.image_ids)


def resize_image(rgb: np.ndarray, size: int) -> Tensor:
    """One ``H x W x 3`` uint8 image as a ``[3, size, size]`` uint8 tensor (area resize, the
    scoring input of real images)."""
    if rgb.shape[:2] != (size, size):
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def to_unit_range(images: Tensor) -> Tensor:
    """uint8 images to float in [-1, 1], the generator's output convention."""
    return images.float() / 127.5 - 1.0


def load_labelled(split: CocoSplit, image_size: int, limit: int | None = None,
                  progress: bool = True) -> LabelledImages:
    """Decode, label and resize the first ``limit`` images of ``split`` (all when None)."""
    categories = split.categories()
    ids, images, labels, maps, failed, empty = [], [], [], [], 0, 0
    wanted = split.image_ids()[:limit]
    for image_id, rgb, _reason in tqdm(iter_images(split, wanted), total=len(wanted),
                                       desc=f"load {split.split}", unit="img",
                                       disable=not progress, leave=False):
        if rgb is None:
            failed += 1
            continue
        instances = split.instances(image_id)
        label = image_label(instances, categories, split.instances_file)
        if label is None:
            empty += 1
            continue
        ids.append(image_id)
        images.append(resize_image(rgb, image_size))
        labels.append(label)
        maps.append(class_map(instances, categories, rgb.shape[0], rgb.shape[1], image_size,
                              split.instances_file))
    if not ids:
        raise CpganError(f"{split.instances_file}: no usable image with instances in {split.split}")
    return LabelledImages(ids, torch.stack(images), torch.tensor(labels, dtype=torch.long),
                          torch.from_numpy(np.stack(maps)), failed, empty)


def _batches(count: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    order = torch.randperm(count, generator=generator)
    return list(torch.split(order, batch_size))


def augment(images: Tensor, maps: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random horizontal flips and translations (up to ``SHIFT_FRACTION`` of the side, edges
    replicated) of float images ``[B, 3, S, S]`` and their class maps ``[B, S, S]`` together.

    Toy objects are drawn wholly inside the image, so a shift of a few pixels keeps the
    largest object and its label; the class map moves with the pixels, and the dense targets
    are cut from it afterwards.
    """
    batch, _, height, width = images.shape
    flip = torch.rand(batch, generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    maps = torch.where(flip.view(-1, 1, 1), maps.flip(-1), maps)
    margin = int(round(min(height, width) * SHIFT_FRACTION))
    if margin == 0:
        return images, maps
    pads = (margin, margin, margin, margin)
    padded = F.pad(images, pads, mode="replicate")
    padded_maps = F.pad(maps.unsqueeze(1).float(), pads, mode="replicate").squeeze(1)
    offsets = torch.randint(0, 2 * margin + 1, (batch, 2), generator=generator).tolist()
    images = torch.stack([padded[i, :, y:y + height, x:x + width]
                          for i, (y, x) in enumerate(offsets)])
    maps = torch.stack([padded_maps[i, y:y + height, x:x + width]
                        for i, (y, x) in enumerate(offsets)])
    return images, maps.to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Training


def classifier_loss(model: ToyClassifier, images: Tensor, labels: Tensor, maps: Tensor) -> Tensor:
    """Image cross-entropy + ``DENSE_WEIGHT`` x per-cell cross-entropy against the majority class
    of each cell of ``maps`` (background cells down-weighted)."""
    logits, dense = model.segment(images)
    cells = cell_targets(maps, images.shape[-1] // dense.shape[-1])
    if dense.shape[-2:] != cells.shape[-2:]:
        raise ValueError(f"cell targets {tuple(cells.shape[-2:])} do not match the dense map "
                         f"{tuple(dense.shape[-2:])}")
    weight = torch.ones(model.num_classes + 1, device=images.device)
    weight[model.background_class] = BACKGROUND_WEIGHT
    dense_loss = F.cross_entropy(dense, cells, weight=weight)
    return F.cross_entropy(logits, labels) + DENSE_WEIGHT * dense_loss


@torch.no_grad()
def accuracy(model: ToyClassifier, data: LabelledImages, batch_size: int,
             device: str) -> dict[str, float]:
    """Class, shape and colour accuracy of ``model`` (eval mode) on ``data``."""
    model.eval()
    predicted = torch.cat([
        model(to_unit_range(data.images[i:i + batch_size]).to(device)).argmax(dim=1).cpu()
        for i in range(0, len(data), batch_size)])
    colours, truth = model.num_colours, data.labels
    return {"accuracy": float((predicted == truth).float().mean()),
            "shape_accuracy": float((predicted // colours == truth // colours).float().mean()),
            "colour_accuracy": float((predicted % colours == truth % colours).float().mean())}


def train_steps(model: ToyClassifier, data: LabelledImages, epochs: int, batch_size: int,
                lr: float, seed: int, device: str, progress: bool = True,
                on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW with a one-cycle schedule over ``epochs``; returns the mean loss of each epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr,
                                                   total_steps=epochs * steps_per_epoch,
                                                   pct_start=WARMUP)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for index in tqdm(_batches(len(data), batch_size, generator), desc=f"classifier "
                          f"{epoch + 1}/{epochs}", unit="batch", disable=not progress, leave=False):
            images, maps = augment(to_unit_range(data.images[index]), data.maps[index], generator)
            loss = classifier_loss(model, images.to(device), data.labels[index].to(device),
                                   maps.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        losses.append(total / len(data))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return losses


def fit_classifier(
    coco_root: Path,
    artifacts: Path,
    *,
    image_size: int = TOY_IMAGE_SIZE,
    width: int = TOY_WIDTH,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seed: int = 0,
    device: str = "cpu",
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit :class:`ToyClassifier` on the toy train split, score it on val, write
    ``<artifacts>/models/classifier.pt``; return a summary (accuracies, counts, seconds).

    ``limit`` keeps the first N train and val images (for quick checks).
    """
    start = time.perf_counter()
    if epochs < 1 or batch_size < 1 or image_size < 16 or image_size % DENSE_STRIDE:
        raise CpganError(f"{coco_root}: fit-classifier needs epochs >= 1, batch size >= 1 and an "
                         f"image size >= 16 divisible by {DENSE_STRIDE}; got {epochs}, "
                         f"{batch_size}, {image_size}")
    train_split = CocoSplit.open(Path(coco_root), TRAIN_SPLIT, require_instances=True)
    val_split = CocoSplit.open(Path(coco_root), VAL_SPLIT, require_instances=True)
    train = load_labelled(train_split, image_size, limit, progress)
    val = load_labelled(val_split, image_size, limit, progress)
    torch.manual_seed(seed)
    model = ToyClassifier(len(TOY_CATEGORIES), len(TOY_COLOURS), width, image_size).to(device)
    history: list[dict[str, float]] = []

    def record(epoch: int, loss: float) -> None:
        history.append({"epoch": epoch + 1, "loss": round(loss, 4),
                        **accuracy(model, val, 256, device)})

    losses = train_steps(model, train, epochs, batch_size, lr, seed, device, progress, record)
    final = history[-1]
    save_classifier(Path(artifacts) / "models" / MODEL_NAME, model)
    return {"val_accuracy": final["accuracy"], "val_shape_accuracy": final["shape_accuracy"],
            "val_colour_accuracy": final["colour_accuracy"], "train_loss": losses,
            "history": history, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "image_size": image_size, "width": width, "seed": seed,
            "train_images": len(train), "val_images": len(val),
            "skipped_failed": train.skipped_failed + val.skipped_failed,
            "skipped_empty": train.skipped_empty + val.skipped_empty,
            "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - start, 1)}


# --------------------------------------------------------------------------------------------
# Files


def save_classifier(path: Path, model: ToyClassifier) -> None:
    """``classifier.pt``: state dict, sizes and the (shape, colour) class list, atomically."""
    record = {"state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
              "classes": [list(pair) for pair in toy_classes()],
              "num_shapes": model.num_shapes, "num_colours": model.num_colours,
              "width": model.width, "image_size": model.image_size}
    with atomic_write(path) as tmp:
        torch.save(record, tmp)


def load_classifier(path: str | Path, image_size: int | None = None) -> ToyClassifier:
    """The classifier of ``classifier.pt`` in eval mode, frozen.

    Loaded with ``weights_only=True``. Refused: anything that is not such a file, a class list
    other than the toy dataset's, and (when ``image_size`` is given) a classifier fitted at
    another image size than the caller scores at.
    """
    data = load_torch_file(path, "classifier file", "run 'cpgan-eval fit-classifier'")
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict) or \
            not all(type(data.get(k)) is int for k in _SIZE_KEYS):
        raise CpganError(f"{path}: expected a dict with state_dict, classes and "
                         f"{', '.join(_SIZE_KEYS)}")
    if data.get("classes") != [list(pair) for pair in toy_classes()]:
        raise CpganError(f"{path}: its classes are not the toy dataset's (shape, colour) pairs")
    if image_size is not None and data["image_size"] != image_size:
        raise CpganError(f"{path}: classifier was fitted at {data['image_size']} px, images are "
                         f"scored at {image_size} px (run 'cpgan-eval fit-classifier "
                         f"--image-size {image_size}')")
    refuse_nonfinite(path, data["state_dict"], "'state_dict'")
    try:
        model = ToyClassifier(data["num_shapes"], data["num_colours"], data["width"],
                              data["image_size"])
        model.load_state_dict(data["state_dict"])
    except (ValueError, RuntimeError, TypeError, AttributeError) as exc:
        raise CpganError(f"{path}: weights do not fit the stored sizes "
                         f"({str(exc).splitlines()[0]})") from None
    return model.eval().requires_grad_(False)


def load_scoring_network(kind: str, path: str | Path, image_size: int | None = None) -> nn.Module:
    """The IS/FID scoring network: ``"classifier"`` (toy, ``classifier.pt``) or
    ``"inception"`` (torchvision's ImageNet Inception-v3 state dict). Both offer
    ``predict(images in [-1, 1]) -> (logits, features)``."""
    if kind == "classifier":
        return load_classifier(path, image_size)
    if kind == "inception":
        from cpgan.model.image_encoder import load_inception_weights

        scorer = InceptionScorer()
        load_inception_weights(scorer.net, path)
        return scorer.eval()
    raise ValueError(f"unknown scoring network {kind!r}; expected one of {SCORING_KINDS}")


@torch.no_grad()
def score_images(network: nn.Module, images: Tensor, batch_size: int = 64,
                 device: str = "cpu") -> tuple[Tensor, Tensor]:
    """Softmax ``[N, C]`` and features ``[N, D]`` (float32, CPU) of images in [-1, 1]
    (float) or uint8 RGB ``[N, 3, H, W]``, batch by batch."""
    network.eval()
    probs, features = [], []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        batch = to_unit_range(batch) if batch.dtype == torch.uint8 else batch.float()
        logits, feats = network.predict(batch.to(device))
        probs.append(F.softmax(logits.float(), dim=1).cpu())
        features.append(feats.float().cpu())
    return torch.cat(probs), torch.cat(features)
