"""Adversarial hinge losses of Eq. 3-5 and the conditioning-augmentation KL term.

Every function takes raw discriminator logits (one per image, [B]) and returns a scalar
tensor; expectations are batch means. The weights are the paper's: 1/2 on the generator's two
terms (Eq. 4), and on the discriminator's real terms, 1/3 on each of its three "negative" terms
(fake with D^uc, fake with D^c, real image with a mismatched caption X-bar; Eq. 5).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def generator_adversarial_loss(d_uc_fake: Tensor, d_c_fake: Tensor) -> Tensor:
    """L_{G_i} of Eq. 4: -1/2 E[D^uc(I~)] - 1/2 E[D^c(I~, X)] for one stage."""
    return -0.5 * d_uc_fake.mean() - 0.5 * d_c_fake.mean()


def generator_adversarial_loss_over_stages(
    d_uc_fakes: Sequence[Tensor], d_c_fakes: Sequence[Tensor]
) -> tuple[Tensor, list[Tensor]]:
    """L_G of Eq. 3: the sum over stages of Eq. 4; also returns the per-stage terms for logging."""
    if len(d_uc_fakes) != len(d_c_fakes) or not d_uc_fakes:
        raise ValueError(
            f"need one D^uc and one D^c logit tensor per stage, "
            f"got {len(d_uc_fakes)} and {len(d_c_fakes)}"
        )
    per_stage = [generator_adversarial_loss(u, c) for u, c in zip(d_uc_fakes, d_c_fakes)]
    return torch.stack(per_stage).sum(), per_stage


def discriminator_loss(
    d_uc_real: Tensor,
    d_uc_fake: Tensor,
    d_c_real: Tensor,
    d_c_fake: Tensor,
    d_c_mismatch: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_{D_i} of Eq. 5 for one stage, and its five weighted terms by name.

    ``d_c_mismatch`` is D^c(I, X-bar): the real image scored against another sample's caption.
    """
    parts = {
        "uc_real": 0.5 * F.relu(1.0 - d_uc_real).mean(),
        "uc_fake": F.relu(1.0 + d_uc_fake).mean() / 3.0,
        "c_real": 0.5 * F.relu(1.0 - d_c_real).mean(),
        "c_fake": F.relu(1.0 + d_c_fake).mean() / 3.0,
        "c_mismatch": F.relu(1.0 + d_c_mismatch).mean() / 3.0,
    }
    return torch.stack(list(parts.values())).sum(), parts


def kl_loss(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) averaged over batch and dimensions (AttnGAN KL_loss).

    Regularises conditioning augmentation so that c stays a smooth function of the sentence.
    """
    return torch.mean(-0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()))
