"""Tests of the CPGAN generator: truncated noise, conditioning augmentation, F^att (Eq. 12-13),
stage shapes at toy and paper sizes, padding invariance and the C0 residual path."""
from __future__ import annotations

import math

import pytest
import torch

from cpgan.model.generator import (
    ConditioningAugmentation,
    Generator,
    WordAttention,
    truncated_normal,
    upsample_count,
)

TEXT, Z, COND, GF, BASE, R_NUM, T, B = 16, 8, 6, 8, 16, 1, 6, 2


def _text(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sentence [B, d], words [B, T, d] and a mask with 6 and 3 real words."""
    gen = torch.Generator().manual_seed(seed)
    sentence = torch.randn(B, TEXT, generator=gen)
    words = torch.randn(B, T, TEXT, generator=gen)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    return sentence, words, mask


def _generator(seed: int = 0, stages: int = 3) -> Generator:
    torch.manual_seed(seed)
    return Generator(TEXT, Z, COND, GF, BASE, stages=stages, r_num=R_NUM)


def test_truncated_normal_stays_inside_and_is_a_truncated_gaussian() -> None:
    z = truncated_normal((200_000,), threshold=2.0, generator=torch.Generator().manual_seed(0))
    assert bool((z.abs() < 2.0).all())
    # Std of N(0, 1) truncated to (-2, 2): 1 - 2 * 2 * phi(2) / (2 * Phi(2) - 1) under a sqrt.
    phi = math.exp(-2.0) / math.sqrt(2 * math.pi)
    mass = math.erf(2.0 / math.sqrt(2.0))
    expected_std = math.sqrt(1.0 - 4.0 * phi / mass)
    assert z.std().item() == pytest.approx(expected_std, abs=0.005)
    assert z.mean().item() == pytest.approx(0.0, abs=0.01)
    # Redrawn, not clamped: nothing piles up at the boundary.
    assert (z.abs() > 1.99).float().mean().item() < 0.002


def test_truncated_normal_is_deterministic_given_a_generator() -> None:
    first = truncated_normal((64, 100), generator=torch.Generator().manual_seed(7))
    again = truncated_normal((64, 100), generator=torch.Generator().manual_seed(7))
    other = truncated_normal((64, 100), generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    tight = truncated_normal((1000,), threshold=0.5, generator=torch.Generator().manual_seed(1))
    assert bool((tight.abs() < 0.5).all())
    with pytest.raises(ValueError, match="positive"):
        truncated_normal((3,), threshold=0.0)


def test_conditioning_augmentation_reparameterises_around_mu() -> None:
    torch.manual_seed(0)
    ca = ConditioningAugmentation(TEXT, COND)
    sentence = torch.randn(B, TEXT)
    torch.manual_seed(5)
    c, mu, logvar = ca(sentence)
    torch.manual_seed(5)
    eps = torch.randn(B, COND)
    assert c.shape == mu.shape == logvar.shape == (B, COND)
    torch.testing.assert_close(c, mu + torch.exp(0.5 * logvar) * eps)
    mean_c, mean_mu, _ = ca(sentence, sample=False)
    assert torch.equal(mean_c, mean_mu) and torch.equal(mean_mu, mu)


def test_word_attention_matches_eq13_and_ignores_padding() -> None:
    torch.manual_seed(0)
    att = WordAttention(feature_dim=5, text_dim=TEXT)
    features = torch.randn(B, 5, 3, 4)
    _, words, mask = _text()
    context, maps = att(features, words, mask)
    assert context.shape == (B, 5, 3, 4) and maps.shape == (B, T, 3, 4)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(B, 3, 4))
    assert bool((maps[1, 3:] == 0).all())
    # Eq. 13 by hand for pixel (m, n) = (2, 1) of the second caption (3 real words).
    w_hat = words[1, :3] @ att.project.weight.T
    b = torch.softmax(w_hat @ features[1, :, 2, 1], dim=0)
    torch.testing.assert_close(maps[1, :3, 2, 1], b)
    torch.testing.assert_close(context[1, :, 2, 1], b @ w_hat)
    poisoned = words.clone()
    poisoned[1, 3:] = float("nan")
    context2, maps2 = att(features, poisoned, mask)
    assert torch.equal(context, context2) and torch.equal(maps, maps2)


def test_word_attention_refuses_a_caption_without_words() -> None:
    att = WordAttention(4, TEXT)
    _, words, mask = _text()
    mask[0] = False
    with pytest.raises(ValueError, match="at least one real word"):
        att(torch.randn(B, 4, 2, 2), words, mask)


def test_generator_stage_shapes_toy() -> None:
    gen = _generator()
    sentence, words, mask = _text()
    out = gen(truncated_normal((B, Z)), sentence, words, mask)
    assert gen.image_sizes() == [16, 32, 64]
    assert [tuple(i.shape) for i in out.images] == [(B, 3, s, s) for s in (16, 32, 64)]
    assert [tuple(a.shape) for a in out.attention] == [(B, T, 16, 16), (B, T, 32, 32)]
    assert out.mu.shape == out.logvar.shape == (B, COND)
    for image in out.images:
        assert bool((image.abs() <= 1).all())
    for maps in out.attention:
        torch.testing.assert_close(maps.sum(dim=1), torch.ones_like(maps[:, 0]))
        assert bool((maps[1, 3:] == 0).all())


def test_generator_stage_count_and_base_size() -> None:
    assert upsample_count(64) == 4 and upsample_count(16) == 2
    two = _generator(stages=2)
    sentence, words, mask = _text()
    out = two(truncated_normal((B, Z)), sentence, words, mask)
    assert [i.shape[-1] for i in out.images] == [16, 32] and len(out.attention) == 1
    assert len(two.initial.upsample) == 2 and two.initial.width == GF * 4
    with pytest.raises(ValueError, match="power of two"):
        Generator(TEXT, Z, COND, GF, 24)
    with pytest.raises(ValueError, match="z must be"):
        two(torch.zeros(B, Z + 1), sentence, words, mask)


def test_generator_output_ignores_padded_word_features() -> None:
    gen = _generator().eval()
    sentence, words, mask = _text()
    z = truncated_normal((B, Z), generator=torch.Generator().manual_seed(3))
    poisoned = words.clone()
    poisoned[1, 3:] = 1e6
    first = gen(z, sentence, words, mask, sample_condition=False)
    second = gen(z, sentence, poisoned, mask, sample_condition=False)
    for a, b in zip(first.images, second.images):
        assert torch.equal(a, b)
    changed = words.clone()
    changed[1, 0] += 1.0
    third = gen(z, sentence, changed, mask, sample_condition=False)
    assert not torch.equal(first.images[2][1], third.images[2][1])
    assert torch.equal(first.images[0], third.images[0])  # G0 sees s only, not W


def test_generator_residual_path_from_c0() -> None:
    """With the G_i branches silenced, C_i = fuse(R^i(C0)): the path of §3.1 alone."""
    gen = _generator().eval()
    for stage in gen.next_stages:
        bn = stage.upsample[2]  # BN before the GLU: zero output makes the GLU output zero
        torch.nn.init.zeros_(bn.weight)
        torch.nn.init.zeros_(bn.bias)
    sentence, words, mask = _text()
    z = truncated_normal((B, Z), generator=torch.Generator().manual_seed(4))
    out = gen(z, sentence, words, mask, sample_condition=False)
    with torch.no_grad():
        c0 = gen.initial(z, gen.condition(sentence, sample=False)[0])
        r1 = gen.residual_up(c0)
        c1 = gen.fuse(r1)
        c2 = gen.fuse(gen.residual_up(r1))
    torch.testing.assert_close(out.images[1], gen.heads[1](c1))
    torch.testing.assert_close(out.images[2], gen.heads[2](c2))


def test_generator_shapes_at_paper_size() -> None:
    """Paper preset (base 64 -> 256, gf 48, r_num 3, d 256, z 100, c 100), batch 1, no grad."""
    torch.manual_seed(0)
    gen = Generator(256, 100, 100, 48, 64, stages=3, r_num=3).eval()
    assert gen.initial.width == 48 * 16 and len(gen.next_stages[0].residual) == 3
    words = torch.randn(1, 18, 256)
    with torch.no_grad():
        out = gen(truncated_normal((1, 100)), torch.randn(1, 256), words, torch.ones(1, 18).bool())
    assert [tuple(i.shape) for i in out.images] == [(1, 3, s, s) for s in (64, 128, 256)]
    assert [tuple(a.shape) for a in out.attention] == [(1, 18, 64, 64), (1, 18, 128, 128)]


def test_without_condition_augmentation_c_is_mu_even_when_sampling_is_asked() -> None:
    """``condition_augmentation=False``: c = mu(s) in every mode, so the global RNG (the CA
    noise) changes nothing; with it (AttnGAN), the same call draws another c."""
    sentence, words, mask = _text()
    z = truncated_normal((B, Z), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    plain = Generator(TEXT, Z, COND, GF, BASE, stages=3, r_num=R_NUM,
                      condition_augmentation=False).eval()
    torch.manual_seed(0)
    augmented = _generator().eval()  # the same weights, drawn from the same seed
    torch.manual_seed(1)
    first = plain(z, sentence, words, mask)
    torch.manual_seed(2)
    second = plain(z, sentence, words, mask)
    deterministic = augmented(z, sentence, words, mask, sample_condition=False)
    for a, b, c in zip(first.images, second.images, deterministic.images):
        assert torch.equal(a, b) and torch.equal(a, c)
    torch.manual_seed(1)
    drawn = augmented(z, sentence, words, mask)
    assert not torch.equal(drawn.images[0], first.images[0])
