"""Object-Aware Image Encoder (OAIE), CPGAN §3.3, Eq. 10.

An image is described by 100 sub-region vectors and one global vector, all d-dimensional
(paper d = 256), for DAMSM (Eq. 14-25) and hence TISCL on generated images:

* V_o, object level: the frozen YOLOv3's top-36 boxes on the image and their RoIAlign
  features (D = 1024 at paper size). Boxes are chosen without gradient; the features keep the
  gradient to the image, so TISCL can push the generator's pixels inside each object.
* V_e, grid level: 8 x 8 local features as in AttnGAN, which stay informative in early
  training when generated images are too poor for the detector to find objects.
* Eq. 10: V_o' = M_o V_o + b_o, V_e' = M_e V_e + b_e, V = [V_o', V_e'] of shape d x (36 + 64);
  the global feature f is a linear map of the backbone's pooled feature (AttnGAN's
  ``emb_cnn_code``).

Backbones, one interface (:class:`ImageBackbone`: local ``[B, C_local, 8, 8]`` and pooled
``[B, C_global]``):

* :class:`InceptionBackbone` (paper): torchvision's Inception-v3 with ImageNet weights read
  from a local file (:func:`load_inception_weights`), frozen as in AttnGAN. Local features are
  Mixed_6e (768 x 17 x 17 at the 299 px input); the paper asks for 8 x 8 sub-regions of 768
  channels (V_e in R^{768 x 64}), so we average-pool 17 x 17 adaptively to 8 x 8 (each cell
  averages a 3 x 3 window, neighbouring cells share a row or column). Pooling, rather than
  interpolating, keeps every Mixed_6e position's contribution and its gradient. The global
  feature is the 2048-d average pool after Mixed_7c.
* :class:`ClassifierBackbone` (toy preset): the trunk of the toy scoring classifier, the
  network that stands in for Inception in the toy evaluation, fine-tuned during DAMSM
  pretraining.
* :class:`ToyBackbone` (``backbone = "toy"``): a small CNN with the same outputs, trained from
  scratch during DAMSM pretraining; it needs no classifier, and it is the comparison that
  justifies starting from one.

``use_objects=False`` drops V_o (AttnGAN's image encoder, 64 columns) for the ``--no-oaie``
ablation. Inputs are images in [-1, 1] (the generator's output convention), any size: each
backbone resizes to its own input size, and the detector sees the image letterboxed to its
network input.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import inception_v3

from cpgan.errors import CpganError
from cpgan.model.classifier import ToyClassifier, classifier_trunk, resize_to
from cpgan.model.frozen_inception import TO_MIXED_6E, TO_POOL3, FrozenInception, read_state_dict
from cpgan.model.yolo import RegionOutput, YoloRegionExtractor, letterbox_tensor

LOCAL_GRID = 8
INCEPTION_SIZE = 299
INCEPTION_LOCAL_DIM = 768
INCEPTION_GLOBAL_DIM = 2048
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
PROJECTION_INIT_RANGE = 0.1
LEAKY_SLOPE = 0.2



class BackboneFeatures(NamedTuple):
    """What a backbone gives the encoder: the 8 x 8 local map and the pooled global vector."""

    local: Tensor   # [B, C_local, 8, 8]
    pooled: Tensor  # [B, C_global]


class ImageBackbone(nn.Module):
    """Interface of the grid-feature CNN; ``frozen`` backbones stay in eval mode untrained."""

    local_dim: int
    global_dim: int
    frozen: bool


# --------------------------------------------------------------------------------------------
# Inception-v3 (paper preset)


def load_inception_weights(model: nn.Module, path: str | Path) -> None:
    """Load torchvision's ImageNet Inception-v3 state dict (IMAGENET1K_V1) into ``model``.

    ``model`` is a torchvision ``Inception3`` (aux_logits may be off: the file's auxiliary
    classifier is dropped). The file is read with ``weights_only=True``; anything that is not a
    matching state dict is a :class:`CpganError` naming the file.
    """
    path = Path(path)
    state = read_state_dict(path, "Inception-v3", f"download torchvision's IMAGENET1K_V1 "
                            f"weights ({INCEPTION_FILE}) on a machine with network access and "
                            f"pass the file with --inception-weights")
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CpganError(f"{path}: tensor shapes do not match Inception-v3 "
                         f"({_first_mismatch(str(exc))})") from exc
    if result.missing_keys or result.unexpected_keys:
        raise CpganError(f"{path}: not Inception-v3 weights ({len(result.missing_keys)} missing "
                         f"keys e.g. {result.missing_keys[:1]}, {len(result.unexpected_keys)} "
                         f"unexpected e.g. {result.unexpected_keys[:1]})")


def _first_mismatch(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if "size mismatch" in line]
    return lines[0] if lines else message.strip().splitlines()[0]


class InceptionBackbone(FrozenInception, ImageBackbone):
    """Frozen Inception-v3: Mixed_6e pooled to 8 x 8 (768 ch) and the 2048-d global pool.

    Built without weights; call :func:`load_inception_weights` on ``self.net``. The Google
    weights expect inputs in [-1, 1] (torchvision's ``transform_input`` converts ImageNet-
    normalised inputs to that range), so our [-1, 1] images go in unchanged, as in AttnGAN.
    Frozen (:class:`~cpgan.model.frozen_inception.FrozenInception`): eval mode always, while
    gradients still flow to the input image.
    """

    local_dim = INCEPTION_LOCAL_DIM
    global_dim = INCEPTION_GLOBAL_DIM
    frozen = True

    def __init__(self) -> None:
        super().__init__(inception_v3(weights=None, aux_logits=False, init_weights=False,
                                      transform_input=False))

    def forward(self, images: Tensor) -> BackboneFeatures:
        x = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          align_corners=False)
        x = self.run(x, TO_MIXED_6E)
        local = F.adaptive_avg_pool2d(x, LOCAL_GRID)
        return BackboneFeatures(local, self.run(x, TO_POOL3).flatten(1))


# --------------------------------------------------------------------------------------------
# Toy backbone


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
    )


class ToyBackbone(ImageBackbone):
    """A small trainable CNN in Inception's place for the toy preset.

    Images are resized to ``image_size``; three stride-2 stages reach stride 8 (8 x 8 at 64 px,
    ``4 * width`` channels) for the local map, one more stage and a global *max* pool give the
    ``8 * width``-d global vector, mirroring Inception's Mixed_6e / Mixed_7c split. Max, not
    Inception's average: trained from scratch, the global vector must say which small objects
    are present, and an average over a 4 x 4 map dilutes a shape covering one cell with the
    background. On the toy set (batch 32, lr 1e-3, same seed) val R-precision of f after
    200 / 300 steps was 0.21 / 0.30 with max pooling against 0.11 / 0.20 with the average
    (``bench/damsm_recipe.py``, whose docstring has the commands).
    """

    frozen = False

    def __init__(self, image_size: int = 64, width: int = 32) -> None:
        super().__init__()
        if image_size < 8 * LOCAL_GRID:
            raise ValueError(f"toy backbone needs image_size >= {8 * LOCAL_GRID}, got {image_size}")
        self.image_size = image_size
        self.local_dim = 4 * width
        self.global_dim = 8 * width
        self.local_net = nn.Sequential(
            _conv_block(3, width, 1),
            _conv_block(width, width, 2),
            _conv_block(width, 2 * width, 2),
            _conv_block(2 * width, 4 * width, 2),
        )
        self.global_net = _conv_block(4 * width, 8 * width, 2)

    def forward(self, images: Tensor) -> BackboneFeatures:
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size),
                                   mode="bilinear", align_corners=False)
        x = self.local_net(images)
        pooled = self.global_net(x).amax(dim=(2, 3))
        return BackboneFeatures(F.adaptive_avg_pool2d(x, LOCAL_GRID), pooled)


class ClassifierBackbone(ImageBackbone):
    """The toy scoring classifier's convolutions in Inception's place (toy preset).

    In the paper the image encoder's CNN is Inception-v3, trained on a labelled vision task
    (ImageNet) before DAMSM ever runs, and the same network scores IS and FID. The toy analogue
    of both roles is the classifier that ``cpgan-eval fit-classifier`` fits on real toy train
    images (:class:`~cpgan.model.classifier.ToyClassifier`: shape and colour of the largest
    object, plus a per-cell auxiliary head). This backbone is its trunk: the stride-8 map
    (``4 * width`` channels, 8 x 8 at 64 px) is the local map, Mixed_6e's role, and the
    max-pooled top convolution (``16 * width``) the global vector, pool3's role. Start it
    from a fitted classifier with :meth:`start_from`.

    Unlike Inception it is fine-tuned during DAMSM pretraining (``frozen`` is False): a
    classifier fitted in minutes on 4,000 images knows shapes far less well than Inception
    knows ImageNet. Why not learn the CNN from scratch (:class:`ToyBackbone`): DAMSM's caption
    matching teaches shapes slowly, and shapes are what tell most toy captions apart. On
    preloaded toy data (``bench/damsm_recipe.py``, sentence loss, s max-pooled) val
    R-precision after 100 / 200 / 500 steps was 0.82 / 0.87 / 0.91 starting from the
    classifier, 0.74 / 0.82 / 0.86 with the classifier frozen and 0.37 / 0.57 / 0.67 from
    scratch.
    """

    frozen = False

    def __init__(self, width: int = 16, image_size: int = 64) -> None:
        super().__init__()
        if image_size < 8 * LOCAL_GRID or image_size % 8:
            raise ValueError(f"classifier backbone needs image_size a multiple of 8 and >= "
                             f"{8 * LOCAL_GRID}, got {image_size}")
        self.width, self.image_size = width, image_size
        self.local_dim = 4 * width
        self.global_dim = 16 * width
        self.body, self.top = classifier_trunk(width)

    def start_from(self, classifier: ToyClassifier) -> None:
        """Copy a fitted classifier's trunk (same width and image size) into this backbone."""
        if (classifier.width, classifier.image_size) != (self.width, self.image_size):
            raise ValueError(f"classifier has width {classifier.width} at "
                             f"{classifier.image_size} px, the backbone wants width "
                             f"{self.width} at {self.image_size} px")
        self.body.load_state_dict(classifier.body.state_dict())
        self.top.load_state_dict(classifier.top.state_dict())

    def forward(self, images: Tensor) -> BackboneFeatures:
        x = self.body(resize_to(images, self.image_size))
        pooled = self.top(x).amax(dim=(2, 3))
        return BackboneFeatures(F.adaptive_avg_pool2d(x, LOCAL_GRID), pooled)


# --------------------------------------------------------------------------------------------
# OAIE


class ImageEncoding(NamedTuple):
    """OAIE output: V of Eq. 10 (object columns first), f, and which columns are real."""

    regions: Tensor               # V [B, d, 36 + 64] (or [B, d, 64] without objects)
    global_feature: Tensor        # f [B, d]
    region_mask: Tensor           # [B, R] bool, False for detector slots left empty
    detections: RegionOutput | None  # boxes in detector-input pixels, for inspection


def _linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A projection initialised as AttnGAN's ``emb_features`` / ``emb_cnn_code``."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.uniform_(layer.weight, -PROJECTION_INIT_RANGE, PROJECTION_INIT_RANGE)
    return layer


class ObjectAwareImageEncoder(nn.Module):
    """Images in [-1, 1] ``[B, 3, H, W]`` -> :class:`ImageEncoding` (Eq. 10).

    ``detector`` is the region extractor of §3.2.1 (required when ``use_objects``); it is
    frozen here (eval mode, no parameter gradients) and kept in eval mode when the encoder
    trains. ``detector_size`` is its square network input (default: the cfg's ``[net]``
    size); images are letterboxed to it differentiably. Padded detector slots (fewer than 36
    boxes) are zero columns of V and False in ``region_mask``.
    """

    def __init__(
        self,
        backbone: ImageBackbone,
        embed_dim: int,
        detector: YoloRegionExtractor | None = None,
        use_objects: bool = True,
        detector_size: int | None = None,
    ) -> None:
        super().__init__()
        if use_objects and detector is None:
            raise ValueError("use_objects needs a detector (YoloRegionExtractor)")
        if not use_objects and detector is not None:
            raise ValueError("a detector was given but use_objects is False")
        self.backbone = backbone
        self.embed_dim = embed_dim
        self.use_objects = use_objects
        self.project_local = _linear(backbone.local_dim, embed_dim)     # M_e, b_e
        self.project_global = _linear(backbone.global_dim, embed_dim)   # f
        self.detector = detector
        self.project_objects: nn.Linear | None = None
        if detector is not None:
            detector.eval().requires_grad_(False)
            self.detector_size = detector_size or detector.darknet.input_size
            self.project_objects = _linear(detector.feature_dim, embed_dim)  # M_o, b_o

    @property
    def num_regions(self) -> int:
        """Columns of V: 36 objects + 64 grid cells, or 64 without objects."""
        objects = self.detector.num_regions if self.detector is not None else 0
        return objects + LOCAL_GRID * LOCAL_GRID

    def train(self, mode: bool = True) -> "ObjectAwareImageEncoder":
        super().train(mode)
        if self.detector is not None:
            self.detector.eval()
        if self.backbone.frozen:
            self.backbone.eval()
        return self

    def forward(self, images: Tensor, detections: RegionOutput | None = None) -> ImageEncoding:
        """``detections``: the detector's output for these very images, computed earlier
        (:meth:`detect`); DAMSM pretraining reuses it (:mod:`cpgan.trainer.region_cache`), as
        the frozen detector gives a real image the same V_o every time it sees it."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected [B, 3, H, W] images, got {tuple(images.shape)}")
        features = self.backbone(images)
        local = self.project_local(features.local.flatten(2).transpose(1, 2)).transpose(1, 2)
        global_feature = self.project_global(features.pooled)
        grid_mask = torch.ones(local.shape[0], local.shape[2], dtype=torch.bool,
                               device=local.device)
        if self.detector is None:
            if detections is not None:
                raise ValueError("detections were given to an encoder without object features")
            return ImageEncoding(local, global_feature, grid_mask, None)
        if detections is None:
            detections = self.detect(images)
        elif detections.features.shape[0] != images.shape[0]:
            raise ValueError(f"detections for {detections.features.shape[0]} images, "
                             f"got {images.shape[0]} images")
        object_mask = detections.labels >= 0
        objects = self.project_objects(detections.features).transpose(1, 2)
        objects = objects * object_mask.unsqueeze(1).to(objects.dtype)
        return ImageEncoding(torch.cat([objects, local], dim=2), global_feature,
                             torch.cat([object_mask, grid_mask], dim=1), detections)

    def detect(self, images: Tensor) -> RegionOutput:
        """V_o: boxes picked without gradient, RoIAlign features differentiable to ``images``."""
        network_input, _ = letterbox_tensor(images, self.detector_size, input_range=(-1.0, 1.0))
        return self.detector(network_input)

    def learned_state_dict(self) -> dict[str, Tensor]:
        """The state without the frozen detector and frozen backbone, which come from their
        own weight files (248 MB for YOLOv3 alone): what a DAMSM checkpoint needs to store."""
        frozen = self._frozen_prefixes()
        return {k: v for k, v in self.state_dict().items() if not k.startswith(frozen)}

    def load_learned_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`learned_state_dict`; every learned entry must be present."""
        frozen = self._frozen_prefixes()
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(frozen)]
        if missing or result.unexpected_keys:
            raise ValueError(f"image encoder state: missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")

    def _frozen_prefixes(self) -> tuple[str, ...]:
        prefixes = ["detector."] if self.detector is not None else []
        if self.backbone.frozen:
            prefixes.append("backbone.")
        return tuple(prefixes)
