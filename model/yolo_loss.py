"""The YOLOv3 training loss (Redmon & Farhadi 2018, §2.1-2.3) on raw Darknet heads.

CPGAN uses a YOLOv3 pretrained on COCO (§3.2.1); the project trains its own (the toy preset
has no pretrained weights, and a reproduction should be able to refit COCO), so the loss the
paper takes for granted has to exist. It follows YOLOv3 and the common PyTorch ports:

* **Assignment** (§2.1, §2.3): each ground-truth box goes to the *one* anchor, over all heads,
  whose shape best matches it (IoU of the two boxes centred on each other), at the grid cell
  of that head containing the box centre. When two boxes land in the same slot the later box
  wins, as in Darknet, rather than averaging two incompatible targets.
* **Box** (§2.1): ``b_x = sigma(t_x) + c_x``, ``b_w = p_w exp(t_w)``: the targets are the
  in-cell offset of the centre (binary cross-entropy on ``sigma(t_x)``) and ``log(w / p_w)``
  (squared error). Both are weighted by ``2 - w h / (W H)`` so small boxes, whose pixel errors
  cost more IoU, are not drowned by large ones.
* **Objectness** (§2.1): logistic regression, 1 at assigned slots and 0 elsewhere, except that
  a prediction whose decoded box already overlaps some ground truth by more than
  ``ignore_thresh`` is not pushed down (it is a good box, just not the assigned one).
* **Classes** (§2.2): independent sigmoids with binary cross-entropy, at assigned slots only.

Every term is summed over predictions and divided by the batch size, as Darknet's gradients
are, so the loss is per image and does not depend on the batch size.

Ground truth comes as a padded tensor ``[B, M, 5]`` of ``(class, x1, y1, x2, y2)`` in
network-input pixels (the letterboxed image), class ``-1`` marking padding rows, or as a list
of ``[M_i, 5]`` tensors (see :func:`pad_targets`). Degenerate boxes (zero width or height)
are treated as padding.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from cpgan.model.darknet import YoloSpec


class Assignment(NamedTuple):
    """Where each kept ground-truth box is learnt: one row per box, deduplicated per slot."""

    head: torch.Tensor    # [P] index into the list of heads
    batch: torch.Tensor   # [P] image in the batch
    anchor: torch.Tensor  # [P] anchor index within its head
    row: torch.Tensor     # [P] grid row (gy)
    col: torch.Tensor     # [P] grid column (gx)
    label: torch.Tensor   # [P] class index
    box: torch.Tensor     # [P, 4] xyxy in network-input pixels


def pad_targets(
    targets: torch.Tensor | Sequence[torch.Tensor], batch: int | None = None
) -> torch.Tensor:
    """Turn a list of ``[M_i, 5]`` ground truths into the padded ``[B, M, 5]`` form (class -1)."""
    if isinstance(targets, torch.Tensor):
        if targets.dim() != 3 or targets.shape[-1] != 5:
            raise ValueError(f"expected targets [B, M, 5], got {tuple(targets.shape)}")
        return targets
    rows = [torch.as_tensor(t, dtype=torch.float32).reshape(-1, 5) for t in targets]
    count = max([r.shape[0] for r in rows] + [1])
    out = torch.full((len(rows) if batch is None else batch, count, 5), -1.0)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def box_iou_batched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of each box of ``a`` ``[B, N, 4]`` with each box of ``b`` ``[B, M, 4]``: ``[B, N, M]``."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter / union.clamp(min=1e-9)


def shape_iou(sizes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of ``[P, 2]`` box sizes with ``[K, 2]`` anchor sizes, both centred -> ``[P, K]``."""
    inter = torch.minimum(sizes[:, None], anchors[None]).prod(-1)
    union = sizes.prod(-1)[:, None] + anchors.prod(-1)[None] - inter
    return inter / union.clamp(min=1e-9)


def _valid_boxes(targets: torch.Tensor) -> torch.Tensor:
    """Rows that are real boxes: class >= 0 and positive width and height."""
    return (targets[..., 0] >= 0) & (targets[..., 3] > targets[..., 1]) & \
        (targets[..., 4] > targets[..., 2])


def assign_targets(
    targets: torch.Tensor, specs: Sequence[YoloSpec], grid_sizes: Sequence[tuple[int, int]]
) -> Assignment:
    """Best-shaped anchor over all heads and the cell holding the centre, for every real box.

    ``grid_sizes`` is ``(H, W)`` of each head. The returned rows are unique per slot
    ``(head, image, anchor, row, col)``; on a collision the box listed later wins.
    """
    valid = _valid_boxes(targets)
    batch_index, _ = valid.nonzero(as_tuple=True)
    rows = targets[valid]
    labels, boxes = rows[:, 0].long(), rows[:, 1:5]
    device = targets.device
    anchors = torch.tensor([a for s in specs for a in s.anchors], dtype=boxes.dtype, device=device)
    head_of = torch.tensor([h for h, s in enumerate(specs) for _ in s.anchors], device=device)
    local_of = torch.tensor([i for s in specs for i in range(s.num_anchors)], device=device)
    best = shape_iou(boxes[:, 2:] - boxes[:, :2], anchors).argmax(dim=1)
    head, anchor = head_of[best], local_of[best]
    strides = torch.tensor([s.stride for s in specs], dtype=boxes.dtype, device=device)[head]
    sizes = torch.tensor(grid_sizes, device=device)[head]  # [P, 2] (H, W)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    col = torch.minimum((centre[:, 0] / strides).floor().long().clamp(min=0), sizes[:, 1] - 1)
    row = torch.minimum((centre[:, 1] / strides).floor().long().clamp(min=0), sizes[:, 0] - 1)
    keep = _last_per_slot(head, batch_index, anchor, row, col, targets.shape[0], specs, grid_sizes)
    return Assignment(head[keep], batch_index[keep], anchor[keep], row[keep], col[keep],
                      labels[keep], boxes[keep])


def _last_per_slot(head: torch.Tensor, batch: torch.Tensor, anchor: torch.Tensor,
                   row: torch.Tensor, col: torch.Tensor, batch_size: int,
                   specs: Sequence[YoloSpec],
                   grid_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Boolean mask keeping, for each slot claimed by several boxes, only the last box."""
    if head.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=head.device)
    slot_counts = [batch_size * s.num_anchors * h * w for s, (h, w) in zip(specs, grid_sizes)]
    offsets = torch.tensor([0] + slot_counts[:-1], device=head.device).cumsum(0)
    counts_a = torch.tensor([s.num_anchors for s in specs], device=head.device)[head]
    hw = torch.tensor(grid_sizes, device=head.device)[head]
    key = offsets[head] + ((batch * counts_a + anchor) * hw[:, 0] + row) * hw[:, 1] + col
    unique, inverse = torch.unique(key, return_inverse=True)
    position = torch.arange(key.numel(), device=key.device)
    winner = torch.full((unique.numel(),), -1, dtype=torch.long, device=key.device)
    winner = winner.scatter_reduce(0, inverse, position, reduce="amax")
    return winner[inverse] == position


def _decoded_boxes(raw: torch.Tensor, spec: YoloSpec) -> torch.Tensor:
    """Predicted xyxy boxes ``[B, A*H*W, 4]`` in network pixels (unclipped, no gradient)."""
    b, a, h, w, _ = raw.shape
    cols = torch.arange(w, device=raw.device, dtype=raw.dtype).view(1, 1, 1, w)
    rows = torch.arange(h, device=raw.device, dtype=raw.dtype).view(1, 1, h, 1)
    anchors = raw.new_tensor(spec.anchors).view(1, a, 1, 1, 2)
    cx = (torch.sigmoid(raw[..., 0]) + cols) * spec.stride
    cy = (torch.sigmoid(raw[..., 1]) + rows) * spec.stride
    half = torch.exp(raw[..., 2:4].clamp(max=10.0)) * anchors / 2
    boxes = torch.stack([cx - half[..., 0], cy - half[..., 1],
                         cx + half[..., 0], cy + half[..., 1]], dim=-1)
    return boxes.reshape(b, -1, 4)


def ignore_mask(raw: torch.Tensor, spec: YoloSpec, targets: torch.Tensor,
                ignore_thresh: float) -> torch.Tensor:
    """``[B, A, H, W]``: True where the decoded prediction overlaps a real box by more than
    ``ignore_thresh`` (such predictions get no "no object" loss)."""
    b, a, h, w, _ = raw.shape
    with torch.no_grad():
        valid = _valid_boxes(targets)
        if not bool(valid.any()):
            return torch.zeros(b, a, h, w, dtype=torch.bool, device=raw.device)
        iou = box_iou_batched(_decoded_boxes(raw.detach(), spec), targets[..., 1:5].to(raw.dtype))
        iou = iou.masked_fill(~valid[:, None, :], 0.0)
        return (iou.max(dim=-1).values > ignore_thresh).view(b, a, h, w)


def yolo_loss(
    heads: Sequence[torch.Tensor],
    specs: Sequence[YoloSpec],
    targets: torch.Tensor | Sequence[torch.Tensor],
    ignore_thresh: float = 0.5,
    cls_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """YOLOv3 loss of raw heads ``[B, A, H, W, 5 + C]`` against ground truth (module docstring).

    ``ignore_thresh`` is the ``[yolo]`` key of the same name (0.5 in yolov3.cfg, 0.7 in the
    tiny and toy cfgs); ``cls_weight`` scales the class term (Darknet's ``cls_normalizer``,
    1 in YOLOv3). Returns the total (per image, differentiable) and its detached, weighted
    parts ``{"box", "obj", "cls"}``.
    """
    if len(heads) != len(specs):
        raise ValueError(f"{len(heads)} head outputs for {len(specs)} yolo layers")
    batch = heads[0].shape[0]
    targets = pad_targets(targets, batch).to(device=heads[0].device, dtype=heads[0].dtype)
    if targets.shape[0] != batch:
        raise ValueError(f"targets for {targets.shape[0]} images, heads for {batch}")
    grid_sizes = [(int(h.shape[2]), int(h.shape[3])) for h in heads]
    for raw, spec in zip(heads, specs):
        if raw.dim() != 5 or raw.shape[1] != spec.num_anchors or \
                raw.shape[-1] != 5 + spec.num_classes:
            raise ValueError(f"head of layer {spec.layer}: shape {tuple(raw.shape)} does not fit "
                             f"{spec.num_anchors} anchors and {spec.num_classes} classes")
    assigned = assign_targets(targets, specs, grid_sizes)
    box_loss = heads[0].new_zeros(())
    obj_loss = heads[0].new_zeros(())
    cls_loss = heads[0].new_zeros(())
    for h, (raw, spec) in enumerate(zip(heads, specs)):
        mine = assigned.head == h
        slot = (assigned.batch[mine], assigned.anchor[mine], assigned.row[mine], assigned.col[mine])
        pred = raw[slot]  # [P_h, 5 + C]
        box_loss = box_loss + _box_term(pred, assigned, mine, spec, raw.shape[2:4])
        cls_loss = cls_loss + _class_term(pred, assigned.label[mine])
        obj_loss = obj_loss + _objectness_term(raw, spec, targets, slot, ignore_thresh)
    cls_loss = cls_weight * cls_loss
    total = (box_loss + obj_loss + cls_loss) / batch
    parts = {"box": (box_loss / batch).detach(), "obj": (obj_loss / batch).detach(),
             "cls": (cls_loss / batch).detach()}
    return total, parts


def _box_term(pred: torch.Tensor, assigned: Assignment, mine: torch.Tensor, spec: YoloSpec,
              grid: torch.Size) -> torch.Tensor:
    """§2.1: BCE on the centre offset, squared error on ``log(w / p_w)``, scale-weighted."""
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    box = assigned.box[mine]
    anchors = pred.new_tensor(spec.anchors)[assigned.anchor[mine]]
    size = box[:, 2:] - box[:, :2]
    centre = (box[:, :2] + box[:, 2:]) / 2 / spec.stride
    cell = torch.stack([assigned.col[mine], assigned.row[mine]], dim=1).to(pred.dtype)
    offset = (centre - cell).clamp(0.0, 1.0)
    log_size = torch.log(size / anchors)
    network_area = grid[0] * grid[1] * spec.stride * spec.stride
    scale = 2.0 - size.prod(dim=1) / network_area
    xy = F.binary_cross_entropy_with_logits(pred[:, 0:2], offset, reduction="none").sum(1)
    wh = (pred[:, 2:4] - log_size).square().sum(1)
    return (scale * (xy + wh)).sum()


def _class_term(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """§2.2: independent logistic classifiers, one-hot targets, at assigned slots only."""
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    onehot = F.one_hot(labels, pred.shape[1] - 5).to(pred.dtype)
    return F.binary_cross_entropy_with_logits(pred[:, 5:], onehot, reduction="sum")


def _objectness_term(raw: torch.Tensor, spec: YoloSpec, targets: torch.Tensor,
                     slot: tuple[torch.Tensor, ...], ignore_thresh: float) -> torch.Tensor:
    """§2.1: BCE, positives at assigned slots, negatives elsewhere unless already a good box."""
    target = torch.zeros(raw.shape[:4], dtype=raw.dtype, device=raw.device)
    target[slot] = 1.0
    counted = ~ignore_mask(raw, spec, targets, ignore_thresh)
    counted[slot] = True
    loss = F.binary_cross_entropy_with_logits(raw[..., 4], target, reduction="none")
    return (loss * counted).sum()
