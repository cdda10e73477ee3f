"""Tests of the YOLOv3 loss: assignment, perfect-prediction optimum, padding, ignore mask."""
from __future__ import annotations

import math

import pytest
import torch

from cpgan.model.darknet import YoloSpec
from cpgan.model.yolo_loss import assign_targets, pad_targets, yolo_loss

INPUT = 64
NUM_CLASSES = 3
# Two heads on a 64 px input: stride 16 (4x4 grid) with large anchors, stride 8 (8x8) small.
SPECS = (
    YoloSpec(layer=5, anchors=((40.0, 40.0), (60.0, 30.0)), mask=(2, 3), num_classes=NUM_CLASSES,
             stride=16),
    YoloSpec(layer=9, anchors=((10.0, 10.0), (20.0, 10.0)), mask=(0, 1), num_classes=NUM_CLASSES,
             stride=8),
)
GRIDS = [(INPUT // s.stride, INPUT // s.stride) for s in SPECS]


def _box(cls: int, cx: float, cy: float, w: float, h: float) -> list[float]:
    return [cls, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


# Image 0: a 18x10 box (best anchor: head 1, anchor 1) and a 58x32 box (head 0, anchor 1).
# Image 1: a 11x9 box (head 1, anchor 0), then a padding row.
TARGETS = torch.tensor([
    [_box(2, 20.0, 13.0, 18.0, 10.0), _box(0, 40.0, 40.0, 58.0, 32.0)],
    [_box(1, 50.0, 30.0, 11.0, 9.0), [-1.0, 0.0, 0.0, 0.0, 0.0]],
])


def _random_heads(seed: int = 0, batch: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, s.num_anchors, h, w, 5 + NUM_CLASSES, generator=generator)
            for s, (h, w) in zip(SPECS, GRIDS)]


def _perfect_heads(targets: torch.Tensor) -> list[torch.Tensor]:
    """Raw outputs that encode the targets exactly: the optimum of the loss."""
    heads = []
    for s, (h, w) in zip(SPECS, GRIDS):
        raw = torch.zeros(targets.shape[0], s.num_anchors, h, w, 5 + NUM_CLASSES)
        raw[..., 4] = -30.0
        heads.append(raw)
    a = assign_targets(targets, SPECS, GRIDS)
    for i in range(a.head.numel()):
        spec, box = SPECS[int(a.head[i])], a.box[i]
        cell = torch.tensor([float(a.col[i]), float(a.row[i])])
        offset = (box[:2] + box[2:]) / 2 / spec.stride - cell
        size = box[2:] - box[:2]
        anchor = torch.tensor(spec.anchors[int(a.anchor[i])])
        raw = heads[int(a.head[i])][a.batch[i], a.anchor[i], a.row[i], a.col[i]]
        raw[0:2] = torch.logit(offset)
        raw[2:4] = torch.log(size / anchor)
        raw[4] = 30.0
        raw[5:] = -30.0
        raw[5 + int(a.label[i])] = 30.0
    return heads


def test_assignment_picks_best_shaped_anchor_cell_and_head() -> None:
    a = assign_targets(TARGETS, SPECS, GRIDS)
    rows = sorted(zip(a.batch.tolist(), a.head.tolist(), a.anchor.tolist(), a.row.tolist(),
                      a.col.tolist(), a.label.tolist()))
    # (image, head, anchor, row, col, class): 20/8 -> col 2, 13/8 -> row 1; 40/16 -> 2, 2;
    # 50/8 -> col 6, 30/8 -> row 3.
    assert rows == [(0, 0, 1, 2, 2, 0), (0, 1, 1, 1, 2, 2), (1, 1, 0, 3, 6, 1)]


def test_two_boxes_in_one_slot_keep_the_later_box() -> None:
    targets = torch.tensor([[_box(0, 20.0, 13.0, 18.0, 10.0), _box(2, 21.0, 14.0, 19.0, 11.0)]])
    a = assign_targets(targets, SPECS, GRIDS)
    assert a.label.tolist() == [2] and torch.allclose(a.box[0], targets[0, 1, 1:])


def test_perfect_prediction_is_the_optimum() -> None:
    perfect = [h.requires_grad_() for h in _perfect_heads(TARGETS)]
    loss, parts = yolo_loss(perfect, SPECS, TARGETS, ignore_thresh=0.5)
    loss.backward()
    loss = loss.detach()
    random_loss, _ = yolo_loss(_random_heads(), SPECS, TARGETS, ignore_thresh=0.5)
    # The centre BCE keeps its entropy floor, but nothing is left to learn: zero gradient.
    assert float(loss) < float(random_loss) / 20
    assert max(float(h.grad.abs().max()) for h in perfect) < 1e-5
    assert float(parts["obj"]) < 1e-6 and float(parts["cls"]) < 1e-6
    assert set(parts) == {"box", "obj", "cls"}


def test_each_wrong_part_is_penalised() -> None:
    base, _ = yolo_loss(_perfect_heads(TARGETS), SPECS, TARGETS)
    a = assign_targets(TARGETS, SPECS, GRIDS)
    slot = (a.batch[0], a.anchor[0], a.row[0], a.col[0])
    # A size off by e^1.5, then objectness and the true class at logit -2 instead of +30.
    for channel, value, part in ((2, 1.5, "box"), (4, -32.0, "obj"),
                                 (5 + int(a.label[0]), -32.0, "cls")):
        heads = _perfect_heads(TARGETS)
        heads[int(a.head[0])][slot][channel] += value
        loss, parts = yolo_loss(heads, SPECS, TARGETS)
        assert float(loss) > float(base) + 1.0, part
        assert float(parts[part]) > 0.5, part


def test_padding_and_degenerate_boxes_contribute_nothing() -> None:
    heads = _random_heads(seed=3)
    real = TARGETS[:, :, :]
    padded = torch.cat([real, torch.tensor([[[-1.0, 5.0, 5.0, 30.0, 30.0]],
                                            [[2.0, 10.0, 10.0, 10.0, 40.0]]])], dim=1)
    loss, _ = yolo_loss(heads, SPECS, real)
    loss_padded, _ = yolo_loss(heads, SPECS, padded)
    loss_list, _ = yolo_loss(heads, SPECS, [TARGETS[0], TARGETS[1, :1]])
    assert torch.allclose(loss, loss_padded) and torch.allclose(loss, loss_list)


def test_pad_targets_marks_padding_with_class_minus_one() -> None:
    padded = pad_targets([torch.tensor([[1.0, 0, 0, 4, 4]]), torch.zeros(0, 5)])
    assert padded.shape == (2, 1, 5) and padded[1, 0, 0] == -1 and padded[0, 0, 0] == 1


def test_ignore_mask_drops_negative_loss_of_a_good_unassigned_box() -> None:
    targets = TARGETS[:1, 1:]  # the 58x32 box centred at (40, 40): head 0, anchor 1, cell (2, 2)
    heads = _perfect_heads(targets)
    base, _ = yolo_loss(heads, SPECS, targets, ignore_thresh=0.5)
    # Anchor 0 of head 0 at the same cell predicts a 40x40 box at the centre: IoU with the
    # 58x32 ground truth is 1280 / (1856 + 1600 - 1280) = 0.588, and says "object".
    other = heads[0][0, 0, 2, 2]
    other[0:4] = 0.0
    other[4] = 2.0
    expected_iou = 40 * 32 / (58 * 32 + 40 * 40 - 40 * 32)
    assert 0.5 < expected_iou < 0.7
    ignored, _ = yolo_loss(heads, SPECS, targets, ignore_thresh=0.5)
    counted, _ = yolo_loss(heads, SPECS, targets, ignore_thresh=0.7)
    assert float(ignored) == pytest.approx(float(base), abs=1e-5)
    assert float(counted) - float(ignored) == pytest.approx(math.log1p(math.exp(2.0)), rel=1e-4)


def test_loss_is_per_image_and_rejects_mismatched_heads() -> None:
    heads = _random_heads(seed=5)
    single, _ = yolo_loss([h[:1] for h in heads], SPECS, TARGETS[:1])
    doubled, _ = yolo_loss([torch.cat([h[:1], h[:1]]) for h in heads], SPECS,
                           TARGETS[:1].repeat(2, 1, 1))
    assert torch.allclose(single, doubled)
    with pytest.raises(ValueError):
        yolo_loss(heads[:1], SPECS, TARGETS)


def test_class_weight_scales_only_the_class_term() -> None:
    heads = _random_heads(seed=6)
    plain, parts = yolo_loss(heads, SPECS, TARGETS)
    weighted, weighted_parts = yolo_loss(heads, SPECS, TARGETS, cls_weight=3.0)
    assert torch.allclose(weighted_parts["cls"], 3 * parts["cls"])
    assert torch.allclose(weighted_parts["obj"], parts["obj"])
    assert torch.allclose(weighted - plain, 2 * parts["cls"])


def test_images_without_boxes_only_learn_background() -> None:
    heads = [h.requires_grad_() for h in _random_heads(seed=8)]
    loss, parts = yolo_loss(heads, SPECS, [torch.zeros(0, 5), torch.zeros(0, 5)])
    loss.backward()
    assert float(parts["box"]) == 0.0 and float(parts["cls"]) == 0.0 and float(parts["obj"]) > 0
    # only the objectness channel receives gradient, pushing every slot towards "no object"
    assert all(float(h.grad[..., :4].abs().max()) == 0.0 for h in heads)
    assert all(bool((h.grad[..., 4] > 0).all()) for h in heads)
