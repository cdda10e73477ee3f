"""``cpgan-prep train-detector``: fit the YOLOv3 of §3.2.1 on a COCO-format dataset.

CPGAN takes a COCO-pretrained YOLOv3 for granted; the toy preset has no such weights, and a
reproduction should be able to refit one, so this module trains a Darknet built from the
preset's cfg from scratch on the train split and scores it on the val split with the official
COCO metric (pycocotools ``COCOeval``, bbox). The recipe is the usual one for YOLOv3 ports:

* images letterboxed to the cfg's square input (Darknet's preprocessing, the one ``detect``
  uses), random horizontal flips, boxes mapped with the same letterbox;
* the YOLOv3 loss of :mod:`cpgan.model.yolo_loss`, with the cfg's ``ignore_thresh``;
* AdamW, linear warm-up then cosine decay per iteration, output-layer biases initialised to
  the objectness and class priors (so the first steps are not spent unlearning "everything
  is an object");
* a checkpoint after every epoch, so ``resume=True`` continues exactly where a killed run
  stopped (model, optimiser, schedule, epoch and RNG states).

Images are decoded on the fly through :class:`~cpgan.pipeline.coco.CocoSplit`; an image that
fails to decode is skipped and counted, never fatal. Every random choice (order, flips) is a
function of ``(seed, epoch, index)``, so results do not depend on loader workers or resumes.

Outputs under ``<artifacts>/models/``: ``detector.ckpt.pt`` (training state),
``detector.pt`` (``{"state_dict", "category_ids", "class_names", "input_size"}``, loadable
with ``torch.load(..., weights_only=True)``) and ``detector.weights`` (Darknet format).
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cpgan import layout
from cpgan.config import CONFIG_DIR, DetectorConfig
from cpgan.errors import CpganError, ItemError
from cpgan.model.darknet import ConvLayer, Darknet, read_cfg, write_weights
from cpgan.model.yolo import (
    LetterboxMeta,
    decode_yolo,
    letterbox,
    letterbox_boxes,
    select_regions,
    unletterbox_boxes,
)
from cpgan.model.yolo_loss import yolo_loss
from cpgan.pipeline.artifacts import atomic_write
from cpgan.pipeline.coco import CocoSplit
from cpgan.torch_file import load_torch_file
from cpgan.trainer.averaging import WeightAverage
from cpgan.trainer.resume import (
    count_entry,
    failed_images,
    finite_numbers,
    load_optimizer_state,
    refusing_unfit_checkpoint,
)

TRAIN_SPLIT = "train2014"
VAL_SPLIT = "val2014"
CHECKPOINT_NAME = "detector.ckpt.pt"
MODEL_NAME = layout.DETECTOR_NAME  # in cpgan.layout: read without torch
WEIGHTS_NAME = layout.DETECTOR_DARKNET_NAME
MAX_DETECTIONS = 100  # COCOeval's maxDets for AP
DEFAULT_IGNORE_THRESH = 0.5  # Darknet's default for [yolo] ignore_thresh
FLIP_PROBABILITY = 0.5
OBJECTS_PER_IMAGE_PRIOR = 3.0  # expected objects per image, for the objectness bias prior
FINAL_LR_FRACTION = 0.05  # cosine decay ends at this fraction of the peak learning rate


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Sample:
    """One letterboxed image (or ``None`` when it failed to decode) and its boxes."""

    image_id: int
    image: torch.Tensor | None  # [3, S, S] in [0, 1]
    targets: torch.Tensor       # [M, 5] class index, x1, y1, x2, y2 in network pixels
    meta: LetterboxMeta | None
    error: str | None = None


@dataclass
class Batch:
    """A collated batch: decoded images only, plus the ids of those that failed."""

    image_ids: list[int]
    images: torch.Tensor   # [B, 3, S, S]
    targets: torch.Tensor  # [B, M, 5], class -1 = padding
    metas: list[LetterboxMeta]
    failed: dict[int, str]


class DetectionDataset(Dataset):
    """Images of a split, letterboxed to ``size``, with boxes as class-index ``xyxy`` targets.

    Crowd annotations (``iscrowd=1``) are not training targets: they mark groups, which
    COCOeval ignores too. With ``augment`` each image is flipped horizontally with probability
    1/2, decided by ``(seed, epoch, index)`` so any worker or resumed run draws the same flip.
    """

    def __init__(self, split: CocoSplit, image_ids: Sequence[int], size: int,
                 class_of: dict[int, int], augment: bool, seed: int) -> None:
        self.split = split
        self.image_ids = list(image_ids)
        self.size = size
        self.class_of = class_of
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Sample:
        image_id = self.image_ids[index]
        try:
            rgb = self.split.load_image(image_id)
        except ItemError as err:
            return Sample(image_id, None, torch.zeros(0, 5), None, str(err))
        image, meta = letterbox(rgb, self.size)
        targets = self._targets(image_id, meta)
        if self.augment and self._flip(index):
            image = image.flip(-1)
            targets[:, [1, 3]] = self.size - targets[:, [3, 1]]
        return Sample(image_id, image, targets, meta)

    def _targets(self, image_id: int, meta: LetterboxMeta) -> torch.Tensor:
        rows = [(self.class_of[a["category_id"]], *a["bbox"])
                for a in self.split.instances(image_id) if not a.get("iscrowd", 0)]
        if not rows:
            return torch.zeros(0, 5)
        table = torch.tensor(rows, dtype=torch.float32)
        xyxy = torch.cat([table[:, 1:3], table[:, 1:3] + table[:, 3:5]], dim=1)
        boxes = letterbox_boxes(xyxy, meta).clamp(0, self.size)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return torch.cat([table[keep, :1], boxes[keep]], dim=1)

    def _flip(self, index: int) -> bool:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return bool(rng.random() < FLIP_PROBABILITY)


def collate(samples: list[Sample]) -> Batch:
    """Stack decoded samples, pad their targets with class -1, set aside failed ones."""
    good = [s for s in samples if s.image is not None]
    failed = {s.image_id: s.error or "" for s in samples if s.image is None}
    count = max([s.targets.shape[0] for s in good] + [1])
    targets = torch.full((len(good), count, 5), -1.0)
    for i, s in enumerate(good):
        targets[i, : s.targets.shape[0]] = s.targets
    images = torch.stack([s.image for s in good]) if good else torch.zeros(0)
    return Batch([s.image_id for s in good], images, targets, [s.meta for s in good], failed)


def _worker_init(_: int) -> None:
    """Loader workers decode one image at a time: one thread each, no oversubscription."""
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)


def _loader(dataset: DetectionDataset, batch_size: int, order: Sequence[int],
            num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=list(order), collate_fn=collate,
                      num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
                      persistent_workers=False)


# --------------------------------------------------------------------------------------------
# Model set-up


def resolve_cfg(cfg: str | os.PathLike) -> Path:
    """A preset's cfg path: relative paths are relative to the project root (``configs/..``)."""
    path = Path(cfg)
    return path if path.is_absolute() else Path(CONFIG_DIR).parent / path


def ignore_threshold(cfg_path: Path) -> float:
    """The ``ignore_thresh`` of the cfg's ``[yolo]`` sections (Darknet's default 0.5)."""
    values = {float(s.options.get("ignore_thresh", DEFAULT_IGNORE_THRESH))
              for s in read_cfg(cfg_path) if s.kind == "yolo"}
    if len(values) != 1:
        raise CpganError(f"{cfg_path}: [yolo] layers disagree on ignore_thresh {sorted(values)}")
    return values.pop()


def build_detector(cfg_path: Path, config: DetectorConfig, num_categories: int) -> Darknet:
    """The cfg's network, checked against the preset's input size and the dataset's classes."""
    model = Darknet.from_cfg_file(cfg_path)
    if model.num_classes != num_categories:
        raise CpganError(f"{cfg_path}: the network has {model.num_classes} classes but the "
                         f"dataset has {num_categories} categories")
    if (model.input_width, model.input_height) != (config.input_size, config.input_size):
        raise CpganError(f"{cfg_path}: input {model.input_width}x{model.input_height} differs "
                         f"from the preset's square input_size {config.input_size}")
    return model


def init_output_biases(model: Darknet, objects_per_image: float = OBJECTS_PER_IMAGE_PRIOR) -> None:
    """Start every prediction at the prior: objectness ~ objects / slots, classes ~ 1 / C.

    The default zero bias says "50% object" at each of the thousands of slots, and the first
    hundreds of steps would only push that down; starting at the prior (as focal-loss
    detectors and YOLOv5 do) spends them on localisation and classes instead.
    """
    size = model.input_width * model.input_height
    slots = sum(s.num_anchors * size // (s.stride * s.stride) for s in model.yolo_specs)
    p_obj = min(objects_per_image / slots, 0.5)
    p_cls = 1.0 / max(model.num_classes, 2)
    with torch.no_grad():
        for spec in model.yolo_specs:
            layer = model.layers[spec.layer - 1]
            if not isinstance(layer, ConvLayer) or layer.conv.bias is None:
                continue
            bias = layer.conv.bias.view(spec.num_anchors, 5 + spec.num_classes)
            bias[:, 4] = math.log(p_obj / (1 - p_obj))
            bias[:, 5:] = math.log(p_cls / (1 - p_cls))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``FINAL_LR_FRACTION``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: Darknet, config: DetectorConfig) -> torch.optim.Optimizer:
    """AdamW; batch-norm parameters and biases get no weight decay (they set scale and offset)."""
    decay, plain = [], []
    for param in model.parameters():
        (decay if param.dim() > 1 else plain).append(param)
    groups = [{"params": decay, "weight_decay": config.train_weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.train_lr, betas=(0.9, 0.999))


# --------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain values, so the checkpoint loads with weights_only."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
            "python": (version, list(state), gauss)}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"], state["numpy_cached"]))
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint and check it belongs to the same run (same ``settings``).

    Resuming continues *the same* run: another seed, batch size, learning rate, image list or
    epoch count would silently splice two different schedules together.
    """
    state = load_torch_file(path, "detector checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
        raise CpganError(f"{path}: not a detector training checkpoint")
    for key, value in settings.items():
        if state["settings"].get(key) != value:
            raise CpganError(f"{path}: checkpoint has {key}={state['settings'].get(key)!r}, this "
                             f"run {value!r}; remove it to restart")
    return state


# --------------------------------------------------------------------------------------------
# Evaluation


def _coco_ground_truth(split: CocoSplit, image_ids: Sequence[int]) -> Any:
    """A pycocotools index of the split's instances for ``image_ids``, built from the public API."""
    from pycocotools.coco import COCO

    images, annotations = [], []
    for image_id in image_ids:
        images.append(split.image_info(image_id))
        for ann in split.instances(image_id):
            x, y, w, h = ann["bbox"]
            annotations.append({"id": ann["id"], "image_id": image_id, "bbox": [x, y, w, h],
                                "category_id": ann["category_id"], "iscrowd": ann.get("iscrowd", 0),
                                "area": ann.get("area", w * h)})
    categories = [{"id": k, "name": v} for k, v in split.categories().items()]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@torch.no_grad()
def detect_batch(model: Darknet, images: torch.Tensor, metas: Sequence[LetterboxMeta],
                 score_threshold: float, nms_iou: float,
                 max_detections: int = MAX_DETECTIONS) -> list[tuple[torch.Tensor, ...]]:
    """Per image: boxes ``[K, 4]`` xyxy in original pixels, scores ``[K]``, class indices."""
    heads, _ = model(images)
    decoded = decode_yolo(heads, model.yolo_specs, images.shape[-2:])
    regions = select_regions(*decoded, num_regions=max_detections,
                             score_threshold=score_threshold, nms_iou=nms_iou)
    out = []
    for i, meta in enumerate(metas):
        n = int(regions.num_regions[i])
        boxes = unletterbox_boxes(regions.boxes[i, :n].float().cpu(), meta)
        out.append((boxes, regions.scores[i, :n].float().cpu(), regions.labels[i, :n].cpu()))
    return out


def evaluate_detector(model: Darknet, split: CocoSplit, category_ids: Sequence[int],
                      input_size: int, config: DetectorConfig, batch_size: int = 32,
                      device: str = "cpu", progress: bool = True, num_workers: int = 0,
                      limit: int | None = None) -> dict[str, Any]:
    """COCO bbox AP of ``model`` on ``split`` (images that fail to decode are left out).

    Detection as ``detect`` runs it (one class per box, class-aware NMS) but with the usual
    evaluation settings: score above ``config.score_threshold``, up to 100 boxes per image.
    Returns ``map50`` (AP at IoU 0.5), ``map`` (AP over IoU .5:.95), ``images``, ``skipped``.
    """
    class_of = {cat: i for i, cat in enumerate(category_ids)}
    dataset = DetectionDataset(split, split.image_ids()[:limit], input_size, class_of,
                               augment=False, seed=0)
    model.eval()
    results, evaluated, skipped = [], [], 0
    loader = _loader(dataset, batch_size, range(len(dataset)), num_workers)
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, leave=False):
        skipped += len(batch.failed)
        if not batch.image_ids:
            continue
        evaluated += batch.image_ids
        images = batch.images.to(device, memory_format=torch.channels_last)
        found = detect_batch(model, images, batch.metas, config.score_threshold, config.nms_iou)
        for image_id, (boxes, scores, labels) in zip(batch.image_ids, found):
            for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
                results.append({"image_id": image_id, "category_id": category_ids[label],
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "score": score})
    return {**coco_map(split, evaluated, results), "images": len(evaluated), "skipped": skipped}


def coco_map(split: CocoSplit, image_ids: Sequence[int], results: list[dict]) -> dict[str, float]:
    """``map`` (AP@[.5:.95]) and ``map50`` of COCO-format ``results`` on ``image_ids``.

    ``results`` are COCO detection records (``image_id``, ``category_id``, ``bbox`` as
    ``[x, y, w, h]`` in original pixels, ``score``); no detection at all scores 0.
    """
    from pycocotools.cocoeval import COCOeval

    if not results or not image_ids:
        return {"map50": 0.0, "map": 0.0}
    ground_truth = _coco_ground_truth(split, image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        detections = ground_truth.loadRes(results)
        evaluation = COCOeval(ground_truth, detections, "bbox")
        evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # COCOeval reports -1 when no ground truth exists for any category
    stats = [max(0.0, float(v)) for v in evaluation.stats[:2]]
    return {"map50": stats[1], "map": stats[0]}


# --------------------------------------------------------------------------------------------
# Training


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_threads(requested: int | None = None) -> int:
    """Intra-op threads: ``requested``, else ``OMP_NUM_THREADS``, else every core we may use.

    The count is fixed per machine rather than adapted to the current load, because CPU
    kernels sum in a thread-count-dependent order and a rerun must give the same detector.
    On a busy machine pin it lower (``OMP_NUM_THREADS=1``): every convolution ends in a
    barrier across its threads, and one descheduled thread stalls the others.
    """
    if requested is not None:
        return max(1, requested)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly: saved after every epoch."""

    model: Darknet
    average: WeightAverage | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0
    seen: int = 0
    failed: dict[int, str] = field(default_factory=dict)

    def to_checkpoint(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {
            "settings": settings, "epoch": self.epoch, "seen": self.seen,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "average": self.average.model.state_dict() if self.average else None,
            "average_updates": self.average.updates if self.average else 0,
            "rng": _rng_state(),
            "failed_ids": list(self.failed), "failed_reasons": list(self.failed.values()),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Put back a checkpoint that :func:`_load_checkpoint` matched to this run; a value
        that does not fit raises ValueError (one line under ``refusing_unfit_checkpoint``)."""
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _check_scheduler(self.scheduler, len(self.optimizer.param_groups))
        if (state["average"] is None) != (self.average is None):
            raise ValueError("weight averaging was switched on or off since it was written")
        if self.average is not None:
            self.average.model.load_state_dict(state["average"])
            self.average.updates = count_entry(state, "average_updates")
        self.epoch = count_entry(state, "epoch", most=state["settings"]["epochs"])
        self.seen = count_entry(state, "seen")
        self.failed = failed_images(state)
        _set_rng_state(state["rng"])

    @property
    def final_model(self) -> Darknet:
        """The detector to evaluate and publish: the weight average when there is one."""
        return self.average.model if self.average is not None else self.model


def _train_epoch(run: TrainState, loader: DataLoader, ignore: float, cls_weight: float,
                 device: str, bar: tqdm) -> None:
    """One pass over the loader, updating ``run`` (a batch whose images all failed is skipped)."""
    model = run.model.train()
    running: dict[str, float] = {}
    for batch in loader:
        run.failed.update(batch.failed)
        if batch.image_ids:
            heads, _ = model(batch.images.to(device, memory_format=torch.channels_last))
            loss, parts = yolo_loss(heads, model.yolo_specs, batch.targets.to(device), ignore,
                                    cls_weight)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            if run.average is not None:
                run.average.update(model)
            run.seen += len(batch.image_ids)
            for key, value in parts.items():
                running[key] = 0.9 * running.get(key, float(value)) + 0.1 * float(value)
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()}, refresh=False)
        run.scheduler.step()
        bar.update(len(batch.image_ids) + len(batch.failed))


def _check_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, groups: int) -> None:
    """A restored schedule's position is a count and its base rates one finite number per
    parameter group (the scheduler's own load takes any values)."""
    count_entry(vars(scheduler), "last_epoch")
    count_entry(vars(scheduler), "_step_count")
    rates = finite_numbers(scheduler.base_lrs, "the schedule's 'base_lrs'")
    if len(rates) != groups or min(rates) < 0:
        raise ValueError(f"the schedule's 'base_lrs' must be {groups} rates of at least 0")


def _new_run(model: Darknet, config: DetectorConfig, total_steps: int) -> TrainState:
    warmup = min(config.train_warmup_steps, max(1, total_steps // 3))
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, warmup, total_steps))
    average = None
    if config.train_average_decay > 0:
        average = WeightAverage(model, config.train_average_decay, max(1.0, total_steps / 10))
    return TrainState(model, average, optimizer, scheduler)


def train_detector(
    coco_root: Path,
    artifacts: Path,
    config: DetectorConfig,
    seed: int = 0,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    limit: int | None = None,
    epochs: int | None = None,
    num_workers: int | None = None,
    val_limit: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train the preset's Darknet on ``coco_root``'s train split; evaluate on val; save.

    ``limit`` keeps the first N train images and ``val_limit`` the first N val images (tests);
    ``epochs``, ``num_workers`` override ``config.train_epochs`` / ``train_workers``;
    ``threads`` pins the compute threads (see :func:`choose_threads`). Returns ``{"map50",
    "map", "epochs", "train_images", "skipped_images", "val_images", "skipped_val_images",
    "threads", "seconds"}``.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(choose_threads(threads))
    try:
        return _train(Path(coco_root), Path(artifacts), config, seed, device, resume, progress,
                      limit, config.train_epochs if epochs is None else epochs,
                      config.train_workers if num_workers is None else num_workers, val_limit)
    finally:
        torch.set_num_threads(previous_threads)


def _train(coco_root: Path, artifacts: Path, config: DetectorConfig, seed: int, device: str,
           resume: bool, progress: bool, limit: int | None, total_epochs: int, workers: int,
           val_limit: int | None) -> dict[str, Any]:
    """The body of :func:`train_detector`, once the thread count is set."""
    start = time.perf_counter()
    if total_epochs < 0 or config.train_batch_size <= 0 or workers < 0:
        raise CpganError(f"detector training needs epochs >= 0, batch size > 0 and workers >= 0, "
                         f"got {total_epochs}, {config.train_batch_size}, {workers}")
    if not 0 <= config.train_average_decay < 1:
        raise CpganError(f"detector.train_average_decay must lie in [0, 1) (0: no weight "
                         f"average), got {config.train_average_decay}")
    _seed_everything(seed)
    cfg_path = resolve_cfg(config.cfg)
    train_split = CocoSplit.open(coco_root, TRAIN_SPLIT, require_instances=True)
    categories = train_split.categories()
    # Read val now, not after the epochs: a bad val file must not cost a whole training run.
    val_split = CocoSplit.open(coco_root, VAL_SPLIT, require_instances=True)
    if val_split.categories() != categories:
        raise CpganError(f"{val_split.instances_file}: categories differ from "
                         f"{train_split.instances_file.name}")
    category_ids, class_names = list(categories), list(categories.values())
    # channels-last convolutions are ~1.6x faster on CPU for these narrow layers
    model = build_detector(cfg_path, config, len(category_ids)).to(
        device, memory_format=torch.channels_last)
    init_output_biases(model)
    ignore = ignore_threshold(cfg_path)

    image_ids = train_split.image_ids()[:limit]
    if not image_ids:
        raise CpganError(f"{coco_root}: the {TRAIN_SPLIT} split has no images to train on")
    class_of = {cat: i for i, cat in enumerate(category_ids)}
    dataset = DetectionDataset(train_split, image_ids, config.input_size, class_of, True, seed)
    run = _new_run(model, config, math.ceil(len(dataset) / config.train_batch_size) * total_epochs)
    checkpoint = artifacts / "models" / CHECKPOINT_NAME
    settings = {"seed": seed, "epochs": total_epochs, "batch_size": config.train_batch_size,
                "lr": config.train_lr, "weight_decay": config.train_weight_decay,
                "warmup_steps": config.train_warmup_steps, "cls_weight": config.train_cls_weight,
                "average_decay": config.train_average_decay, "cfg": str(cfg_path),
                "category_ids": category_ids, "image_ids": image_ids}
    if resume and checkpoint.exists():
        with refusing_unfit_checkpoint(checkpoint):
            run.restore(_load_checkpoint(checkpoint, settings))

    for epoch in range(run.epoch, total_epochs):
        dataset.epoch = epoch
        loader = _loader(dataset, config.train_batch_size,
                         _epoch_order(len(dataset), seed, epoch), workers)
        with tqdm(total=len(dataset), desc=f"detector {epoch + 1}/{total_epochs}", unit="img",
                  disable=not progress) as bar:
            _train_epoch(run, loader, ignore, config.train_cls_weight, device, bar)
        run.epoch = epoch + 1
        _save_checkpoint(checkpoint, run.to_checkpoint(settings))

    metrics = evaluate_detector(run.final_model, val_split, category_ids, config.input_size,
                                config, batch_size=max(config.train_batch_size, 32),
                                device=device, progress=progress, num_workers=workers,
                                limit=val_limit)
    _write_model(artifacts / "models", run.final_model, category_ids, class_names,
                 config.input_size, run.seen)
    return {"map50": metrics["map50"], "map": metrics["map"], "epochs": total_epochs,
            "train_images": len(image_ids) - len(run.failed), "skipped_images": len(run.failed),
            "val_images": metrics["images"], "skipped_val_images": metrics["skipped"],
            "threads": torch.get_num_threads(), "seconds": time.perf_counter() - start}


def _write_model(folder: Path, model: Darknet, category_ids: list[int], class_names: list[str],
                 input_size: int, seen: int) -> None:
    """``detector.pt`` (plain tensors and lists) and the same weights as Darknet ``.weights``."""
    model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)
    state = {"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
             "category_ids": list(category_ids), "class_names": list(class_names),
             "input_size": int(input_size)}
    with atomic_write(folder / MODEL_NAME) as tmp:
        torch.save(state, tmp)
    write_weights(model, folder / WEIGHTS_NAME, seen=seen)
