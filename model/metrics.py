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

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from cpgan.model.darknet import Darknet

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


# ---------------------------------------------------------------------------------------------
# Inception Score
#
# Salimans et al. 2016: IS = exp(E_x KL(p(y|x) || p(y))), where p(y|x) is the scoring network's
# softmax for image x and p(y) its mean over the images scored together. The images are cut
# into ``splits`` contiguous parts (10 in every published IS, the CPGAN release included), the
# score is computed per part and reported as mean and std over the parts. It ranges from 1
# (every image gets the same distribution, or a uniform one) to C (every image confidently in
# one class, the classes used evenly).

IS_SPLITS = 10


def inception_score(probs: Tensor | np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Mean and (population) std over ``splits`` contiguous parts of exp(E KL(p(y|x) || p(y))).

    ``probs`` ``[N, C]`` are softmax outputs (rows on the simplex, checked to 1e-3). The parts
    follow the original code: part i holds rows ``[i N / splits, (i + 1) N / splits)``.
    Zero probabilities contribute 0 (``0 log 0 = 0``) instead of NaN.
    """
    p = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    if p.dim() != 2 or p.shape[1] < 1:
        raise ValueError(f"expected [N, C] class probabilities, got {tuple(p.shape)}")
    if splits < 1 or p.shape[0] < splits:
        raise ValueError(f"Inception Score needs 1 <= splits <= N, got {splits} splits "
                         f"for {p.shape[0]} images")
    if not torch.isfinite(p).all() or (p < 0).any() or \
            not torch.allclose(p.sum(dim=1), torch.ones(p.shape[0], dtype=p.dtype), atol=1e-3):
        raise ValueError("probs must be finite, non-negative rows that sum to 1 (softmax outputs)")
    n = p.shape[0]
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(dim=0, keepdim=True)
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)).sum(dim=1)
        scores.append(float(torch.exp(kl.mean())))
    values = np.array(scores)
    return float(values.mean()), float(values.std())


# ---------------------------------------------------------------------------------------------
# Frechet Inception Distance
#
# Heusel et al. 2017: FID = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}) between
# Gaussians fitted to two sets of pooled features. Only the trace of (S_1 S_2)^{1/2} is needed,
# and S_1 S_2 has the same eigenvalues as the symmetric PSD matrix S_1^{1/2} S_2 S_1^{1/2}
# (AB and BA share non-zero eigenvalues), so the trace is sum(sqrt(eigvalsh(...))) from two
# symmetric eigendecompositions in float64. Unlike the general ``scipy.linalg.sqrtm`` route of
# pytorch-fid this never produces complex parts or non-finite values from finite input, so no
# ``eps * I`` retry is needed; eigenvalues that rounding pushes below zero are clipped to 0.


def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, N - 1, as ``np.cov``) in float64."""
    x = np.asarray(torch.as_tensor(features).detach().cpu().double())
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"expected [N, D] features with N >= 2, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinity")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative rounding clipped)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID on pooled features)."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} and {mu2.shape}, "
                         f"sigma {s1.shape} and {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("statistics contain NaN or infinity")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # exact symmetry for eigh
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)


def fid(features_a: Tensor | np.ndarray, features_b: Tensor | np.ndarray) -> float:
    """FID between two feature sets ``[N_a, D]`` and ``[N_b, D]`` (same scoring network)."""
    mu_a, sigma_a = feature_statistics(features_a)
    mu_b, sigma_b = feature_statistics(features_b)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


# ---------------------------------------------------------------------------------------------
# Semantic Object Accuracy
#
# Hinz et al. 2020 (TPAMI), as their calculate_soa.py computes it: for every detector class c,
# I_c is the set of generated images whose caption names c; an image "recalls" c when the
# detector finds at least one object of class c in it. With r_c = |recalled in I_c| / |I_c|,
#   SOA-C = mean over classes (with |I_c| > 0) of r_c            (class-average recall)
#   SOA-I = sum_c |recalled in I_c| / sum_c |I_c|                 (image-weighted recall)
# A caption naming two classes puts its image in both I_c, so SOA-I averages over (image,
# named class) pairs. Detection follows their YOLOv3 settings: a box counts when its
# objectness is >= 0.5 and its class is the argmax of the class probabilities (their NMS
# never removes the last box of a class, so it does not change which classes are found).

SOA_OBJECTNESS = 0.5


def caption_categories(caption: str, words: dict[str, int]) -> set[int]:
    """Category ids named by ``caption``: its tokens (the project tokenizer) looked up in
    ``words`` (``pipeline.categories.category_words``: names, plurals, toy synonyms)."""
    from cpgan.pipeline.text import tokenize

    return {words[token] for token in tokenize(caption) if token in words}


def soa_class_recall(detected: list[set[int]],
                     expected: list[set[int]]) -> dict[int, tuple[int, int]]:
    """Per class c named by some caption: (images of I_c where c was detected, |I_c|)."""
    if len(detected) != len(expected):
        raise ValueError(f"{len(detected)} detection sets for {len(expected)} captions")
    counts: dict[int, list[int]] = {}
    for found, named in zip(detected, expected):
        for category in named:
            entry = counts.setdefault(category, [0, 0])
            entry[0] += category in found
            entry[1] += 1
    return {c: (hits, total) for c, (hits, total) in sorted(counts.items())}


def soa_scores(detected: list[set[int]], expected: list[set[int]]) -> tuple[float, float]:
    """(SOA-C, SOA-I) of images whose detections are ``detected[i]`` and whose captions name
    ``expected[i]``; images whose caption names no class do not count."""
    recall = soa_class_recall(detected, expected)
    if not recall:
        raise ValueError("SOA needs at least one caption that names a detector class")
    soa_c = float(np.mean([hits / total for hits, total in recall.values()]))
    soa_i = sum(h for h, _ in recall.values()) / sum(t for _, t in recall.values())
    return soa_c, float(soa_i)


def _soa_images(detected: list[set[int]],
                expected: list[set[int]]) -> list[tuple[set[int], set[int]]]:
    """(found, named) of SOA's images: those whose caption names at least one class."""
    if len(detected) != len(expected):
        raise ValueError(f"{len(detected)} detection sets for {len(expected)} captions")
    counted = [(found, named) for found, named in zip(detected, expected) if named]
    if not counted:
        raise ValueError("SOA needs at least one caption that names a detector class")
    return counted


def soa_no_object(detected: list[set[int]], expected: list[set[int]]) -> float:
    """The share of SOA's images (those whose caption names a class) in which the detector
    finds no object of any class. It splits SOA-C's misses in two: objects the detector does
    not see at all, and objects it calls something else (the toy GAN's 750-step images: 0.40
    of them show it nothing, real images 0.02; RESULTS.md, session 19)."""
    counted = _soa_images(detected, expected)
    return sum(1 for found, _ in counted if not found) / len(counted)


def soa_unnamed(detected: list[set[int]], expected: list[set[int]]) -> float | None:
    """The share of the detector's findings in SOA's images (one per image and class found)
    whose class the caption does not name: one minus the precision of SOA's class sets, or
    None when the detector finds nothing in any of them.

    SOA-C and SOA-I are recalls, so images in which the detector names many classes score
    without showing what the caption says. This is the guard beside them: a collapsed toy
    generator, one flat magenta image for every caption, made the detector name hexagon,
    square and triangle in all of them and scored SOA-C 0.378, above the preset's 0.338, with
    0.82 of its findings unnamed against the preset's 0.53 (RESULTS.md, session 30). Real
    images give the level that captions' omissions leave (toy val 0.18: a caption of a
    three-shape image may name two of them).
    """
    counted = _soa_images(detected, expected)
    findings = sum(len(found) for found, _ in counted)
    if findings == 0:
        return None
    return sum(len(found - named) for found, named in counted) / findings


@torch.no_grad()
def detected_categories(detector: Darknet, images: Tensor, category_ids: list[int],
                        objectness: float = SOA_OBJECTNESS) -> list[set[int]]:
    """Category ids the detector finds in each image of ``images`` ``[B, 3, H, W]`` in [-1, 1].

    ``detector`` is a :class:`~cpgan.model.darknet.Darknet` (its cfg fixes the square input
    size the images are letterboxed to); ``category_ids[k]`` is the dataset category of its
    class k, as stored in ``detector.pt``.
    """
    from cpgan.model.yolo import decode_yolo, letterbox_tensor

    if len(category_ids) != detector.num_classes:
        raise ValueError(f"{len(category_ids)} category ids for a detector with "
                         f"{detector.num_classes} classes")
    x, _ = letterbox_tensor(images, detector.input_size, input_range=(-1.0, 1.0))
    heads, _ = detector(x)
    _, object_scores, class_probs = decode_yolo(heads, detector.yolo_specs, x.shape[-2:])
    labels = class_probs.argmax(dim=-1)
    found = []
    for keep, label in zip(object_scores >= objectness, labels):
        found.append({category_ids[k] for k in label[keep].unique().tolist()})
    return found
