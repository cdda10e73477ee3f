"""YOLOv3 inference for CPGAN: letterbox, head decoding, top-36 regions and their features.

§3.2.1 detects "top-36 sub-regions w.r.t. the confidence score" with a pretrained YOLOv3 and
describes each by a 1024-d feature; §3.3 (OAIE) runs the same extraction on generated images,
where the features must stay differentiable w.r.t. the image (TISCL back-propagates through
them into the generator). The pipeline here:

1. :func:`letterbox` / :func:`letterbox_tensor` — Darknet's preprocessing: keep the aspect
   ratio, bilinear resize (Darknet's ``resize_image`` is align-corners bilinear), centre on
   grey 0.5. The tensor version is differentiable so generated images can go through it.
2. :func:`decode_yolo` — YOLOv3 box decoding of each head.
3. :func:`select_regions` — score = objectness x class probability, one class per box
   (argmax), class-aware NMS, top-``num_regions`` by score, padded when fewer.
4. :func:`region_features` — RoIAlign of each box on a stride-32 backbone map (layer 74 of
   yolov3.cfg, 1024 channels), mean-pooled to one vector per box.

:class:`YoloRegionExtractor` chains 2-4 on a :class:`~cpgan.model.darknet.Darknet`: boxes are
chosen without gradient, features keep the gradient to the input. Files and shards are the
pipeline's business, not this module's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, roi_align

from cpgan.model.darknet import Darknet, YoloSpec

LETTERBOX_FILL = 0.5
NUM_REGIONS = 36
NMS_IOU = 0.45
# Sigmoid scores are always > 0, so threshold 0 keeps every candidate that survives the
# pre-NMS top-k: almost every image then yields the full 36 regions, as the paper's
# "top-36 w.r.t. the confidence score" implies (no confidence cut-off is mentioned).
SCORE_THRESHOLD = 0.0
PRE_NMS_TOP_K = 1000


# --------------------------------------------------------------------------------------------
# Letterbox


@dataclass(frozen=True)
class LetterboxMeta:
    """Where an image of ``width x height`` landed inside the square network input.

    The resized image covers ``[pad_x, pad_x + new_width) x [pad_y, pad_y + new_height)``; the
    sizes use Darknet's integer arithmetic (``new_h = h * size / w`` truncated).
    """

    width: int
    height: int
    size: int
    new_width: int
    new_height: int
    pad_x: int
    pad_y: int

    @property
    def scale_x(self) -> float:
        return self.new_width / self.width

    @property
    def scale_y(self) -> float:
        return self.new_height / self.height


def letterbox_geometry(width: int, height: int, size: int) -> LetterboxMeta:
    """Darknet's ``letterbox_image`` geometry for a square network input of side ``size``."""
    if width <= 0 or height <= 0 or size <= 0:
        raise ValueError(f"letterbox needs positive sizes, got {width}x{height} -> {size}")
    if width > height:  # Darknet: size/w < size/h
        new_width, new_height = size, max(1, height * size // width)
    else:
        new_width, new_height = max(1, width * size // height), size
    return LetterboxMeta(width, height, size, new_width, new_height,
                         (size - new_width) // 2, (size - new_height) // 2)


def letterbox_tensor(
    images: torch.Tensor, size: int, input_range: tuple[float, float] = (0.0, 1.0)
) -> tuple[torch.Tensor, LetterboxMeta]:
    """Differentiable letterbox of a batch ``[B, 3, H, W]`` with values in ``input_range``.

    Returns the network input ``[B, 3, size, size]`` in [0, 1] (the generator's [-1, 1] output
    passes ``input_range=(-1, 1)``) and the geometry shared by the whole batch.
    """
    if images.dim() != 4:
        raise ValueError(f"expected [B, C, H, W] images, got {tuple(images.shape)}")
    low, high = input_range
    meta = letterbox_geometry(images.shape[-1], images.shape[-2], size)
    x = (images - low) / (high - low)
    if (meta.new_height, meta.new_width) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(meta.new_height, meta.new_width), mode="bilinear",
                          align_corners=True)
    pads = (meta.pad_x, size - meta.new_width - meta.pad_x,
            meta.pad_y, size - meta.new_height - meta.pad_y)
    if any(pads):
        x = F.pad(x, pads, value=LETTERBOX_FILL)
    return x, meta


def letterbox(image: np.ndarray, size: int) -> tuple[torch.Tensor, LetterboxMeta]:
    """Letterbox one ``H x W x 3`` uint8 RGB image into a ``[3, size, size]`` input in [0, 1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    out, meta = letterbox_tensor(x[None], size)
    return out[0], meta


def letterbox_boxes(boxes: torch.Tensor, meta: LetterboxMeta) -> torch.Tensor:
    """Map ``[N, 4]`` xyxy boxes from original-image pixels to network-input pixels."""
    scale = boxes.new_tensor([meta.scale_x, meta.scale_y, meta.scale_x, meta.scale_y])
    offset = boxes.new_tensor([meta.pad_x, meta.pad_y, meta.pad_x, meta.pad_y])
    return boxes * scale + offset


def unletterbox_boxes(boxes: torch.Tensor, meta: LetterboxMeta) -> torch.Tensor:
    """Inverse of :func:`letterbox_boxes`, clipped to the original image.

    Darknet's ``correct_yolo_boxes`` uses a float half-padding while ``letterbox_image``
    embeds at the integer one (up to half a pixel apart); we invert the embedding actually
    used, so ``unletterbox(letterbox(b)) == b`` for boxes inside the image.
    """
    scale = boxes.new_tensor([meta.scale_x, meta.scale_y, meta.scale_x, meta.scale_y])
    offset = boxes.new_tensor([meta.pad_x, meta.pad_y, meta.pad_x, meta.pad_y])
    limit = boxes.new_tensor([meta.width, meta.height, meta.width, meta.height])
    return torch.minimum(((boxes - offset) / scale).clamp(min=0), limit)


# --------------------------------------------------------------------------------------------
# Decoding and selection


def _input_hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    height, width = (int(v) for v in input_size)
    return height, width


def decode_head(
    raw: torch.Tensor, spec: YoloSpec, input_size: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode one head ``[B, A, H, W, 5 + C]`` as YOLOv3 (Redmon & Farhadi 2018, §2.1).

    Centre ``(col + sigmoid(tx)) * stride``, size ``anchor * exp(tw)`` in network-input pixels,
    objectness and class probabilities by independent sigmoids. Boxes are clipped to the
    network input (``input_size`` = side or ``(height, width)``) so RoIAlign never samples
    outside the feature map; Darknet clips only when drawing.
    """
    height, width = _input_hw(input_size)
    b, a, h, w, _ = raw.shape
    if a != spec.num_anchors or h * spec.stride != height or w * spec.stride != width:
        raise ValueError(f"head of layer {spec.layer}: shape {tuple(raw.shape)} does not fit "
                         f"{spec.num_anchors} anchors at stride {spec.stride} on {height}x{width}")
    cols = torch.arange(w, device=raw.device, dtype=raw.dtype).view(1, 1, 1, w)
    rows = torch.arange(h, device=raw.device, dtype=raw.dtype).view(1, 1, h, 1)
    anchors = raw.new_tensor(spec.anchors).view(1, a, 1, 1, 2)
    cx = (torch.sigmoid(raw[..., 0]) + cols) * spec.stride
    cy = (torch.sigmoid(raw[..., 1]) + rows) * spec.stride
    half = torch.exp(raw[..., 2:4]) * anchors / 2
    boxes = torch.stack([cx - half[..., 0], cy - half[..., 1], cx + half[..., 0], cy + half[..., 1]], -1)
    limit = raw.new_tensor([width, height, width, height])
    boxes = torch.minimum(boxes.clamp(min=0), limit)
    return (boxes.reshape(b, -1, 4), torch.sigmoid(raw[..., 4]).reshape(b, -1),
            torch.sigmoid(raw[..., 5:]).reshape(b, a * h * w, -1))


def decode_yolo(
    raw_outputs: Sequence[torch.Tensor], specs: Sequence[YoloSpec], input_size: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All heads decoded and concatenated: boxes ``[B, N, 4]`` xyxy in network-input pixels,
    objectness ``[B, N]`` and class probabilities ``[B, N, C]``."""
    if len(raw_outputs) != len(specs):
        raise ValueError(f"{len(raw_outputs)} head outputs for {len(specs)} yolo layers")
    boxes, objectness, class_probs = zip(
        *(decode_head(raw, spec, input_size) for raw, spec in zip(raw_outputs, specs)))
    return torch.cat(boxes, dim=1), torch.cat(objectness, dim=1), torch.cat(class_probs, dim=1)


class Regions(NamedTuple):
    """Top regions per image, best first; padding rows have box 0, score 0, label -1."""

    boxes: torch.Tensor        # [B, K, 4] xyxy, network-input pixels
    scores: torch.Tensor       # [B, K]
    labels: torch.Tensor       # [B, K] int64, -1 = padding
    num_regions: torch.Tensor  # [B] int64


@torch.no_grad()
def select_regions(
    boxes: torch.Tensor,
    objectness: torch.Tensor,
    class_probs: torch.Tensor,
    num_regions: int = NUM_REGIONS,
    score_threshold: float = SCORE_THRESHOLD,
    nms_iou: float = NMS_IOU,
    pre_nms_top_k: int = PRE_NMS_TOP_K,
) -> Regions:
    """Top-``num_regions`` detections per image w.r.t. confidence (§3.2.1).

    Each box keeps only its best class (score = objectness x that class's probability), so
    the 36 regions are 36 distinct boxes rather than one box repeated per class. Class-aware
    NMS (IoU > ``nms_iou`` within a class suppresses) runs on the ``pre_nms_top_k`` best
    candidates with score above ``score_threshold``: a cap that bounds NMS cost (10,647
    candidates per image at 416 px) without changing the top 36 in practice.
    """
    batch, count, num_classes = class_probs.shape
    scores, labels = (objectness.unsqueeze(-1) * class_probs).max(dim=-1)
    top_scores, top_index = scores.topk(min(pre_nms_top_k, count), dim=1)
    top_boxes = boxes.gather(1, top_index.unsqueeze(-1).expand(-1, -1, 4))
    top_labels = labels.gather(1, top_index)
    image = torch.arange(batch, device=boxes.device).unsqueeze(1).expand_as(top_index)
    valid = top_scores > score_threshold
    flat_boxes, flat_scores = top_boxes[valid].float(), top_scores[valid].float()
    flat_labels, flat_image = top_labels[valid], image[valid]
    keep = batched_nms(flat_boxes, flat_scores, flat_image * num_classes + flat_labels, nms_iou)
    out = Regions(
        boxes=boxes.new_zeros(batch, num_regions, 4),
        scores=scores.new_zeros(batch, num_regions),
        labels=torch.full((batch, num_regions), -1, dtype=torch.int64, device=boxes.device),
        num_regions=torch.zeros(batch, dtype=torch.int64, device=boxes.device),
    )
    kept_image = flat_image[keep]
    for b in range(batch):
        chosen = keep[kept_image == b][:num_regions]  # batched_nms returns decreasing score
        n = chosen.numel()
        out.boxes[b, :n] = flat_boxes[chosen].to(boxes.dtype)
        out.scores[b, :n] = flat_scores[chosen].to(scores.dtype)
        out.labels[b, :n] = flat_labels[chosen]
        out.num_regions[b] = n
    return out


# --------------------------------------------------------------------------------------------
# Region features


def region_features(
    feature_map: torch.Tensor,
    boxes: torch.Tensor,
    stride: int,
    valid: torch.Tensor | None = None,
    output_size: int = 7,
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """One feature vector per box: RoIAlign on ``feature_map`` then the mean over the bins.

    ``boxes`` ``[B, K, 4]`` are in network-input pixels (``spatial_scale = 1 / stride``,
    ``aligned=True`` so pixel centres line up). The result ``[B, K, C]`` is differentiable
    w.r.t. ``feature_map`` (hence the image) but not the boxes, which were chosen by
    detection. Rows where ``valid`` is False (padding) are zero.

    Computed as a linear map. RoIAlign and the mean over its bins are linear in the map, so a
    box's vector is a weighted sum over the map's positions, ``sum_p w_kp F[:, p]``; the
    weights are torchvision's ``roi_align`` of a one-hot map (one channel per position, no
    gradient) and the sum a batched matmul. The result is RoIAlign's up to rounding (about
    1e-7), but the backward is a matmul: torchvision's CPU RoIAlign backward is a serial loop.
    Forward and backward on one thread, toy GAN batch (32 x 36 boxes, 256 x 4 x 4 map): 111 ms
    against 3.0 ms for this form; a toy GAN step on two threads 1.13 times faster on average
    (``bench/region_features.py``).
    """
    batch, k, _ = boxes.shape
    height, width = feature_map.shape[-2:]
    positions = height * width
    one_hot = torch.eye(positions, dtype=feature_map.dtype, device=feature_map.device)
    rois = [boxes.detach().to(feature_map.dtype).reshape(-1, 4)]  # weights: any image's
    weights = roi_align(one_hot.view(1, positions, height, width), rois, output_size,
                        spatial_scale=1.0 / stride, sampling_ratio=sampling_ratio, aligned=True)
    weights = weights.mean(dim=(2, 3)).view(batch, k, positions)
    features = torch.bmm(weights, feature_map.flatten(2).transpose(1, 2))
    if valid is not None:
        features = features * valid.unsqueeze(-1).to(features.dtype)
    return features


class RegionOutput(NamedTuple):
    """Regions of a batch and their features (``features`` keeps the gradient to the input)."""

    boxes: torch.Tensor        # [B, K, 4] xyxy, network-input pixels
    scores: torch.Tensor       # [B, K]
    labels: torch.Tensor       # [B, K] int64, -1 = padding
    num_regions: torch.Tensor  # [B] int64
    features: torch.Tensor     # [B, K, D], zeros on padding rows


class YoloRegionExtractor(nn.Module):
    """Detector + region features in one pass: the ``V`` of §3.2.1 and ``V_o`` of §3.3.

    ``images`` must already be network input (letterboxed, [0, 1]). The caller decides whether
    the detector is frozen (``requires_grad_(False)``, ``eval()``); the features are always a
    differentiable function of the images.
    """

    def __init__(
        self,
        darknet: Darknet,
        feature_layer: int,
        num_regions: int = NUM_REGIONS,
        score_threshold: float = SCORE_THRESHOLD,
        nms_iou: float = NMS_IOU,
        pre_nms_top_k: int = PRE_NMS_TOP_K,
        output_size: int = 7,
    ) -> None:
        super().__init__()
        if not 0 <= feature_layer < len(darknet.layer_info) or \
                darknet.layer_info[feature_layer].kind == "yolo":
            raise ValueError(f"layer {feature_layer} is not a feature layer of {darknet.source}")
        self.darknet = darknet
        self.feature_layer = feature_layer
        self.num_regions = num_regions
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.pre_nms_top_k = pre_nms_top_k
        self.output_size = output_size

    @property
    def feature_dim(self) -> int:
        return self.darknet.layer_info[self.feature_layer].channels

    @property
    def feature_stride(self) -> int:
        return self.darknet.layer_info[self.feature_layer].stride

    def forward(self, images: torch.Tensor) -> RegionOutput:
        heads, kept = self.darknet(images, keep_layers=(self.feature_layer,))
        with torch.no_grad():
            decoded = decode_yolo([h.detach() for h in heads], self.darknet.yolo_specs,
                                  images.shape[-2:])
            regions = select_regions(*decoded, num_regions=self.num_regions,
                                     score_threshold=self.score_threshold, nms_iou=self.nms_iou,
                                     pre_nms_top_k=self.pre_nms_top_k)
        features = region_features(kept[self.feature_layer], regions.boxes, self.feature_stride,
                                   valid=regions.labels >= 0, output_size=self.output_size)
        return RegionOutput(*regions, features)
