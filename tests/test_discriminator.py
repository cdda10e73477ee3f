"""Tests of the discriminators: the five-layer trunk, D^uc, the FGCD (Eq. 11) and its
attention, trunk sharing, the --no-fgcd sentence-conditioned variant, paper-size shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpgan.model.discriminator import (
    Discriminators,
    DownsamplingTrunk,
    FineGrainedConditionalDiscriminator,
    SentenceConditionalDiscriminator,
    StageDiscriminator,
    UnconditionalDiscriminator,
)

TEXT, DF, N, T, B = 16, 8, 4, 6, 2


def _text(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sentence [B, d], words [B, T, d] and a mask with 6 and 2 real words."""
    gen = torch.Generator().manual_seed(seed)
    sentence = torch.randn(B, TEXT, generator=gen)
    words = torch.randn(B, T, TEXT, generator=gen)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    return sentence, words, mask


def _images(size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(
    ("size", "strided", "out_size"),
    [(16, 2, 4), (32, 3, 4), (64, 4, 4), (128, 5, 4), (256, 5, 8)],
)
def test_trunk_has_five_layers_and_stops_at_4x4(size: int, strided: int, out_size: int) -> None:
    trunk = DownsamplingTrunk(2, size)
    strides = [block[0].stride[0] for block in trunk.layers]
    assert strides == [2] * strided + [1] * (5 - strided)
    assert trunk.out_size == out_size and trunk.out_channels == 2 * 8
    assert not isinstance(trunk.layers[0][1], torch.nn.BatchNorm2d)
    # AttnGAN's init: orthogonal conv filters, BN scales drawn around one.
    first = trunk.layers[0][0].weight.flatten(1)
    torch.testing.assert_close(first @ first.T, torch.eye(2), atol=1e-5, rtol=0)
    assert not torch.equal(trunk.layers[1][1].weight, torch.ones(4))
    if size <= 64:
        assert trunk(torch.zeros(1, 3, size, size)).shape == (1, 16, out_size, out_size)


def test_trunk_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="power of two"):
        DownsamplingTrunk(DF, 48)
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        DownsamplingTrunk(DF, 16)(torch.zeros(1, 3, 32, 32))


def test_unconditional_discriminator_gives_one_logit_per_image() -> None:
    torch.manual_seed(0)
    d = UnconditionalDiscriminator(DF, 32)
    logits = d(_images(32))
    assert logits.shape == (B,)
    assert d.fc.in_features == DF * 8 * 4 * 4


def test_fgcd_attention_is_eq11_and_ignores_padding() -> None:
    torch.manual_seed(0)
    d = FineGrainedConditionalDiscriminator(DF, 16, TEXT, N).eval()
    sentence, words, mask = _text()
    images = _images(16)
    out = d(images, words, sentence, mask)
    assert out.logits.shape == (B,) and out.attention.shape == (B, T, N, N)
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(B, N, N))
    assert bool((out.attention[1, 2:] == 0).all())
    # Eq. 11 by hand for patch (i, j) = (3, 0) of the second image (two real words).
    with torch.no_grad():
        v = d.patch_features(F.adaptive_avg_pool2d(d.trunk(images), N))[1, :, 3, 0]
    a = torch.softmax(words[1, :2] @ v, dim=0)
    torch.testing.assert_close(out.attention[1, :2, 3, 0], a)
    # The image's logit is the mean of its patch logits.
    patch_logits, _ = d.patch_logits(d.trunk(images), words, sentence, mask)
    assert patch_logits.shape == (B, N, N)
    torch.testing.assert_close(out.logits, patch_logits.mean(dim=(1, 2)))
    poisoned = words.clone()
    poisoned[1, 2:] = float("nan")
    again = d(images, poisoned, sentence, mask)
    assert torch.equal(out.logits, again.logits) and torch.equal(out.attention, again.attention)


def test_fgcd_logit_depends_on_words_and_sentence() -> None:
    torch.manual_seed(0)
    d = FineGrainedConditionalDiscriminator(DF, 16, TEXT, N).eval()
    sentence, words, mask = _text()
    images = _images(16)
    base = d(images, words, sentence, mask).logits
    other_words = words.clone()
    other_words[0, 1] += 1.0
    assert d(images, other_words, sentence, mask).logits[0] != base[0]
    assert d(images, words, sentence + 1.0, mask).logits[0] != base[0]
    with pytest.raises(ValueError, match="patches must lie"):
        FineGrainedConditionalDiscriminator(DF, 16, TEXT, 8)


def test_shared_trunk_runs_once_and_saves_parameters() -> None:
    torch.manual_seed(0)
    shared = StageDiscriminator(DF, 32, TEXT, N)
    separate = StageDiscriminator(DF, 32, TEXT, N, share_trunk=False)
    assert shared.conditional.trunk is shared.unconditional.trunk
    assert separate.conditional.trunk is not separate.unconditional.trunk
    trunk_params = sum(p.numel() for p in shared.unconditional.trunk.parameters())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(separate) - count(shared) == trunk_params
    encoded = shared.encode(_images(32))
    assert encoded.unconditional is encoded.conditional
    encoded = separate.encode(_images(32))
    assert not torch.equal(encoded.unconditional, encoded.conditional)


def test_sentence_conditional_variant_for_no_fgcd() -> None:
    torch.manual_seed(0)
    d = Discriminators(3, DF, 16, TEXT, N, fgcd=False).eval()
    assert isinstance(d[1].conditional, SentenceConditionalDiscriminator)
    sentence, words, mask = _text()
    images = [_images(s) for s in (16, 32, 64)]
    logits = d(images, words, sentence, mask)
    for stage in logits:
        assert stage.unconditional.shape == stage.conditional.shape == (B,)
        assert stage.attention is None
    shuffled = d(images, torch.randn_like(words), sentence, mask)
    assert torch.equal(logits[2].conditional, shuffled[2].conditional)
    moved = d(images, words, sentence.flip(0), mask)
    assert not torch.equal(logits[2].conditional, moved[2].conditional)


def test_discriminators_cover_every_stage() -> None:
    torch.manual_seed(0)
    d = Discriminators(3, DF, 16, TEXT, N).eval()
    assert len(d) == 3 and [s.image_size for s in d.stages] == [16, 32, 64]
    sentence, words, mask = _text()
    logits = d([_images(s) for s in (16, 32, 64)], words, sentence, mask)
    for stage in logits:
        assert stage.unconditional.shape == stage.conditional.shape == (B,)
        assert stage.attention.shape == (B, T, N, N)
    with pytest.raises(ValueError, match="3 image scales"):
        d([_images(16)], words, sentence, mask)


def test_discriminator_shapes_at_paper_size() -> None:
    """Paper preset (df 96, d 256, N 4; images 64, 128, 256), batch 1, no grad."""
    torch.manual_seed(0)
    d = Discriminators(3, 96, 64, 256, 4).eval()
    assert [s.unconditional.trunk.out_size for s in d.stages] == [4, 4, 8]
    images = [torch.zeros(1, 3, s, s) for s in (64, 128, 256)]
    with torch.no_grad():
        logits = d(images, torch.randn(1, 18, 256), torch.randn(1, 256), torch.ones(1, 18).bool())
    for stage in logits:
        assert stage.unconditional.shape == stage.conditional.shape == (1,)
        assert stage.attention.shape == (1, 18, 4, 4)


def test_spectral_norm_replaces_every_batch_norm_and_normalises_each_layer_once() -> None:
    from torch.nn.utils import parametrize

    from cpgan.model.discriminator import spectral_norm_without_batch_norm

    torch.manual_seed(0)
    discriminators = spectral_norm_without_batch_norm(Discriminators(2, DF, 16, TEXT, 2))
    modules = list(discriminators.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in modules)
    layers = [m for m in modules if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert layers and all(parametrize.is_parametrized(m, "weight") for m in layers)
    assert all(len(m.parametrizations.weight) == 1 for m in layers)  # shared trunk: once
    stage = discriminators[1]
    assert stage.unconditional.trunk is stage.conditional.trunk
    conv = stage.unconditional.trunk.layers[1][0]
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(5.0)  # the layer still computes W / sigma(W)
    norm = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item()
    assert norm == pytest.approx(1.0, rel=0.1)
