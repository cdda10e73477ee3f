"""Adversarial views for DAMSM pretraining: an image encoder whose gradients draw shapes.

TISCL (Eq. 6) teaches the generator through the gradient of the frozen encoders' DAMSM loss
with respect to the image. An encoder trained on clean images only has the gradient of any
ordinary CNN: mostly pixel-level patterns that change its features without changing what a
person (or a detector) sees. Pixels optimised directly against TISCL through clean toy
encoders become coloured noise (``bench/tiscl_pixels.py``), and the toy GAN trained through
them draws blobs in the caption's colours and places, not outlines (RESULTS.md, sessions
9-17).

Encoders trained on adversarial examples have gradients that follow the image's content
(Tsipras et al., 2019, "Robustness may be at odds with accuracy"; Santurkar et al., 2019,
"Image synthesis with a single robust classifier"). So with ``encoder.adversarial_epsilon``
> 0 each DAMSM step trains on views of its batch's images moved within an L-infinity ball of
that radius (pixels in [-1, 1]) so as to raise the step's DAMSM loss: one signed-gradient
step from a uniformly random start, "FGSM with random start" (Wong et al., 2020, "Fast is
better than free"), which costs one more forward and backward pass of the image side.

This is ours, not the paper's (whose Inception-v3 is frozen, and whose YOLOv3 features are the
real objects'); the paper preset keeps 0.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

STEP_SCALE = 1.25  # Wong et al.'s step: 1.25 epsilon from the random start, then clipped
PIXEL_RANGE = (-1.0, 1.0)


def fgsm_views(images: Tensor, loss_of: Callable[[Tensor], Tensor], epsilon: float) -> Tensor:
    """``images`` moved within ``epsilon`` (L-infinity) to raise ``loss_of(images)``.

    The start is uniform in the ball (from the global torch RNG, so a resumed run draws the
    same starts); one step of ``STEP_SCALE * epsilon`` along the sign of the gradient follows,
    clipped back to the ball and to the pixel range. The result carries no graph.
    """
    if epsilon < 0:
        raise ValueError(f"adversarial epsilon must be >= 0, got {epsilon}")
    if epsilon == 0:
        return images
    source = images.detach()
    start = (torch.rand_like(source) * 2 - 1) * epsilon
    delta = start.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(source + delta), delta)
    delta = (delta.detach() + STEP_SCALE * epsilon * grad.sign()).clamp(-epsilon, epsilon)
    return (source + delta).clamp(*PIXEL_RANGE)
