"""Inception Score, FID and Semantic Object Accuracy: closed forms and hand-computed cases.

No trained detector exists in the test suite, so SOA is checked in two parts: the scores and
caption parsing on hand-made detection sets, and ``detected_categories`` on a real Darknet
(yolov3-toy.cfg) whose output layers are set by hand so its detections are known.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cpgan.config import CONFIG_DIR
from cpgan.model.darknet import Darknet
from cpgan.model.metrics import (
    caption_categories,
    detected_categories,
    feature_statistics,
    fid,
    frechet_distance,
    inception_score,
    soa_class_recall,
    soa_no_object,
    soa_scores,
    soa_unnamed,
)
from cpgan.pipeline.toy import TOY_CATEGORIES, category_words


# ------------------------------------------------------------------------------ Inception Score


def test_uniform_predictions_score_one() -> None:
    probs = torch.full((200, 64), 1 / 64)
    mean, std = inception_score(probs)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_identical_confident_predictions_score_one() -> None:
    """p(y|x) = p(y) for every x: KL 0 however peaked the distribution is."""
    probs = torch.zeros(100, 10)
    probs[:, 3] = 1.0
    assert inception_score(probs)[0] == pytest.approx(1.0, abs=1e-12)


def test_confident_evenly_spread_predictions_score_num_classes() -> None:
    classes = 10
    probs = torch.eye(classes)[torch.arange(1000) % classes]  # every split holds each class 10x
    mean, std = inception_score(probs)
    assert mean == pytest.approx(classes, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_hand_computed_score() -> None:
    """p1 = (1, 0), p2 = (.5, .5): p(y) = (.75, .25), KLs log(4/3) and (log(2/3) + log 2) / 2."""
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    expected = math.exp((math.log(4 / 3) + 0.5 * math.log(2 / 3) + 0.5 * math.log(2)) / 2)
    assert inception_score(probs, splits=1) == pytest.approx((expected, 0.0), abs=1e-12)


def test_splits_are_contiguous_parts() -> None:
    """First half confident and spread (IS 8), second half uniform (IS 1): 2 splits give
    mean 4.5 and population std 3.5."""
    probs = torch.cat([torch.eye(8)[torch.arange(80) % 8], torch.full((80, 8), 1 / 8)])
    assert inception_score(probs, splits=2) == pytest.approx((4.5, 3.5), abs=1e-9)


def test_inception_score_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(torch.rand(50, 4) + 1.0, splits=5)
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.full((5, 4), 0.25), splits=10)


# ------------------------------------------------------------------------------ FID


def _correlated(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)


def test_feature_statistics_are_float64_mean_and_unbiased_covariance() -> None:
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)


def test_fid_of_a_set_with_itself_is_zero() -> None:
    x = _correlated(600, 24, seed=1)
    _, sigma = feature_statistics(x)
    assert abs(fid(x, x.copy())) < 1e-6 * np.trace(sigma)


def test_fid_grows_with_mean_shift_as_its_square() -> None:
    """Same covariance, mean moved by s in each of d dimensions: FID = d s^2."""
    x = _correlated(400, 16, seed=2)
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0]
    values = [fid(x, x + s) for s in shifts]
    assert all(a < b for a, b in zip(values, values[1:]))
    np.testing.assert_allclose(values, [16 * s * s for s in shifts], atol=1e-6)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances() -> None:
    """Commuting covariances: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(a) - sqrt(b))^2, also after
    rotating both by the same orthogonal matrix."""
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.1, 4.0, 8), rng.uniform(0.1, 4.0, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_for_non_commuting_2x2_covariances() -> None:
    """For 2 x 2, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) with M = S1 S2 (real, positive
    eigenvalues even though M is not symmetric)."""
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    m = s1 @ s2
    trace_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expected = np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-10)


def test_rank_deficient_covariances_stay_finite() -> None:
    """Fewer samples than dimensions (singular covariances, as with few generated images)."""
    x, y = _correlated(10, 32, seed=4), _correlated(10, 32, seed=5)
    value = fid(x, y)
    assert math.isfinite(value) and value > 0
    assert abs(fid(x, x)) < 1e-6 * np.trace(feature_statistics(x)[1])


def test_frechet_distance_rejects_mismatched_or_non_finite_statistics() -> None:
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))


# ------------------------------------------------------------------------------ SOA


def _toy_words() -> dict[str, int]:
    """Caption word -> toy category id (ids are 1 + the index in TOY_CATEGORIES)."""
    return {word: TOY_CATEGORIES.index(name) + 1 for word, name in category_words().items()}


CIRCLE, SQUARE, TRIANGLE = 1, 2, 3


def test_caption_categories_use_names_synonyms_and_plurals() -> None:
    words = _toy_words()
    caption = "Two red BALLS left of a blue box, on the grass."
    assert caption_categories(caption, words) == {CIRCLE, SQUARE}
    assert caption_categories("a triangle above the disc", words) == {TRIANGLE, CIRCLE}
    assert caption_categories("three shapes on the sand", words) == set()


def test_soa_scores_hand_computed() -> None:
    """Circle named in images 0-2, found in 0: r = 1/3. Square named in 2-3, found in both:
    r = 1. SOA-C = (1/3 + 1) / 2; SOA-I = (1 + 2) / (3 + 2). Image 4 names nothing and its
    detection does not count; a detection of an unnamed class (image 3) does not either."""
    expected = [{CIRCLE}, {CIRCLE}, {CIRCLE, SQUARE}, {SQUARE}, set()]
    detected = [{CIRCLE}, set(), {SQUARE}, {SQUARE, TRIANGLE}, {CIRCLE}]
    assert soa_class_recall(detected, expected) == {CIRCLE: (1, 3), SQUARE: (2, 2)}
    soa_c, soa_i = soa_scores(detected, expected)
    assert soa_c == pytest.approx(2 / 3) and soa_i == pytest.approx(3 / 5)


def test_soa_no_object_counts_images_without_any_detection() -> None:
    """Of the four images that name a class, image 1 shows the detector nothing; image 2 a
    wrong class (a miss, but not an empty image); image 4 names nothing and does not count."""
    expected = [{CIRCLE}, {CIRCLE}, {CIRCLE, SQUARE}, {SQUARE}, set()]
    detected = [{CIRCLE}, set(), {TRIANGLE}, {SQUARE}, set()]
    assert soa_no_object(detected, expected) == pytest.approx(1 / 4)
    assert soa_no_object([set()] * 4, expected[:4]) == 1.0
    with pytest.raises(ValueError):
        soa_no_object([set()], [set()])


def test_soa_unnamed_is_the_share_of_findings_the_caption_does_not_name() -> None:
    """Findings in the four images that name a class: circle (named), triangle (not), square
    (named), square and triangle (one not): 2 of 5 unnamed. Image 4 names nothing and its
    circle does not count. A detector that finds nothing leaves the share undefined."""
    expected = [{CIRCLE}, {CIRCLE, SQUARE}, {SQUARE}, {SQUARE}, set()]
    detected = [{CIRCLE}, {TRIANGLE}, {SQUARE}, {SQUARE, TRIANGLE}, {CIRCLE}]
    assert soa_unnamed(detected, expected) == pytest.approx(2 / 5)
    assert soa_unnamed([set(e) for e in expected[:4]], expected[:4]) == 0.0
    flat = [{CIRCLE, SQUARE, TRIANGLE}] * 4  # one image for every caption, three classes seen
    assert soa_unnamed(flat, expected[:4]) == pytest.approx(7 / 12)
    assert soa_unnamed([set()] * 4, expected[:4]) is None
    with pytest.raises(ValueError):
        soa_unnamed([set()], [set()])


def test_soa_from_captions_end_to_end() -> None:
    words = _toy_words()
    captions = ["a red ball on the grass", "a blue box", "a ball left of a square", "two shapes"]
    expected = [caption_categories(c, words) for c in captions]
    perfect = [set(e) for e in expected]
    assert soa_scores(perfect, expected) == (1.0, 1.0)
    blind: list[set[int]] = [set() for _ in captions]
    assert soa_scores(blind, expected) == (0.0, 0.0)


def test_soa_rejects_unusable_input() -> None:
    with pytest.raises(ValueError, match="names a detector class"):
        soa_scores([set(), {CIRCLE}], [set(), set()])
    with pytest.raises(ValueError, match="detection sets"):
        soa_scores([set()], [{CIRCLE}, {SQUARE}])


def _rigged_detector(objectness: float, best_class: int) -> Darknet:
    """yolov3-toy with every head's output conv zeroed and its bias set: every candidate box
    has objectness sigmoid(objectness) and class ``best_class``."""
    torch.manual_seed(0)
    model = Darknet.from_cfg_file(CONFIG_DIR / "darknet" / "yolov3-toy.cfg").eval()
    for spec in model.yolo_specs:
        conv = model.layers[spec.layer - 1].conv
        bias = torch.full((spec.num_anchors, 5 + spec.num_classes), -10.0)
        bias[:, :4] = 0.0
        bias[:, 4] = objectness
        bias[:, 5 + best_class] = 10.0
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.copy_(bias.flatten())
    return model


def test_detected_categories_maps_classes_to_category_ids() -> None:
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    category_ids = [11, 12, 13, 14, 15, 16, 17, 18]
    found = detected_categories(_rigged_detector(10.0, 5), images, category_ids)
    assert found == [{16}, {16}, {16}]
    assert detected_categories(_rigged_detector(-10.0, 5), images, category_ids) == [set()] * 3


def test_detected_categories_of_a_random_detector_are_category_ids() -> None:
    torch.manual_seed(1)
    model = Darknet.from_cfg_file(CONFIG_DIR / "darknet" / "yolov3-toy.cfg").eval()
    images = torch.rand(2, 3, 96, 96) * 2 - 1
    category_ids = list(range(101, 109))
    everything = detected_categories(model, images, category_ids, objectness=0.0)
    assert len(everything) == 2 and all(s and s <= set(category_ids) for s in everything)
    assert detected_categories(model, images, category_ids, objectness=1.01) == [set(), set()]
    with pytest.raises(ValueError, match="category ids"):
        detected_categories(model, images, category_ids[:3])
