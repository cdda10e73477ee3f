"""Tests of the hinge losses (Eq. 3-5) on hand-set logits, the CA KL term, and one D step and
one G step of the toy-sized networks on a fixed batch (with and without the FGCD)."""
from __future__ import annotations

import pytest
import torch

from cpgan.model.discriminator import Discriminators
from cpgan.model.gan_losses import (
    discriminator_loss,
    generator_adversarial_loss,
    generator_adversarial_loss_over_stages,
    kl_loss,
)
from cpgan.model.generator import Generator, truncated_normal

TEXT, Z, COND, GF, DF, BASE, T, B = 16, 8, 6, 8, 8, 16, 6, 2


def test_generator_loss_matches_eq4_by_hand() -> None:
    uc = torch.tensor([1.0, -2.0, 3.0])  # mean 2/3
    c = torch.tensor([0.5, 0.5, -1.0])  # mean 0
    assert generator_adversarial_loss(uc, c).item() == pytest.approx(-1.0 / 3.0)
    total, per_stage = generator_adversarial_loss_over_stages([uc, -uc], [c, c + 2.0])
    # Stage 2: -1/2 * (-2/3) - 1/2 * 2 = 1/3 - 1 = -2/3; Eq. 3 sums the stages.
    assert per_stage[1].item() == pytest.approx(-2.0 / 3.0)
    assert total.item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="one D\\^uc and one D\\^c"):
        generator_adversarial_loss_over_stages([uc], [])


def test_discriminator_loss_matches_eq5_by_hand() -> None:
    loss, parts = discriminator_loss(
        d_uc_real=torch.tensor([2.0, 0.5, -1.0]),  # max(0, 1 - x): 0, 0.5, 2  -> mean 5/6
        d_uc_fake=torch.tensor([-2.0, 0.0, 1.0]),  # max(0, 1 + x): 0, 1, 2    -> mean 1
        d_c_real=torch.tensor([1.5, 0.0]),  # max(0, 1 - x): 0, 1               -> mean 1/2
        d_c_fake=torch.tensor([-0.5, -3.0]),  # max(0, 1 + x): 0.5, 0          -> mean 1/4
        d_c_mismatch=torch.tensor([0.25, -1.0]),  # max(0, 1 + x): 1.25, 0     -> mean 5/8
    )
    expected = {
        "uc_real": 0.5 * 5 / 6,
        "uc_fake": 1.0 / 3,
        "c_real": 0.5 * 0.5,
        "c_fake": 0.25 / 3,
        "c_mismatch": 0.625 / 3,  # the mismatched pair is weighted 1/3, like the fakes
    }
    assert parts.keys() == expected.keys()
    for name, value in expected.items():
        assert parts[name].item() == pytest.approx(value), name
    assert loss.item() == pytest.approx(sum(expected.values()))
    assert loss.item() == pytest.approx(1.2916666666666667)


def test_kl_loss() -> None:
    assert kl_loss(torch.zeros(4, 5), torch.zeros(4, 5)).item() == 0.0
    # mu = 1, logvar = 0: -0.5 * (1 + 0 - 1 - 1) = 0.5 per element.
    assert kl_loss(torch.ones(4, 5), torch.zeros(4, 5)).item() == pytest.approx(0.5)
    # mu = 0, logvar = log 4: -0.5 * (1 + log 4 - 4) > 0.
    logvar = torch.full((2, 3), float(torch.log(torch.tensor(4.0))))
    expected = -0.5 * (1 + logvar[0, 0].item() - 4.0)
    assert kl_loss(torch.zeros(2, 3), logvar).item() == pytest.approx(expected)


def _networks(fgcd: bool) -> tuple[Generator, Discriminators]:
    torch.manual_seed(0)
    gen = Generator(TEXT, Z, COND, GF, BASE, stages=3, r_num=1)
    disc = Discriminators(3, DF, BASE, TEXT, 4, fgcd=fgcd)
    return gen, disc


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "z": truncated_normal((B, Z), generator=g),
        "sentence": torch.randn(B, TEXT, generator=g),
        "words": torch.randn(B, T, TEXT, generator=g),
        "mask": torch.tensor([[True] * 6, [True] * 4 + [False] * 2]),
        "real": [torch.rand(B, 3, s, s, generator=g) * 2 - 1 for s in (16, 32, 64)],
    }


def _d_loss(disc: Discriminators, fakes: list[torch.Tensor], batch: dict) -> torch.Tensor:
    """Eq. 5 summed over stages; the mismatched caption X-bar is the other sample's."""
    words, sentence, mask = batch["words"], batch["sentence"], batch["mask"]
    wrong = [x.roll(1, dims=0) for x in (words, sentence, mask)]
    total = torch.zeros(())
    for d, real, fake in zip(disc.stages, batch["real"], fakes):
        real_enc, fake_enc = d.encode(real), d.encode(fake)
        loss, _ = discriminator_loss(
            d.unconditional_logits(real_enc),
            d.unconditional_logits(fake_enc),
            d.conditional_logits(real_enc, words, sentence, mask).logits,
            d.conditional_logits(fake_enc, words, sentence, mask).logits,
            d.conditional_logits(real_enc, *wrong).logits,
        )
        total = total + loss
    return total


@pytest.mark.parametrize("fgcd", [True, False])
def test_one_discriminator_step_lowers_its_loss(fgcd: bool) -> None:
    gen, disc = _networks(fgcd)
    batch = _batch()
    with torch.no_grad():
        fakes = gen(batch["z"], batch["sentence"], batch["words"], batch["mask"]).images
    before_params = [p.detach().clone() for p in disc.parameters()]
    optimizer = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    loss = _d_loss(disc, fakes, batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = _d_loss(disc, fakes, batch)
    assert after.item() < loss.item()
    changed = [not torch.equal(a, p) for a, p in zip(before_params, disc.parameters())]
    assert all(changed)


@pytest.mark.parametrize("fgcd", [True, False])
def test_one_generator_step_changes_every_generator_parameter(fgcd: bool) -> None:
    gen, disc = _networks(fgcd)
    batch = _batch()
    out = gen(batch["z"], batch["sentence"], batch["words"], batch["mask"])
    logits = disc(out.images, batch["words"], batch["sentence"], batch["mask"])
    adversarial, per_stage = generator_adversarial_loss_over_stages(
        [s.unconditional for s in logits], [s.conditional for s in logits]
    )
    assert len(per_stage) == 3
    loss = adversarial + kl_loss(out.mu, out.logvar)
    before_g = [p.detach().clone() for p in gen.parameters()]
    before_d = [p.detach().clone() for p in disc.parameters()]
    optimizer = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before_g, gen.parameters()))
    assert all(torch.equal(b, p) for b, p in zip(before_d, disc.parameters()))
