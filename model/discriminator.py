"""Per-stage discriminators: unconditional D^uc (supp. §6.2) and the Fine-grained Conditional
Discriminator D^c (§3.4, Eq. 11), plus AttnGAN's sentence-conditioned D^c for ``--no-fgcd``.

All discriminators return raw logits (no sigmoid): the hinge losses of Eq. 4-5 are applied
to them in ``model/gan_losses.py``. Word features and masks follow the generator's
conventions (``words`` [B, T, d], ``word_mask`` bool [B, T], True = real word).

Trunk sharing. The paper draws D^uc and D^c separately (Fig. 5, Fig. 10); AttnGAN computes
both logits from one downsampling trunk. ``StageDiscriminator`` shares the trunk by default
(``share_trunk=True``): it halves the discriminator's cost, which matters for the toy budget,
and it makes the ``--no-fgcd`` ablation (AttnGAN+, which shares) differ from CPGAN only in
the conditional head. ``share_trunk=False`` gives each discriminator its own trunk, as drawn.
When shared, the one trunk module is registered under both discriminators, so a state dict
lists its tensors under both names (one storage); ``parameters()`` yields them once.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from cpgan.model.generator import attend_words, check_words, init_gan_weights

TRUNK_LAYERS = 5
MIN_TRUNK_SIZE = 4


def down_block(in_channels: int, out_channels: int, batch_norm: bool = True) -> nn.Sequential:
    """conv4x4 stride 2 (+ BN) + LeakyReLU(0.2): AttnGAN's downsampling layer."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 4, 2, 1, bias=False)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


def keep_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3 stride 1 + BN + LeakyReLU(0.2): AttnGAN's Block3x3_leakRelu."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


class DownsamplingTrunk(nn.Module):
    """Five cascaded layers (supp. §6.2), never going below 4x4.

    Layer k has df * min(2^k, 8) channels (AttnGAN's widths, capped at df * 8 as AttnGAN's
    128/256 discriminators bring their deepest maps back to df * 8). Layers are stride-2
    conv4x4 while the map is larger than 4x4 and stride-1 conv3x3 after that, so every image
    size gets five layers: 256 -> 8x8, 128 -> 4x4, 64 -> 4x4 (four strided + one stride-1),
    toy 16 -> 4x4 (two strided + three stride-1). The first layer has no BN, as in AttnGAN.
    """

    def __init__(self, df_dim: int, image_size: int) -> None:
        super().__init__()
        if image_size < 2 * MIN_TRUNK_SIZE or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
        self.image_size = image_size
        strided = min(TRUNK_LAYERS, int(math.log2(image_size // MIN_TRUNK_SIZE)))
        widths = [df_dim * min(2**k, 8) for k in range(TRUNK_LAYERS)]
        layers: list[nn.Module] = [down_block(3, widths[0], batch_norm=False)]
        for k in range(1, TRUNK_LAYERS):
            block = down_block if k < strided else keep_block
            layers.append(block(widths[k - 1], widths[k]))
        self.layers = nn.Sequential(*layers)
        self.out_channels = widths[-1]
        self.out_size = image_size // 2**strided
        self.apply(init_gan_weights)

    def forward(self, images: Tensor) -> Tensor:
        size = self.image_size
        if images.dim() != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"images must be [B, 3, {size}, {size}], got {tuple(images.shape)}")
        return self.layers(images)


class UnconditionalDiscriminator(nn.Module):
    """D^uc (supp. §6.2, Fig. 10): trunk, reshape, FC -> one logit per image."""

    def __init__(self, df_dim: int, image_size: int, trunk: DownsamplingTrunk | None = None):
        super().__init__()
        self.trunk = trunk if trunk is not None else DownsamplingTrunk(df_dim, image_size)
        self.fc = nn.Linear(self.trunk.out_channels * self.trunk.out_size**2, 1)
        init_gan_weights(self.fc)

    def score(self, features: Tensor) -> Tensor:
        """Logits [B] from trunk features, so a shared trunk runs once per image batch."""
        return self.fc(features.flatten(1)).squeeze(1)

    def forward(self, images: Tensor) -> Tensor:
        return self.score(self.trunk(images))


class ConditionalOutput(NamedTuple):
    """Logits [B] of a conditional discriminator; attention [B, T, N, N] (FGCD) or None."""

    logits: Tensor
    attention: Tensor | None


class FineGrainedConditionalDiscriminator(nn.Module):
    """D^c of §3.4: N x N patch features v_ij, word attention per patch (Eq. 11), patch logits.

    The trunk map is average-pooled to N x N patches and projected by a 1x1 conv to the text
    dimension d, so v_ij^T w_n is defined. Per patch, a_n = softmax_n(v_ij^T w_n) over real
    words and p_ij = sum_n a_n w_n; [v_ij; p_ij; s] goes through 1x1 conv, LeakyReLU(0.2),
    1x1 conv to one logit per patch (PatchGAN-style), and the image's logit is their mean.
    """

    def __init__(
        self,
        df_dim: int,
        image_size: int,
        text_dim: int,
        patches: int,
        trunk: DownsamplingTrunk | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk if trunk is not None else DownsamplingTrunk(df_dim, image_size)
        if not 1 <= patches <= self.trunk.out_size:
            raise ValueError(
                f"patches must lie in [1, {self.trunk.out_size}] for {image_size}-pixel images "
                f"(the trunk's final map), got {patches}"
            )
        self.patches = patches
        width = self.trunk.out_channels
        self.patch_features = nn.Conv2d(width, text_dim, 1)
        self.classifier = nn.Sequential(
            nn.Conv2d(text_dim * 3, width, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 1, 1),
        )
        self.patch_features.apply(init_gan_weights)
        self.classifier.apply(init_gan_weights)

    def patch_logits(
        self, features: Tensor, words: Tensor, sentence: Tensor, word_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(logits [B, N, N] of every patch, attention [B, T, N, N]) from trunk features."""
        check_words(words, word_mask)
        n = self.patches
        visual = self.patch_features(F.adaptive_avg_pool2d(features, n))  # v_ij [B, d, N, N]
        batch, dim = visual.shape[:2]
        context, weights = attend_words(visual.flatten(2).transpose(1, 2), words, word_mask)
        context = context.transpose(1, 2).reshape(batch, dim, n, n)  # p_ij
        sentence_map = sentence[:, :, None, None].expand(-1, -1, n, n)
        logits = self.classifier(torch.cat([visual, context, sentence_map], dim=1)).squeeze(1)
        return logits, weights.transpose(1, 2).reshape(batch, -1, n, n)

    def score(
        self, features: Tensor, words: Tensor, sentence: Tensor, word_mask: Tensor
    ) -> ConditionalOutput:
        logits, attention = self.patch_logits(features, words, sentence, word_mask)
        return ConditionalOutput(logits.mean(dim=(1, 2)), attention)

    def forward(
        self, images: Tensor, words: Tensor, sentence: Tensor, word_mask: Tensor
    ) -> ConditionalOutput:
        return self.score(self.trunk(images), words, sentence, word_mask)


class SentenceConditionalDiscriminator(nn.Module):
    """AttnGAN's conditional logits (D_GET_LOGITS, bcondition=True), the ``--no-fgcd`` D^c.

    s is broadcast over the trunk map and concatenated, then conv3x3-BN-LeakyReLU back to the
    trunk width and one convolution covering the whole map (AttnGAN's 4x4 conv) to a logit.
    Words are accepted for a common interface and not used.
    """

    def __init__(
        self,
        df_dim: int,
        image_size: int,
        text_dim: int,
        trunk: DownsamplingTrunk | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk if trunk is not None else DownsamplingTrunk(df_dim, image_size)
        width, size = self.trunk.out_channels, self.trunk.out_size
        self.joint = keep_block(width + text_dim, width)
        self.logit = nn.Conv2d(width, 1, size, stride=size)
        self.joint.apply(init_gan_weights)
        self.logit.apply(init_gan_weights)

    def score(
        self, features: Tensor, words: Tensor, sentence: Tensor, word_mask: Tensor
    ) -> ConditionalOutput:
        size = features.shape[-1]
        sentence_map = sentence[:, :, None, None].expand(-1, -1, size, size)
        joint = self.joint(torch.cat([features, sentence_map], dim=1))
        return ConditionalOutput(self.logit(joint).flatten(), None)

    def forward(
        self, images: Tensor, words: Tensor, sentence: Tensor, word_mask: Tensor
    ) -> ConditionalOutput:
        return self.score(self.trunk(images), words, sentence, word_mask)


class Encoded(NamedTuple):
    """Trunk features of one image batch for D^uc and D^c (the same tensor when shared)."""

    unconditional: Tensor
    conditional: Tensor


class StageLogits(NamedTuple):
    """D^uc and D^c logits [B] of one stage, and the FGCD attention (None without FGCD)."""

    unconditional: Tensor
    conditional: Tensor
    attention: Tensor | None


class StageDiscriminator(nn.Module):
    """D^uc and D^c of one generative stage.

    For Eq. 5 encode each image batch once with ``encode`` and score it several times:
    real images against matching and mismatched captions, fakes against matching ones.
    """

    def __init__(
        self,
        df_dim: int,
        image_size: int,
        text_dim: int,
        patches: int,
        fgcd: bool = True,
        share_trunk: bool = True,
    ) -> None:
        super().__init__()
        self.image_size, self.shared = image_size, share_trunk
        self.unconditional = UnconditionalDiscriminator(df_dim, image_size)
        trunk = self.unconditional.trunk if share_trunk else None
        self.conditional: FineGrainedConditionalDiscriminator | SentenceConditionalDiscriminator
        if fgcd:
            self.conditional = FineGrainedConditionalDiscriminator(
                df_dim, image_size, text_dim, patches, trunk
            )
        else:
            self.conditional = SentenceConditionalDiscriminator(df_dim, image_size, text_dim, trunk)

    def encode(self, images: Tensor) -> Encoded:
        uncond = self.unconditional.trunk(images)
        return Encoded(uncond, uncond if self.shared else self.conditional.trunk(images))

    def unconditional_logits(self, encoded: Encoded) -> Tensor:
        return self.unconditional.score(encoded.unconditional)

    def conditional_logits(
        self, encoded: Encoded, words: Tensor, sentence: Tensor, word_mask: Tensor
    ) -> ConditionalOutput:
        return self.conditional.score(encoded.conditional, words, sentence, word_mask)

    def forward(
        self, images: Tensor, words: Tensor, sentence: Tensor, word_mask: Tensor
    ) -> StageLogits:
        encoded = self.encode(images)
        conditional = self.conditional_logits(encoded, words, sentence, word_mask)
        return StageLogits(
            self.unconditional_logits(encoded), conditional.logits, conditional.attention
        )


def spectral_norm_without_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d removed and spectral norm (Miyato et al.) on every
    convolution and linear map, in place; a shared trunk is changed once.

    Not the paper's D (AttnGAN's, with BN): the ``gan.d_norm = "spectral"`` option. BN in D
    normalises real and fake batches apart, and its gradient to G at the toy preset is small
    and mostly high-frequency; with spectral norm and a smaller TISCL weight the toy GAN
    scored higher R-precision, FID and IS on the same encoders (RESULTS.md, session 10).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        elif isinstance(child, (nn.Conv2d, nn.Linear)):
            if not parametrize.is_parametrized(child):
                setattr(module, name, spectral_norm(child))
        else:
            spectral_norm_without_batch_norm(child)
    return module


class Discriminators(nn.Module):
    """One StageDiscriminator per generative stage, for images of base_size * 2^i pixels."""

    def __init__(
        self,
        stages: int,
        df_dim: int,
        base_size: int,
        text_dim: int,
        patches: int,
        fgcd: bool = True,
        share_trunk: bool = True,
    ) -> None:
        super().__init__()
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        self.stages = nn.ModuleList(
            [
                StageDiscriminator(df_dim, base_size * 2**i, text_dim, patches, fgcd, share_trunk)
                for i in range(stages)
            ]
        )

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, index: int) -> StageDiscriminator:
        return self.stages[index]

    def forward(
        self, images: list[Tensor], words: Tensor, sentence: Tensor, word_mask: Tensor
    ) -> list[StageLogits]:
        """Logits of every stage for the matching caption (the generator's Eq. 4 inputs)."""
        if len(images) != len(self.stages):
            raise ValueError(f"expected {len(self.stages)} image scales, got {len(images)}")
        return [d(img, words, sentence, word_mask) for d, img in zip(self.stages, images)]
