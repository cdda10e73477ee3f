"""Scoring networks for the Inception Score and FID (DESIGN §4 "Evaluation").

IS needs a classifier's softmax p(y|x) and FID a pooled feature vector, both from a network
fixed before any generator is scored. Two such networks share one interface,
``predict(images) -> (logits, features)`` on images in [-1, 1] of any size (each network
resizes to its own input size):

* :class:`ToyClassifier` — the toy preset's scoring network, fitted on real toy train images
  by ``cpgan-eval fit-classifier``. Its classes are the (shape, colour) of the image's largest
  object, 8 x 8 = 64 classes; its features are the pooled last convolution (the analogue of
  Inception's 2048-d pool3 that FID uses).
* :class:`InceptionScorer` — torchvision's Inception-v3 with ImageNet weights from a local
  file, the network the CPGAN release scored IS with (1000 ImageNet classes, 2048-d pool).
  Its pool features are *not* the pt_inception-2015-12-05 network of published FIDs, so an
  FID computed from them is not comparable with published numbers.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import inception_v3

from cpgan.model.frozen_inception import FrozenInception

INCEPTION_SIZE = 299
TOY_IMAGE_SIZE = 64
TOY_WIDTH = 16


def resize_to(images: Tensor, size: int) -> Tensor:
    """``[B, 3, H, W]`` images resized to ``size x size``: area averaging when shrinking (what
    OpenCV's ``INTER_AREA`` does to the real images the toy classifier is fitted on, exactly so
    for integer factors), bilinear when enlarging; unchanged when already that size."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected [B, 3, H, W] images, got {tuple(images.shape)}")
    if images.shape[-2:] == (size, size):
        return images
    if images.shape[-1] >= size and images.shape[-2] >= size:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def classifier_trunk(width: int) -> tuple[nn.Sequential, nn.Sequential]:
    """The toy classifier's convolutions: ``body`` to the stride-8 map (``4 * width`` channels)
    and ``top``, one stride-2 convolution to ``16 * width`` channels (max-pooled by the
    caller). Shared with the toy image encoder's backbone, which starts from a fitted
    classifier (:class:`cpgan.model.image_encoder.ClassifierBackbone`)."""
    body = nn.Sequential(
        _conv_block(3, max(width // 2, 1), 1),
        _conv_block(max(width // 2, 1), width, 2),
        _conv_block(width, 2 * width, 2),
        _conv_block(2 * width, 2 * width, 1),
        _conv_block(2 * width, 4 * width, 2),
        _conv_block(4 * width, 4 * width, 1),
    )
    return body, _conv_block(4 * width, 16 * width, 2)


class ToyClassifier(nn.Module):
    """(shape, colour) of the largest object, for the toy preset's IS and FID.

    A small CNN: one full-resolution convolution (``width / 2`` channels; the corners that tell
    a hexagon from a circle are a pixel or two at 64 px), then strides 2, 2, 1, 2, 1 to a
    stride-8 map of ``4 * width`` channels and a stride-2 convolution to ``16 * width``. About
    12 MMAC per 64 px image at the default width, so it trains on two CPU cores in minutes.
    Three choices make it learn from 4,000 images in so few steps:

    * **Logits = shape + colour + joint.** Class (s, c) gets ``a_s + b_c + j_sc``. The
      ``a_s + b_c`` part alone would make p(s, c) = p(s) p(c), whose cross-entropy is the sum
      of the shape and colour cross-entropies: every image teaches both heads, instead of ~60
      images per joint class. That product cannot bind a shape to a colour, though (unsure
      between a red circle and a green square, it would also bet on a green circle), so the
      joint term ``j`` restores a full 64-way classifier.
    * **Global max pooling** of the last map: an object covers a few cells of the 4 x 4 map,
      and averaging would dilute it with background texture.
    * **Dense auxiliary head** (:meth:`segment`, training only): a 1 x 1 convolution on the
      stride-8 map predicts, per cell, the (shape, colour) class of the object covering it or
      background, so each image gives dozens of labelled cells instead of one label, and the
      stride-8 features become shape-and-colour conjunctions the joint term can read.

    ``features`` is the pooled ``16 * width`` vector (256-d at the default width), the
    analogue of Inception's 2048-d pool that FID is computed on.
    """

    def __init__(self, num_shapes: int, num_colours: int, width: int = TOY_WIDTH,
                 image_size: int = TOY_IMAGE_SIZE) -> None:
        super().__init__()
        if num_shapes < 1 or num_colours < 1 or width < 1 or image_size < 16:
            raise ValueError(f"invalid classifier sizes: {num_shapes} shapes, {num_colours} "
                             f"colours, width {width}, image size {image_size}")
        self.num_shapes, self.num_colours = num_shapes, num_colours
        self.width, self.image_size = width, image_size
        self.body, self.top = classifier_trunk(width)
        self.shape_head = nn.Linear(16 * width, num_shapes)
        self.colour_head = nn.Linear(16 * width, num_colours)
        self.joint_head = nn.Linear(16 * width, self.num_classes)
        self.dense_head = nn.Conv2d(4 * width, self.num_classes + 1, 1)

    @property
    def num_classes(self) -> int:
        """Class ``s * num_colours + c`` is shape s in colour c."""
        return self.num_shapes * self.num_colours

    @property
    def feature_dim(self) -> int:
        return 16 * self.width

    @property
    def background_class(self) -> int:
        """Index of "no object" in :meth:`segment`'s output."""
        return self.num_classes

    def _body(self, images: Tensor) -> Tensor:
        return self.body(resize_to(images, self.image_size))

    def _logits(self, features: Tensor) -> Tensor:
        shape, colour = self.shape_head(features), self.colour_head(features)
        return (shape.unsqueeze(2) + colour.unsqueeze(1)).flatten(1) + self.joint_head(features)

    def features(self, images: Tensor) -> Tensor:
        """``[B, 16 * width]`` pooled features of images in [-1, 1]."""
        return self.top(self._body(images)).amax(dim=(2, 3))

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [B, num_classes], features [B, feature_dim])`` in one pass."""
        features = self.features(images)
        return self._logits(features), features

    def forward(self, images: Tensor) -> Tensor:
        return self._logits(self.features(images))

    def segment(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Training pass: image logits ``[B, num_classes]`` and per-cell logits
        ``[B, num_classes + 1, image_size / 8, image_size / 8]`` (last class = background)."""
        hidden = self._body(images)
        return self._logits(self.top(hidden).amax(dim=(2, 3))), self.dense_head(hidden)


class InceptionScorer(FrozenInception):
    """torchvision's Inception-v3 as a scoring network: ImageNet logits and the 2048-d pool.

    Built without weights (load them with
    :func:`cpgan.model.image_encoder.load_inception_weights` on ``self.net``). The Google
    weights expect inputs in [-1, 1] (torchvision's ``transform_input`` only converts
    ImageNet-normalised input to that range), so images go in unchanged after a bilinear resize
    to 299 px. Frozen and always in eval mode: a scoring network must not change while scoring.
    """

    num_classes = 1000
    feature_dim = 2048
    image_size = INCEPTION_SIZE

    def __init__(self) -> None:
        super().__init__(inception_v3(weights=None, aux_logits=False, init_weights=False,
                                      transform_input=False))

    def features(self, images: Tensor) -> Tensor:
        """``[B, 2048]`` pool3 features of images in [-1, 1]."""
        return self.pool3(resize_to(images, INCEPTION_SIZE))

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [B, 1000], features [B, 2048])`` in one pass."""
        features = self.features(images)
        return self.net.fc(features), features

    def forward(self, images: Tensor) -> Tensor:
        return self.predict(images)[0]
