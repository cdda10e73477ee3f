"""CPGAN's coarse-to-fine generator (§3.1 Eq. 2, supplementary §6.1 Eq. 12-13).

The structure is AttnGAN's attentional generative network (G_NET): conditioning augmentation
of the sentence vector s, G0 mapping [c; z] through an FC layer and upsampling blocks to the
feature map C0 and the first image, and G1, G2 each attending the words W from every pixel of
the previous feature map (F^att), then residual blocks and one upsampling block. CPGAN adds a
residual path from C0 to C1 and C2 "via up-sampling" (§3.1).

Conventions shared with the discriminators (``model/discriminator.py``):

* word features ``words`` are batch-first ``[B, T, d]``; ``word_mask`` is bool ``[B, T]``,
  True for a real word, False for padding (as ``model/butd.py`` masks regions);
* padded words get an attention score of -inf, hence a weight of exactly zero, and their
  features are zeroed before use, so whatever values padding holds cannot change an output;
* every caption needs at least one real word (a softmax over nothing is undefined);
* images are in [-1, 1] (tanh heads), ``[B, 3, S, S]``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def truncated_normal(
    shape: tuple[int, ...] | torch.Size,
    threshold: float = 2.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """z ~ N(0, 1) restricted to |z| < threshold by redrawing the entries that fall outside.

    This is BigGAN's truncation trick, which CPGAN uses for its input noise (§4.1). Redrawing
    (rather than clamping) keeps the shape of the Gaussian inside the interval. With a
    ``torch.Generator`` the result is a deterministic function of its seed.
    """
    if not threshold > 0:
        raise ValueError(f"truncation threshold must be positive, got {threshold}")
    if generator is not None and device is None:
        device = generator.device
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    outside = z.abs() >= threshold
    while bool(outside.any()):
        count = int(outside.sum())
        z[outside] = torch.randn(count, generator=generator, device=z.device, dtype=dtype)
        outside = z.abs() >= threshold
    return z


def init_gan_weights(module: nn.Module) -> None:
    """AttnGAN's ``weights_init``: orthogonal convs and linears, BN weight ~ N(1, 0.02).

    Used by both the generator and the discriminators; apply with ``model.apply(...)``.
    """
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.orthogonal_(module.weight, 1.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class GLU(nn.Module):
    """Gated linear unit over channels: first half * sigmoid(second half), as AttnGAN."""

    def forward(self, x: Tensor) -> Tensor:
        return F.glu(x, dim=1)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """Bias-free 3x3 convolution keeping the spatial size (every conv here is followed by BN)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)


def up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """AttnGAN's upBlock: nearest x2, conv3x3 to twice the width, BN, GLU back to the width."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        conv3x3(in_channels, out_channels * 2),
        nn.BatchNorm2d(out_channels * 2),
        GLU(),
    )


class ResBlock(nn.Module):
    """AttnGAN's residual block: conv-BN-GLU-conv-BN plus the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            conv3x3(channels, channels * 2),
            nn.BatchNorm2d(channels * 2),
            GLU(),
            conv3x3(channels, channels),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def check_words(words: Tensor, word_mask: Tensor) -> None:
    """Reject word tensors that would broadcast silently and captions without any real word."""
    if words.dim() != 3:
        raise ValueError(f"words must be [B, T, d], got shape {tuple(words.shape)}")
    if word_mask.dtype != torch.bool or word_mask.shape != words.shape[:2]:
        raise ValueError(
            f"word_mask must be bool [B, T] = {tuple(words.shape[:2])}, "
            f"got {word_mask.dtype} {tuple(word_mask.shape)}"
        )
    if not bool(word_mask.any(dim=1).all()):
        raise ValueError("every caption needs at least one real word (word_mask row all False)")


def attend_words(queries: Tensor, words: Tensor, word_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Dot-product attention of every query over the real words of its caption.

    ``queries`` [B, Q, c], ``words`` [B, T, c] -> (sum_k a_k w_k [B, Q, c], weights [B, Q, T]).
    Shared by F^att (Eq. 13) and the Fine-grained Conditional Discriminator (Eq. 11), which
    differ only in what the queries and the word vectors are.
    """
    words = words.masked_fill(~word_mask.unsqueeze(-1), 0.0)
    scores = torch.bmm(queries, words.transpose(1, 2))
    scores = scores.masked_fill(~word_mask.unsqueeze(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.bmm(weights, words), weights


class WordAttention(nn.Module):
    """F^att (Eq. 12-13): for every pixel of C, a softmax over words of C^T (M_p w_t).

    M_p is a bias-free linear map d -> d_hat (AttnGAN's 1x1 ``conv_context``). Returns
    H = sum_k b_k w_hat_k as a feature map [B, d_hat, N, N] and the attention maps
    [B, T, N, N] (zero on padded words, summing to one over real words at every pixel).
    """

    def __init__(self, feature_dim: int, text_dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(text_dim, feature_dim, bias=False)  # M_p

    def forward(self, features: Tensor, words: Tensor, word_mask: Tensor) -> tuple[Tensor, Tensor]:
        check_words(words, word_mask)
        batch, channels, height, width = features.shape
        queries = features.flatten(2).transpose(1, 2)  # [B, N*N, d_hat]
        context, weights = attend_words(queries, self.project(words), word_mask)
        context = context.transpose(1, 2).reshape(batch, channels, height, width)
        attention = weights.transpose(1, 2).reshape(batch, -1, height, width)
        return context, attention


class ConditioningAugmentation(nn.Module):
    """StackGAN/AttnGAN conditioning augmentation: c ~ N(mu(s), diag(exp(logvar(s)))).

    FC d -> 4 * condition_dim, GLU to 2 * condition_dim, split into mu and logvar; then
    c = mu + exp(logvar / 2) * eps. Sampling is the default in every mode, as in AttnGAN and
    the authors' released inference code, so that evaluation scores match theirs;
    ``sample=False`` returns c = mu for deterministic visualisations.
    """

    def __init__(self, text_dim: int, condition_dim: int) -> None:
        super().__init__()
        self.condition_dim = condition_dim
        self.fc = nn.Linear(text_dim, condition_dim * 4)
        self.glu = GLU()

    def forward(self, sentence: Tensor, sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """(c, mu, logvar), each [B, condition_dim]; eps comes from the global torch RNG."""
        hidden = self.glu(self.fc(sentence))
        mu, logvar = hidden[:, : self.condition_dim], hidden[:, self.condition_dim :]
        if not sample:
            return mu, mu, logvar
        eps = torch.randn_like(mu)
        return mu + torch.exp(0.5 * logvar) * eps, mu, logvar


def upsample_count(base_size: int) -> int:
    """Number of x2 up blocks from the 4x4 FC map to C0: log2(base_size / 4).

    Four for the paper's 64-pixel first stage (AttnGAN), two for the toy's 16 pixels.
    """
    if base_size < 8 or base_size & (base_size - 1):
        raise ValueError(f"base_size must be a power of two >= 8, got {base_size}")
    return int(math.log2(base_size)) - 2


class InitialStage(nn.Module):
    """G0 (§6.1, Fig. 9a): FC on [c; z] -> reshape to 4x4 -> up blocks -> C0 [B, gf, S0, S0].

    The 4x4 map has gf * 2^k channels for k up blocks and each block halves the width, so C0
    always has gf_dim channels; for the paper (k = 4) this is AttnGAN's gf * 16.
    """

    def __init__(self, z_dim: int, condition_dim: int, gf_dim: int, base_size: int) -> None:
        super().__init__()
        blocks = upsample_count(base_size)
        self.width = gf_dim * 2**blocks
        self.fc = nn.Sequential(
            nn.Linear(z_dim + condition_dim, self.width * 4 * 4 * 2, bias=False),
            nn.BatchNorm1d(self.width * 4 * 4 * 2),
            GLU(),
        )
        self.upsample = nn.Sequential(
            *[up_block(self.width // 2**i, self.width // 2 ** (i + 1)) for i in range(blocks)]
        )

    def forward(self, z: Tensor, condition: Tensor) -> Tensor:
        code = self.fc(torch.cat([condition, z], dim=1))
        return self.upsample(code.view(-1, self.width, 4, 4))


class NextStage(nn.Module):
    """G1 / G2 (§6.1, Fig. 9b): F^att(W, C_{i-1}) -> [C; H] -> r_num ResBlocks -> up block."""

    def __init__(self, gf_dim: int, text_dim: int, r_num: int) -> None:
        super().__init__()
        self.attention = WordAttention(gf_dim, text_dim)
        self.residual = nn.Sequential(*[ResBlock(gf_dim * 2) for _ in range(r_num)])
        self.upsample = up_block(gf_dim * 2, gf_dim)

    def forward(
        self, features: Tensor, words: Tensor, word_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        context, attention = self.attention(features, words, word_mask)
        out = self.upsample(self.residual(torch.cat([features, context], dim=1)))
        return out, attention


class ImageHead(nn.Module):
    """AttnGAN's GET_IMAGE_G: conv3x3 to RGB and tanh, so images lie in [-1, 1]."""

    def __init__(self, gf_dim: int) -> None:
        super().__init__()
        self.conv = conv3x3(gf_dim, 3)

    def forward(self, features: Tensor) -> Tensor:
        return torch.tanh(self.conv(features))


class GeneratorOutput(NamedTuple):
    """Images [I0, I1, I2] of sizes base * 2^i, F^att maps of G1 and G2, and the CA moments."""

    images: list[Tensor]  # [B, 3, base * 2^i, base * 2^i]
    attention: list[Tensor]  # [B, T, base * 2^(i-1), ...] for i >= 1
    mu: Tensor
    logvar: Tensor


class Generator(nn.Module):
    """The three cascaded generators of Eq. 2 with CPGAN's residual path from C0.

    Residual path (§3.1 "extra residual connection from C0 to C1 and C2 via up-sampling"):
    as in the authors' released inference code (``G_NET``), one up block R (gf -> gf) maps
    C0 to the size of C1 and is applied again to its own output for C2, so R_i = R^i(C0);
    then C_i = conv3x3(G_i(...) + R_i), the 3x3 conv being shared by the stages too. Every
    C_i has gf_dim channels, so no channel projection is needed on the path.
    """

    def __init__(
        self,
        text_dim: int,
        z_dim: int,
        condition_dim: int,
        gf_dim: int,
        base_size: int,
        stages: int = 3,
        r_num: int = 3,
        condition_augmentation: bool = True,
    ) -> None:
        super().__init__()
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        self.z_dim, self.base_size, self.stages = z_dim, base_size, stages
        self.condition_augmentation = condition_augmentation
        self.condition = ConditioningAugmentation(text_dim, condition_dim)
        self.initial = InitialStage(z_dim, condition_dim, gf_dim, base_size)
        self.next_stages = nn.ModuleList(
            [NextStage(gf_dim, text_dim, r_num) for _ in range(stages - 1)]
        )
        self.heads = nn.ModuleList([ImageHead(gf_dim) for _ in range(stages)])
        self.residual_up = up_block(gf_dim, gf_dim)
        self.fuse = conv3x3(gf_dim, gf_dim)
        self.apply(init_gan_weights)

    def image_sizes(self) -> list[int]:
        """Side of the image produced by each stage: base_size * 2^i."""
        return [self.base_size * 2**i for i in range(self.stages)]

    def forward(
        self,
        z: Tensor,
        sentence: Tensor,
        words: Tensor,
        word_mask: Tensor,
        sample_condition: bool = True,
    ) -> GeneratorOutput:
        """``z`` [B, z_dim], ``sentence`` [B, d], ``words`` [B, T, d], ``word_mask`` [B, T].

        A generator built with ``condition_augmentation=False`` always takes c = mu(s): it was
        trained so, and its logvar was never fitted.
        """
        if z.shape != (sentence.shape[0], self.z_dim):
            raise ValueError(f"z must be [B, {self.z_dim}], got {tuple(z.shape)}")
        sample = sample_condition and self.condition_augmentation
        condition, mu, logvar = self.condition(sentence, sample=sample)
        features = self.initial(z, condition)
        images = [self.heads[0](features)]
        attention_maps = []
        shortcut = features
        for stage, head in zip(self.next_stages, self.heads[1:]):
            shortcut = self.residual_up(shortcut)
            out, attention = stage(features, words, word_mask)
            features = self.fuse(out + shortcut)
            images.append(head(features))
            attention_maps.append(attention)
        return GeneratorOutput(images, attention_maps, mu, logvar)
