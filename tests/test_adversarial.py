"""FGSM views with a random start (trainer/adversarial.py), on losses whose answer is known."""
import pytest
import torch

from cpgan.trainer.adversarial import STEP_SCALE, fgsm_views


def _images(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(4, 3, 8, 8, generator=generator) * 1.6 - 0.8  # inside [-1, 1]


def test_views_stay_in_the_ball_and_the_pixel_range():
    images = _images()
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 1.0, -1.0  # at the edges of the range
    weights = torch.randn_like(images)
    views = fgsm_views(images, lambda x: (weights * x).sum(), 0.1)
    assert (views - images).abs().max() <= 0.1 + 1e-6
    assert views.min() >= -1 and views.max() <= 1
    assert not views.requires_grad


def test_a_linear_loss_moves_every_pixel_along_its_gradient_s_sign():
    """From a start within epsilon, a step of 1.25 epsilon along sign(w) leaves each pixel at
    least 0.25 epsilon up the gradient; the loss rises by at least that much per pixel."""
    torch.manual_seed(0)
    images, eps = _images(), 0.05
    weights = torch.randn_like(images)
    views = fgsm_views(images, lambda x: (weights * x).sum(), eps)
    moved = (views - images) * weights.sign()
    assert moved.min() >= (STEP_SCALE - 1) * eps - 1e-6
    assert (weights * views).sum() - (weights * images).sum() >= \
        (STEP_SCALE - 1) * eps * weights.abs().sum() - 1e-4


def test_a_quadratic_loss_is_raised_from_its_minimum():
    images = _images()
    views = fgsm_views(images, lambda x: ((x - images) ** 2).sum(), 0.05)
    assert ((views - images) ** 2).sum() > 0


def test_the_start_comes_from_the_global_rng():
    images = _images()
    weights = torch.randn_like(images)
    torch.manual_seed(3)
    first = fgsm_views(images, lambda x: (weights * x.square()).sum(), 0.1)
    torch.manual_seed(3)
    again = fgsm_views(images, lambda x: (weights * x.square()).sum(), 0.1)
    torch.manual_seed(4)
    other = fgsm_views(images, lambda x: (weights * x.square()).sum(), 0.1)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_zero_epsilon_is_the_images_and_a_negative_one_is_refused():
    images = _images()
    called = []
    assert fgsm_views(images, lambda x: called.append(1) or x.sum(), 0.0) is images
    assert not called
    with pytest.raises(ValueError, match="epsilon"):
        fgsm_views(images, lambda x: x.sum(), -0.1)
