"""How fast does the toy GAN learn its 16-pixel first stage alone, without TISCL? Not a test.

A diagnostic for issue 7: the demo's GAN images are colour blobs after 375 steps, and even
its first stage does not draw the caption's background (sand, snow, grass). This trains the
toy preset's generator with one stage (16 px) against its discriminators with the trainer's
own Eq. 5 objective and the adversarial part of Eq. 3-4 plus the CA KL term (no TISCL), on
train images preloaded at 16 px with one fixed caption each, and scores the EMA generator
every third of the run on 256 val captions by the mean absolute error of the 4 x 4 grid of
average colours against the real image of the same caption (the background decides most
of it). Reference: the error of the mean real image. Variants:

* ``base``: the toy preset of 4df5d23 (Adam lr 5e-4 for both, batch 32, betas 0.5 / 0.999,
  BN in D);
* ``ttur``: Adam lr 1e-4 for G and 4e-4 for D, betas 0 / 0.9;
* ``sn-d``: ``ttur`` with D's BN removed and spectral norm on its convolutions and FCs;
* ``lr-1e-3``: lr 1e-3 for both;
* ``g-lr-4x``: lr 2e-3 for G, 5e-4 for D;
* ``dcgan-g``: a control, a plain DCGAN generator (FC, two stride-2 transposed convolutions
  with BN and ReLU, conv + tanh) on the same [z; c] in place of G0, to tell the generator's
  architecture from the rest.

    .venv/bin/python bench/gan_first_stage.py --artifacts artifacts --variant base --steps 375

Prints one line per score and writes ``--out`` (default ``gan-first-stage-<variant>.png``):
eight generated images over the real ones.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cpgan.config import load_config
from cpgan.model.discriminator import spectral_norm_without_batch_norm
from cpgan.model.gan_losses import generator_adversarial_loss_over_stages, kl_loss
from cpgan.model.generator import ConditioningAugmentation, GeneratorOutput
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.text import Vocabulary
from cpgan.trainer import gan
from cpgan.trainer.data import TextImageDataset, collate
from cpgan.trainer.sampling import load_text_encoder, to_uint8

VARIANTS = ("base", "ttur", "sn-d", "lr-1e-3", "g-lr-4x", "dcgan-g")
SIZE, GRID, VAL_IMAGES = 16, 4, 256


def preload(root: Path, split: str, vocab: Vocabulary, text, limit: int):
    dataset = TextImageDataset(CocoSplit.open(root / "toy-coco", split), vocab, 18, [SIZE],
                               augment=False, limit=limit)
    batch = collate([dataset[i] for i in range(len(dataset))])
    return batch.images[0], gan.encode_text(text, batch.captions, batch.lengths)


class DcganGenerator(torch.nn.Module):
    """The ``dcgan-g`` control: DCGAN's generator on [c; z], CA kept, G0's output contract."""

    def __init__(self, text_dim: int, z_dim: int, condition_dim: int) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.condition = ConditioningAugmentation(text_dim, condition_dim)
        self.fc = torch.nn.Sequential(torch.nn.Linear(z_dim + condition_dim, 128 * 16),
                                      torch.nn.BatchNorm1d(128 * 16), torch.nn.ReLU())
        self.net = torch.nn.Sequential(
            torch.nn.ConvTranspose2d(128, 64, 4, 2, 1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
            torch.nn.ConvTranspose2d(64, 32, 4, 2, 1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 3, 3, 1, 1), torch.nn.Tanh())

    def forward(self, z, sentence, words, mask, sample_condition=True) -> GeneratorOutput:
        condition, mu, logvar = self.condition(sentence, sample=sample_condition)
        code = self.fc(torch.cat([condition, z], dim=1)).view(-1, 128, 4, 4)
        return GeneratorOutput([self.net(code)], [], mu, logvar)


def apply_variant(state: gan.GanState, variant: str, config) -> None:
    if variant == "dcgan-g":
        state.generator = DcganGenerator(config.encoder.text_dim, config.gan.z_dim,
                                         config.gan.condition_dim)
        state.generator_ema = copy.deepcopy(state.generator).requires_grad_(False)
        state.g_model = state.generator
        state.optimizer_g = torch.optim.Adam(state.generator.parameters(), config.gan.lr_g,
                                             betas=(config.gan.beta1, config.gan.beta2))
    elif variant == "g-lr-4x":
        for group in state.optimizer_g.param_groups:
            group["lr"] = 2e-3
    if variant == "sn-d":
        spectral_norm_without_batch_norm(state.discriminators)
        state.d_model = gan.DiscriminatorObjective(state.discriminators)
    if variant in ("ttur", "sn-d"):
        state.optimizer_g = torch.optim.Adam(state.generator.parameters(), 1e-4, betas=(0.0, 0.9))
        state.optimizer_d = torch.optim.Adam(state.discriminators.parameters(), 4e-4,
                                             betas=(0.0, 0.9))
    elif variant == "lr-1e-3":
        for optimizer in (state.optimizer_g, state.optimizer_d):
            for group in optimizer.param_groups:
                group["lr"] = 1e-3


def grid_error(images: torch.Tensor, real: torch.Tensor) -> float:
    pool = SIZE // GRID
    return (F.avg_pool2d(images, pool) - F.avg_pool2d(real, pool)).abs().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--variant", choices=VARIANTS, default="base")
    parser.add_argument("--steps", type=int, default=375)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.artifacts
    config = load_config("toy")
    config.gan.stages = 1
    # ``base`` is the toy preset these variants were measured against (4df5d23): one Adam lr
    # of 5e-4 and batch 32. The preset has since taken g-lr-4x's rates and batch 16.
    config.gan.lr_g = config.gan.lr_d = 5e-4
    config.gan.batch_size = 32
    vocab = Vocabulary.load(root / "vocab.json")
    text = load_text_encoder(root / "models" / "damsm.pt", vocab, config, root / "memory.h5")
    images, captions = preload(root, "train2014", vocab, text.eval(), limit=None)
    val_images, val_captions = preload(root, "val2014", vocab, text, limit=VAL_IMAGES)
    state = gan.build_state(config, True, torch.device("cpu"))
    apply_variant(state, args.variant, config)
    batch_size, cpu = config.gan.batch_size, torch.device("cpu")
    draws = torch.Generator().manual_seed(config.seed)
    mean_image = val_images.mean(dim=0, keepdim=True).expand_as(val_images)
    print(f"reference: the mean real image's grid error {grid_error(mean_image, val_images):.3f}")
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(images), (batch_size,), generator=draws)
        batch = gan.TextFeatures(*(t[index] for t in captions))
        torch.manual_seed(step)
        z = gan.sample_noise(batch_size, config, step, cpu)
        state.generator.train(), state.discriminators.train()
        output = state.g_model(z, batch.sentence, batch.words, batch.mask)
        loss_d, _ = gan.discriminator_step(state, [images[index]], output.images, batch)
        state.discriminators.requires_grad_(False)
        logits = state.discriminators(output.images, *batch)
        adversarial, _ = generator_adversarial_loss_over_stages(
            [s.unconditional for s in logits], [s.conditional for s in logits])
        state.optimizer_g.zero_grad()
        (adversarial + kl_loss(output.mu, output.logvar)).backward()
        state.optimizer_g.step()
        state.discriminators.requires_grad_(True)
        state.step += 1
        gan.update_ema(state.generator_ema, state.generator, state.step)
        if step % max(1, args.steps // 3) == 0:
            with torch.no_grad():
                z = gan.sample_noise(len(val_images), config, 7, cpu)
                fake = state.generator_ema.eval()(z, val_captions.sentence, val_captions.words,
                                                  val_captions.mask).images[0]
            print(f"{args.variant} step {step}: loss_d {loss_d:.3f}, G adversarial "
                  f"{adversarial.item():.3f}, grid error {grid_error(fake, val_images):.3f}",
                  flush=True)
    pictures = to_uint8(F.interpolate(torch.cat([fake[:8], val_images[:8]]), size=48))
    rows = [np.concatenate(list(pictures[:8]), 1), np.concatenate(list(pictures[8:]), 1)]
    out = args.out or Path(f"gan-first-stage-{args.variant}.png")
    Image.fromarray(np.concatenate(rows, 0)).save(out)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
