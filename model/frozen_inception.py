"""torchvision's Inception-v3 as a frozen feature network, shared by everything that uses one.

Three parts of CPGAN run an Inception-v3 they never train: the paper preset's image encoder
backbone (OAIE, Eq. 10: Mixed_6e for the 8 x 8 sub-regions, the 2048-d pool for f), the
Inception Score network (ImageNet logits) and the FID network of published numbers
(pt_inception-2015-12-05, pytorch-fid's block swaps on the same layout). They share:

* the forward order of torchvision's ``Inception3`` blocks, split where OAIE needs Mixed_6e;
* "frozen": parameters without gradient *and* batch norm on its running statistics, so the
  module stays in eval mode when its parent trains, while gradients still reach the input
  (TISCL pushes generated pixels through OAIE's Inception);
* reading a weight file safely: ``torch.load(weights_only=True)`` (a pickled object is
  refused, never run) and a one-line :class:`CpganError` naming the file otherwise.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.inception import Inception3

from cpgan.errors import CpganError
from cpgan.torch_file import load_torch_file, refuse_nonfinite

TO_MIXED_6E = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
               "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
               "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")
"""Blocks from the input to Mixed_6e (768 x 17 x 17 at 299 px)."""
TO_POOL3 = ("Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")
"""Blocks from Mixed_6e to the 2048-d average pool ("pool3", FID's features)."""


class FrozenInception(nn.Module):
    """An ``Inception3`` (``self.net``) that never trains; subclasses choose what to return."""

    def __init__(self, net: Inception3) -> None:
        super().__init__()
        self.net = net
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> "FrozenInception":
        super().train(mode)
        self.net.eval()
        return self

    def run(self, x: Tensor, blocks: tuple[str, ...]) -> Tensor:
        """``x`` through the named blocks of ``self.net``, in order."""
        for name in blocks:
            x = getattr(self.net, name)(x)
        return x

    def pool3(self, x: Tensor) -> Tensor:
        """``[B, 2048]`` pooled features of a ``[B, 3, 299, 299]`` input."""
        return self.run(self.run(x, TO_MIXED_6E), TO_POOL3).flatten(1)


def read_state_dict(path: str | Path, what: str, missing_hint: str) -> dict[str, Tensor]:
    """The tensors of the state dict file ``path``, read without unpickling objects.

    ``what`` names the network in errors ("Inception-v3"); ``missing_hint`` says where to get
    the file when it is absent.
    """
    state = load_torch_file(path, f"{what} weights file", missing_hint)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                              for k, v in state.items()):
        raise CpganError(f"{path}: expected a state dict of tensors for {what}")
    refuse_nonfinite(path, state, "state dict")
    return state
