"""Exponential moving average of a model's weights, for the detector and DAMSM pretraining.

The average is a frozen copy of the model whose floating-point state (weights and batch-norm
statistics) follows the trained one as ``avg = d * avg + (1 - d) * current`` after every
optimiser step; integer state (BN's step counts) is copied. The decay ramps up as
``d = decay * (1 - exp(-updates / ramp))`` (YOLOv5's ModelEMA) so that the first, random
weights are forgotten fast. Frozen parts of the model (a detector inside the image encoder)
are constant, so their average is themselves: the caller names the entries that change
(``follow``) and the average skips the rest (the DAMSM trainer follows 0.42 M learned numbers
of the 1.49 M that include the frozen detector and the memory bank).

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
from collections.abc import Collection

import torch
from torch import nn


class WeightAverage:
    """The EMA copy (``model``) of a module and how many updates it has seen.

    ``follow``: the state-dict keys that training changes (default: all); the others keep the
    values the copy was made with.
    """

    def __init__(self, model: nn.Module, decay: float, ramp: float,
                 follow: Collection[str] | None = None) -> None:
        if not 0.0 < decay < 1.0 or ramp <= 0:
            raise ValueError(f"weight average needs 0 < decay < 1 and ramp > 0, got {decay}, "
                             f"{ramp}")
        keys = list(model.state_dict())
        follow = set(keys if follow is None else follow)
        if not follow <= set(keys):
            raise ValueError(f"weight average: no such state entries "
                             f"{sorted(follow - set(keys))[:3]}")
        self.follow = [k for k in keys if k in follow]
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        state = self.model.state_dict()
        self._floats = [k for k in self.follow if state[k].dtype.is_floating_point]
        self._integers = [k for k in self.follow if not state[k].dtype.is_floating_point]
        self.decay = decay
        self.ramp = ramp
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current state (the module this average was made from) in."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.ramp))
        mine, theirs = self.model.state_dict(), model.state_dict()
        averaged = [mine[k] for k in self._floats]
        # two calls over all the tensors rather than two per tensor (per-call overhead)
        torch._foreach_mul_(averaged, d)
        torch._foreach_add_(averaged, [theirs[k].detach() for k in self._floats], alpha=1 - d)
        for key in self._integers:
            mine[key].copy_(theirs[key])
