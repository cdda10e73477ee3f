"""Tests of YOLOv3 inference: letterbox, decoding, top-36 selection and region features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou, roi_align

from cpgan.model.darknet import Darknet, YoloSpec
from cpgan.model.yolo import (
    YoloRegionExtractor,
    decode_yolo,
    letterbox,
    letterbox_boxes,
    letterbox_geometry,
    letterbox_tensor,
    region_features,
    select_regions,
    unletterbox_boxes,
)

TOY = Path(__file__).resolve().parent.parent / "configs" / "darknet" / "yolov3-toy.cfg"


# ----------------------------------------------------------------------------- letterbox


def test_letterbox_geometry_as_darknet() -> None:
    meta = letterbox_geometry(640, 480, 416)  # new_h = 480 * 416 / 640 = 312, pad (416-312)/2
    assert (meta.new_width, meta.new_height, meta.pad_x, meta.pad_y) == (416, 312, 0, 52)
    tall = letterbox_geometry(333, 500, 416)  # new_w = 333 * 416 // 500 = 277 (truncated)
    assert (tall.new_width, tall.new_height, tall.pad_x, tall.pad_y) == (277, 416, 69, 0)


def test_letterbox_fills_grey_and_keeps_content() -> None:
    image = np.full((30, 60, 3), (255, 51, 0), dtype=np.uint8)
    x, meta = letterbox(image, 32)
    assert x.shape == (3, 32, 32) and (meta.new_width, meta.new_height, meta.pad_y) == (32, 16, 8)
    assert torch.all(x[:, :8] == 0.5) and torch.all(x[:, 24:] == 0.5)
    content = x[:, 8:24]
    assert torch.allclose(content, torch.tensor([1.0, 0.2, 0.0]).view(3, 1, 1).expand_as(content))


def test_letterbox_resize_is_align_corners_bilinear() -> None:
    """Darknet's resize_image samples at i * (w - 1) / (new_w - 1): 0, 85, 170, 255."""
    image = np.zeros((1, 2, 3), dtype=np.uint8)
    image[0, 1] = 255
    x, meta = letterbox(image, 4)
    assert (meta.new_width, meta.new_height, meta.pad_y) == (4, 2, 1)
    assert torch.allclose(x[0, 1], torch.tensor([0.0, 85.0, 170.0, 255.0]) / 255, atol=1e-6)
    assert torch.all(x[:, 0] == 0.5) and torch.all(x[:, 3] == 0.5)


def test_letterbox_tensor_matches_numpy_path_and_is_differentiable() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(21, 35, 3), dtype=np.uint8)
    expected, _ = letterbox(image, 64)
    signed = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 127.5 - 1.0
    signed.requires_grad_(True)
    out, meta = letterbox_tensor(signed, 64, input_range=(-1.0, 1.0))
    assert torch.allclose(out[0], expected, atol=1e-5)
    out.sum().backward()
    assert signed.grad is not None and signed.grad.abs().min() > 0


@pytest.mark.parametrize(("width", "height"), [(300, 200), (123, 457), (640, 427), (50, 50)])
def test_unletterbox_inverts_letterbox_boxes(width: int, height: int) -> None:
    gen = torch.Generator().manual_seed(width)
    meta = letterbox_geometry(width, height, 416)
    corners = torch.rand(50, 2, 2, generator=gen) * torch.tensor([width, height])
    boxes = torch.cat([corners.min(1).values, corners.max(1).values], dim=1)
    net = letterbox_boxes(boxes, meta)
    assert net[:, [0, 2]].min() >= meta.pad_x and net[:, [0, 2]].max() <= meta.pad_x + meta.new_width + 1e-3
    assert torch.allclose(unletterbox_boxes(net, meta), boxes, atol=1e-3)
    outside = torch.tensor([[-5.0, -5.0, 420.0, 420.0]])
    assert unletterbox_boxes(outside, meta).tolist() == [[0.0, 0.0, float(width), float(height)]]


# ----------------------------------------------------------------------------- decoding


def test_decode_zero_logits_gives_anchor_boxes_at_cell_centres() -> None:
    spec = YoloSpec(layer=3, anchors=((10.0, 20.0), (40.0, 8.0)), mask=(0, 1), num_classes=3, stride=8)
    raw = torch.zeros(1, 2, 4, 5, 8)  # 4 rows x 5 cols at stride 8: input 32 high, 40 wide
    raw[0, 1, 2, 3, 2] = np.log(2.0)  # anchor 1, row 2, col 3: width doubled
    boxes, obj, cls = decode_yolo([raw], [spec], (32, 40))
    assert boxes.shape == (1, 40, 4) and obj.shape == (1, 40) and cls.shape == (1, 40, 3)
    assert torch.all(obj == 0.5) and torch.all(cls == 0.5)
    index = 1 * 20 + 2 * 5 + 3  # anchor-major, then row, then column
    cx, cy = (3 + 0.5) * 8, (2 + 0.5) * 8
    assert torch.allclose(boxes[0, index], torch.tensor([cx - 40, cy - 4, cx + 40, cy + 4]).clamp(0, 40))
    assert torch.allclose(boxes[0, 7], torch.tensor([(2.5 * 8) - 5, 1.5 * 8 - 10, 2.5 * 8 + 5, 1.5 * 8 + 10]))
    assert boxes[0, index, 2] == 40  # clipped to the network input


def test_decode_rejects_shape_that_does_not_fit_the_spec() -> None:
    spec = YoloSpec(layer=3, anchors=((10.0, 20.0),), mask=(0,), num_classes=3, stride=8)
    with pytest.raises(ValueError, match="does not fit"):
        decode_yolo([torch.zeros(1, 1, 4, 4, 8)], [spec], 64)


# ----------------------------------------------------------------------------- selection


def _candidates(seed: int, batch: int = 3, count: int = 400, classes: int = 5):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, count, 2, generator=gen) * 100
    sizes = torch.rand(batch, count, 2, generator=gen) * 30 + 2
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], -1).clamp(0, 100)
    return boxes, torch.rand(batch, count, generator=gen), torch.rand(batch, count, classes, generator=gen)


def test_select_regions_invariants() -> None:
    boxes, obj, cls = _candidates(0)
    regions = select_regions(boxes, obj, cls, num_regions=36, nms_iou=0.45)
    assert regions.boxes.shape == (3, 36, 4) and regions.labels.dtype == torch.int64
    for b in range(3):
        n = int(regions.num_regions[b])
        scores, labels, chosen = regions.scores[b, :n], regions.labels[b, :n], regions.boxes[b, :n]
        assert n == 36 and torch.all(scores[:-1] >= scores[1:])
        assert chosen.min() >= 0 and chosen.max() <= 100
        for box, score, label in zip(chosen, scores, labels):
            j = int(torch.nonzero((boxes[b] == box).all(-1))[0])  # the candidate it came from
            assert label == cls[b, j].argmax() and torch.isclose(score, obj[b, j] * cls[b, j].max())
        for c in labels.unique():
            same = chosen[labels == c]
            iou = box_iou(same, same).fill_diagonal_(0)
            assert iou.max() <= 0.45
        best = (obj[b, :, None] * cls[b]).max()
        assert torch.isclose(scores[0], best)


def test_select_regions_prefilters_the_best_candidates() -> None:
    boxes, obj, cls = _candidates(1)
    regions = select_regions(boxes, obj, cls, num_regions=36, pre_nms_top_k=40)
    cutoff = (obj[..., None] * cls).max(-1).values.topk(40, dim=1).values[:, -1]
    for b in range(3):
        n = int(regions.num_regions[b])
        assert 0 < n <= 40 and regions.scores[b, :n].min() >= cutoff[b]


def test_select_regions_pads_and_keeps_other_classes() -> None:
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 10, 11], [0, 0, 10, 10.5], [50, 50, 60, 60]]]).float()
    obj = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    cls = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.1, 0.9], [0.2, 0.5]]])
    regions = select_regions(boxes, obj, cls, num_regions=5)
    assert regions.num_regions.tolist() == [3]  # box 1 suppressed by box 0 (same class)
    assert regions.labels[0].tolist() == [0, 1, 1, -1, -1]
    assert torch.allclose(regions.scores[0], torch.tensor([0.9, 0.63, 0.3, 0.0, 0.0]))
    assert torch.equal(regions.boxes[0, 1], boxes[0, 2]) and torch.all(regions.boxes[0, 3:] == 0)
    thresholded = select_regions(boxes, obj, cls, num_regions=5, score_threshold=0.5)
    assert thresholded.num_regions.tolist() == [2] and thresholded.labels[0, 2] == -1


# ----------------------------------------------------------------------------- region features


def test_region_feature_of_constant_region_is_that_constant() -> None:
    fmap = torch.randn(1, 3, 8, 8)
    fmap[:, :, 2:6, 2:6] = torch.tensor([3.0, -1.0, 0.5]).view(1, 3, 1, 1)
    # Cells 2..5 at stride 4; their centres span input pixels 10..22: all samples inside.
    boxes = torch.tensor([[[10.0, 10.0, 22.0, 22.0], [0.0, 0.0, 0.0, 0.0]]])
    feats = region_features(fmap, boxes, stride=4, valid=torch.tensor([[True, False]]))
    assert torch.allclose(feats[0, 0], torch.tensor([3.0, -1.0, 0.5]), atol=1e-6)
    assert torch.all(feats[0, 1] == 0)


def test_region_feature_of_linear_ramp_is_box_centre() -> None:
    """Feature = x of the cell centre in feature units: the mean over a box is its centre / stride."""
    fmap = (torch.arange(13.0) + 0.5).expand(1, 1, 13, 13).clone()
    boxes = torch.tensor([[[40.0, 64.0, 200.0, 100.0], [100.0, 20.0, 340.0, 300.0]]])
    feats = region_features(fmap, boxes, stride=32)
    assert torch.allclose(feats[0, :, 0], torch.tensor([120.0, 220.0]) / 32, atol=1e-5)


def test_region_features_equal_roi_align_and_so_do_their_gradients() -> None:
    """The linear-map form against torchvision's RoIAlign on the features themselves, for
    boxes inside, across and beyond the map's edge."""
    torch.manual_seed(0)
    fmap = torch.randn(3, 6, 5, 5, requires_grad=True)
    corner = torch.rand(3, 7, 2) * 200 - 20
    boxes = torch.cat([corner, corner + torch.rand(3, 7, 2) * 120 + 1], dim=2)
    feats = region_features(fmap, boxes, stride=32, output_size=3)
    pooled = roi_align(fmap, list(boxes.unbind(0)), 3, spatial_scale=1 / 32, sampling_ratio=2,
                       aligned=True).mean(dim=(2, 3)).view(3, 7, 6)
    assert torch.allclose(feats, pooled, atol=1e-6)
    weights = torch.randn_like(feats)
    (grad,) = torch.autograd.grad((feats * weights).sum(), fmap)
    (expected,) = torch.autograd.grad((pooled * weights).sum(), fmap)
    assert torch.allclose(grad, expected, atol=1e-5) and expected.abs().sum() > 0


def test_region_features_carry_gradient_to_the_image() -> None:
    image = torch.rand(2, 3, 32, 32, requires_grad=True)
    conv = torch.nn.Conv2d(3, 5, 3, stride=4, padding=1)
    boxes = torch.tensor([[4.0, 4.0, 20.0, 28.0]]).expand(2, 1, 4)
    feats = region_features(conv(image), boxes, stride=4)
    feats.sum().backward()
    grad = image.grad.abs().sum(dim=(0, 1))
    assert grad[8:24, 8:20].sum() > 0 and grad[:, 28:].sum() == 0  # only near the box


# ----------------------------------------------------------------------------- extractor


@pytest.fixture(scope="module")
def extractor() -> YoloRegionExtractor:
    torch.manual_seed(0)
    net = Darknet.from_cfg_file(TOY).eval().requires_grad_(False)
    return YoloRegionExtractor(net, feature_layer=20, num_regions=36)


def test_extractor_outputs_regions_and_differentiable_features(extractor: YoloRegionExtractor) -> None:
    images = torch.rand(2, 3, 128, 128, requires_grad=True)
    out = extractor(images)
    assert extractor.feature_dim == 256 and extractor.feature_stride == 32
    assert out.boxes.shape == (2, 36, 4) and out.features.shape == (2, 36, 256)
    assert out.num_regions.tolist() == [36, 36]
    assert not out.boxes.requires_grad and out.features.requires_grad
    assert out.boxes.min() >= 0 and out.boxes.max() <= 128
    assert out.labels.min() >= 0 and out.labels.max() < 8
    assert torch.all(out.scores[:, :-1] >= out.scores[:, 1:])
    with torch.no_grad():
        _, kept = extractor.darknet(images, keep_layers=(20,))
    assert torch.allclose(out.features, region_features(kept[20], out.boxes, 32), atol=1e-5)
    out.features.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_extractor_rejects_yolo_layer_as_feature_layer(extractor: YoloRegionExtractor) -> None:
    with pytest.raises(ValueError, match="layer 24 is not a feature layer"):
        YoloRegionExtractor(extractor.darknet, feature_layer=24)
