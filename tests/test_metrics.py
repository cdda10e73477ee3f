"""R-precision: oracle and chance levels, fold arithmetic, determinism, both protocols."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cpgan.model.metrics import mismatched_captions, r_precision, r_precision_in_batch


def _features(n: int, d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _half_aligned(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose true caption is themselves (first half) or their opposite (second half):
    cos 1 beats every distractor, cos -1 loses to every one."""
    images = _features(n, d=64)
    texts = images.clone()
    texts[n // 2:] *= -1
    return images, texts


def test_oracle_encoder_scores_one() -> None:
    features = _features(500)
    assert r_precision(features, features.clone()) == (1.0, 0.0)
    assert r_precision_in_batch(features, features.clone()) == (1.0, 0.0)


def test_random_features_score_chance() -> None:
    images, texts = _features(2000, seed=1), _features(2000, seed=2)
    mean, std = r_precision(images, texts, seed=0)
    assert 0.0 < mean < 0.03 and std >= 0.0
    mean, _ = r_precision_in_batch(images, texts, seed=0)
    assert 0.0 <= mean < 0.03


def test_fold_mean_and_std_follow_contiguous_folds() -> None:
    """Hits exactly on the first half: five folds at 1, five at 0 (DM-GAN's 10 folds)."""
    images, texts = _half_aligned(1000)
    assert r_precision(images, texts, seed=3) == (0.5, 0.5)
    mean, std = r_precision_in_batch(images, texts, seed=3)
    assert mean == pytest.approx(0.5) and 0.0 < std < 0.5


def _noisy_copies(n: int) -> torch.Tensor:
    """Captions that are noisy copies of the images (seed 4): neither perfect nor chance."""
    return _features(n, seed=4) + 1.4 * _features(n, seed=5)


def test_same_seed_same_result() -> None:
    images, texts = _features(600, seed=4), _noisy_copies(600)
    first = r_precision(images, texts, seed=7)
    assert r_precision(images, texts, seed=7) == first
    assert r_precision(images, texts, seed=np.random.default_rng(7)) == first
    batch_first = r_precision_in_batch(images, texts, seed=7)
    assert r_precision_in_batch(images, texts, seed=7) == batch_first
    assert 0.05 < first[0] < 0.95  # a non-trivial case, so determinism is meaningful


def test_distractors_are_other_images_and_distinct() -> None:
    drawn = mismatched_captions(300, 99, seed=0)
    assert drawn.shape == (300, 99) and drawn.min() >= 0 and drawn.max() < 300
    assert not np.any(drawn == np.arange(300)[:, None])
    assert all(len(set(row)) == 99 for row in drawn.tolist())
    assert np.array_equal(drawn, mismatched_captions(300, 99, seed=0))
    assert not np.array_equal(drawn, mismatched_captions(300, 99, seed=1))


def test_ties_are_not_hits() -> None:
    same = torch.ones(200, 8)
    assert r_precision(same, same) == (0.0, 0.0)
    assert r_precision_in_batch(same, same) == (0.0, 0.0)


def test_in_batch_drops_the_incomplete_batch() -> None:
    """250 pairs -> two batches of 100; the 50 left over never count."""
    images, texts = _features(250, seed=6), _features(250, seed=6)
    texts_bad = texts.clone()
    order = np.random.default_rng(11).permutation(250)
    texts_bad[torch.as_tensor(order[200:])] *= -1  # only the dropped pairs are wrong
    assert r_precision_in_batch(images, texts_bad, seed=11) == (1.0, 0.0)
    texts_bad[torch.as_tensor(order[:1])] *= -1
    assert r_precision_in_batch(images, texts_bad, seed=11)[0] == pytest.approx(0.995)


def test_too_few_pairs_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 100"):
        r_precision(_features(99), _features(99))
    with pytest.raises(ValueError, match="at least 100"):
        r_precision_in_batch(_features(99), _features(99))
    with pytest.raises(ValueError, match="matching"):
        r_precision(_features(200), _features(150))
