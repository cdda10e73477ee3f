"""Exponential moving average of a model's weights, for the detector and DAMSM pretraining.

The average is a frozen copy of the model whose floating-point state (weights and batch-norm
statistics) follows the trained one as ``avg = d * avg + (1 - d) * current`` after every
optimiser step; integer state (BN's step counts) is copied. The decay ramps up as
``d = decay * (1 - exp(-updates / ramp))`` (YOLOv5's ModelEMA) so that the first, random
weights are forgotten fast. Frozen parts of the model (a detector inside the image encoder)
are constant, so their average is themselves.

What it buys differs by stage. Over a long run (the paper preset) the average is a steadier
model than the last iterate at no training cost. In the toy detector's few epochs the weights
improve faster than an average can follow (a 5-epoch toy run with decay 0.995 scored 0.64
mAP@0.5 where the last weights of comparable runs scored 0.75-0.78), so configs/toy.toml
leaves it off there; in the toy DAMSM, whose last epochs change little, it lifts val
R-precision by a few thousandths on every seed tried (configs/toy.toml, RESULTS.md).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


class WeightAverage:
    """The EMA copy (``model``) of a module and how many updates it has seen."""

    def __init__(self, model: nn.Module, decay: float, ramp: float) -> None:
        if not 0.0 < decay < 1.0 or ramp <= 0:
            raise ValueError(f"weight average needs 0 < decay < 1 and ramp > 0, got {decay}, "
                             f"{ramp}")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.ramp = ramp
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current state (the module this average was made from) in."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.ramp))
        for mine, theirs in zip(self.model.state_dict().values(), model.state_dict().values()):
            if mine.dtype.is_floating_point:
                mine.mul_(d).add_(theirs.detach(), alpha=1 - d)
            else:
                mine.copy_(theirs)
