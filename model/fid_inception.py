"""The FID network of published numbers: pt_inception-2015-12-05 as pytorch-fid builds it.

Published FIDs (TTUR, pytorch-fid, the text-to-image papers after CPGAN) come from the 2015
TensorFlow Inception graph, not from torchvision's ImageNet Inception-v3. pytorch-fid ports
that graph's weights (``pt_inception-2015-12-05-6726825d.pth``) onto torchvision's
``Inception3`` layout with 1008 classes, and reproduces the graph's arithmetic by swapping
four kinds of Inception blocks:

* Mixed_5b/5c/5d (InceptionA), Mixed_6b-6e (InceptionC) and Mixed_7b (InceptionE): the pool
  branch averages over the valid pixels only (TensorFlow's SAME average pool), where
  torchvision counts the zero padding (``count_include_pad=True``);
* Mixed_7c (InceptionE): the pool branch max-pools, a quirk of the TensorFlow graph.

The parameter names and shapes are exactly torchvision's, so the file is a plain state dict
of ``inception_v3(num_classes=1008, aux_logits=False)``. FID uses the 2048-d features after
the final adaptive average pool ("pool3"). Images enter in [-1, 1] (pytorch-fid's
``normalize_input`` maps [0, 1] there; CPGAN images already are) and are resized bilinearly
to 299 x 299 as pytorch-fid does, whatever their size.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models import inception_v3
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from cpgan.errors import CpganError
from cpgan.model.frozen_inception import FrozenInception, read_state_dict

FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_INCEPTION_NAME = "pt_inception-2015-12-05"
FID_CLASSES = 1008
FID_SIZE = 299
FID_DIM = 2048


def _valid_avg_pool(x: Tensor) -> Tensor:
    """TensorFlow's SAME 3x3 average pool: border outputs average only the pixels that exist."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FidInceptionA(InceptionA):
    """InceptionA (Mixed_5b-5d) with the TensorFlow graph's valid-pixel average pool."""

    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_valid_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class FidInceptionC(InceptionC):
    """InceptionC (Mixed_6b-6e) with the TensorFlow graph's valid-pixel average pool."""

    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = layer(dbl)
        branch_pool = self.branch_pool(_valid_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch7x7, dbl, branch_pool], 1)


class FidInceptionE(InceptionE):
    """InceptionE with the TensorFlow graph's pool branch: the valid-pixel average pool in
    Mixed_7b (``max_pool=False``, pytorch-fid's FIDInceptionE_1) and a 3x3 max pool in
    Mixed_7c (``max_pool=True``, FIDInceptionE_2)."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool

    def pool(self, x: Tensor) -> Tensor:
        if self.max_pool:
            return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return _valid_avg_pool(x)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        dbl = torch.cat([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], 1)
        branch_pool = self.branch_pool(self.pool(x))
        return torch.cat([self.branch1x1(x), branch3x3, dbl, branch_pool], 1)


def fid_inception_v3() -> Inception3:
    """torchvision's Inception3 (1008 classes, no auxiliary head, no weight init: the weights
    come from the file) with pytorch-fid's block swaps; same parameter names and shapes."""
    net = inception_v3(weights=None, num_classes=FID_CLASSES, aux_logits=False,
                       init_weights=False, transform_input=False)
    net.Mixed_5b = FidInceptionA(192, pool_features=32)
    net.Mixed_5c = FidInceptionA(256, pool_features=64)
    net.Mixed_5d = FidInceptionA(288, pool_features=64)
    for name, channels_7x7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                               ("Mixed_6e", 192)):
        setattr(net, name, FidInceptionC(768, channels_7x7=channels_7x7))
    net.Mixed_7b = FidInceptionE(1280, max_pool=False)
    net.Mixed_7c = FidInceptionE(2048, max_pool=True)
    return net


class FidInception(FrozenInception):
    """The FID feature extractor: ``[B, 3, H, W]`` images in [-1, 1] -> ``[B, 2048]`` pool3.

    Frozen and always in eval mode (batch norm on running statistics): a scoring network must
    not change while scoring. Built without weights: :func:`load_fid_inception` gives it the
    file's.
    """

    feature_dim = FID_DIM
    num_classes = FID_CLASSES

    def __init__(self) -> None:
        super().__init__(fid_inception_v3())

    def features(self, images: Tensor) -> Tensor:
        """pool3 features; pytorch-fid resizes bilinearly (align_corners=False) at any size."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected [B, 3, H, W] images, got {tuple(images.shape)}")
        return self.pool3(F.interpolate(images, size=(FID_SIZE, FID_SIZE), mode="bilinear",
                                        align_corners=False))

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [B, 1008], features [B, 2048])`` in one pass."""
        features = self.features(images)
        return self.net.fc(features), features

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)


def _check_state_dict(path: Path, state: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Same keys (batch norms' ``num_batches_tracked`` counters may be absent: files saved
    before torch 0.4.1 lack them and eval mode never reads them), shapes and kinds of dtype."""
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CpganError(f"{path}: not {FID_INCEPTION_NAME} weights ({len(missing)} missing "
                         f"keys e.g. {missing[:1]}, {len(unexpected)} unexpected e.g. "
                         f"{unexpected[:1]})")
    for key, tensor in state.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise CpganError(f"{path}: {key} has shape {tuple(tensor.shape)}, "
                             f"{FID_INCEPTION_NAME} needs {tuple(want.shape)}")
        if tensor.dtype.is_floating_point != want.dtype.is_floating_point:
            raise CpganError(f"{path}: {key} has dtype {tensor.dtype}, expected {want.dtype}")


@functools.lru_cache(maxsize=1)
def _layout() -> dict[str, Tensor]:
    """The network's state dict as storage-less meta tensors: names, shapes and dtypes to check
    a file against without allocating (or initialising) 24 M parameters."""
    with torch.device("meta"):
        return fid_inception_v3().state_dict()


def load_fid_inception(path: str | Path) -> FidInception:
    """The FID network with the weights of ``path`` (``pt_inception-2015-12-05-6726825d.pth``).

    Read with ``weights_only=True`` (never unpickles objects) and checked key by key before
    the network is built; a missing file, anything that is not such a state dict, a missing or
    extra key, a wrong shape or dtype is a one-line :class:`CpganError` naming the file.
    """
    path = Path(path)
    state = read_state_dict(path, f"the {FID_INCEPTION_NAME} FID network",
                            f"download pytorch-fid's {FID_INCEPTION_FILE} on a machine with "
                            f"network access and pass it with --fid-weights")
    _check_state_dict(path, state, _layout())
    model = FidInception()
    model.net.load_state_dict(state, strict=False)
    return model.eval()
