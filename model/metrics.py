"""Evaluation metrics on encoded features (DESIGN §4 "Evaluation").

R-precision measures text-image consistency with the DAMSM encoders: does an image's global
feature f rank its own caption's sentence vector s first among 100 candidates by cosine
similarity? Two protocols, so numbers can be set beside both kinds of published ones:

* :func:`r_precision` -- DM-GAN's protocol (used by most later papers): for every image, its
  true caption and 99 captions of other images drawn at random; the hit rate over the images
  split into 10 folds, reported as mean and std of the fold rates.
* :func:`r_precision_in_batch` -- the CPGAN release's evaluation script: the images are
  shuffled into batches of 100 (the last incomplete batch dropped), and each image's true
  caption competes with the 99 other captions of its batch; mean (and std) of the batch rates.

A tie with a distractor is not a hit (the true caption must score strictly highest), so
degenerate encoders that map everything to one vector score 0, not 1.

The functions take features, not images or models: encoding is the caller's job, and the same
functions then serve real images (encoder sanity check) and generated ones (evaluation).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CANDIDATES = 100
FOLDS = 10
CHUNK = 1024


def _check_pairs(image_features: Tensor, text_features: Tensor, minimum: int) -> None:
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"expected matching [N, d] image and text features, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if image_features.shape[0] < minimum:
        raise ValueError(f"R-precision needs at least {minimum} image-caption pairs, "
                         f"got {image_features.shape[0]}")


def _generator(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def mismatched_captions(num_images: int, count: int, seed: int | np.random.Generator) -> np.ndarray:
    """``[N, count]`` indices of distinct captions of *other* images, drawn per image."""
    rng = _generator(seed)
    drawn = np.stack([rng.choice(num_images - 1, size=count, replace=False)
                      for _ in range(num_images)])
    own = np.arange(num_images)[:, None]
    return drawn + (drawn >= own)  # skip the image's own index


def ranking_hits(image_features: Tensor, text_features: Tensor, distractors: np.ndarray) -> Tensor:
    """``[N]`` bool: the true caption (row i of ``text_features``) beats every distractor.

    Cosine similarities are computed in chunks of images so memory stays bounded by
    ``CHUNK x candidates x d`` whatever N is.
    """
    images = F.normalize(image_features.float(), dim=1)
    texts = F.normalize(text_features.float(), dim=1)
    index = torch.as_tensor(distractors, dtype=torch.long, device=texts.device)
    hits = []
    for start in range(0, images.shape[0], CHUNK):
        img = images[start:start + CHUNK]
        true = (img * texts[start:start + CHUNK]).sum(dim=1)
        others = torch.einsum("nd,nkd->nk", img, texts[index[start:start + CHUNK]])
        best = others.max(dim=1).values if others.shape[1] else torch.full_like(true, -2.0)
        hits.append(true > best)
    return torch.cat(hits)


def fold_statistics(hits: Tensor, folds: int) -> tuple[float, float]:
    """Mean and (population) std of the hit rate over ``folds`` contiguous folds (DM-GAN)."""
    rates = np.array([part.float().mean().item() for part in torch.tensor_split(hits, folds)])
    return float(rates.mean()), float(rates.std())


def r_precision(
    image_features: Tensor,
    text_features: Tensor,
    candidates: int = CANDIDATES,
    folds: int = FOLDS,
    seed: int | np.random.Generator = 0,
) -> tuple[float, float]:
    """DM-GAN R-precision: 1 true caption vs ``candidates - 1`` random others, mean +- std.

    ``image_features`` ``[N, d]`` are the images' global features f, ``text_features``
    ``[N, d]`` the sentence vectors s of each image's true caption (row i belongs to image
    i). The distractors are drawn with ``seed`` (an int or a numpy Generator), so a seed
    gives the same result every time.
    """
    if candidates < 1 or folds < 1:
        raise ValueError(f"candidates and folds must be positive, got {candidates}, {folds}")
    _check_pairs(image_features, text_features, max(candidates, folds))
    distractors = mismatched_captions(image_features.shape[0], candidates - 1, seed)
    return fold_statistics(ranking_hits(image_features, text_features, distractors), folds)


def r_precision_in_batch(
    image_features: Tensor,
    text_features: Tensor,
    batch: int = CANDIDATES,
    seed: int | np.random.Generator = 0,
) -> tuple[float, float]:
    """The CPGAN release's R-precision: true caption vs the other captions of its batch.

    Pairs are shuffled with ``seed`` and cut into batches of ``batch`` (the remainder is
    dropped, as the release's ``drop_last`` loader does, so every image has ``batch - 1``
    distractors). Returns the mean and std of the per-batch hit rates.
    """
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    _check_pairs(image_features, text_features, batch)
    count = image_features.shape[0] // batch
    order = _generator(seed).permutation(image_features.shape[0])[:count * batch]
    index = torch.as_tensor(order, dtype=torch.long, device=image_features.device)
    images = F.normalize(image_features[index].float(), dim=1).view(count, batch, -1)
    texts = F.normalize(text_features[index].float(), dim=1).view(count, batch, -1)
    scores = torch.bmm(images, texts.transpose(1, 2))          # [count, image, caption]
    true = scores.diagonal(dim1=1, dim2=2)
    eye = torch.eye(batch, dtype=torch.bool, device=scores.device)
    best = scores.masked_fill(eye, float("-inf")).max(dim=2).values
    return fold_statistics((true > best).flatten(), count)
