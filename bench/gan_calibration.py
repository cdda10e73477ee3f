"""How many steps does a plain GAN need to draw toy shapes? Not a test.

Issue 7 asks the toy GAN for SOA-C >= 0.5 within its budget (750 steps of batch 16 when this was
written; 1,500 since session 20), and every recipe tried
(RESULTS.md) draws blobs in the caption's colours. This answers a question that is not about
CPGAN at all: how fast does a plain, unconditional DCGAN learn to draw the toy set's shapes?
It is the control for what the budget allows any GAN.

The model is DCGAN's (Radford et al., 2016) with a spectral-norm discriminator and the hinge
loss: G maps z (64-d) through an FC layer to a 4 x 4 map and nearest x2 / conv3x3 / BN / ReLU
blocks up to ``--size`` pixels (width ``--width`` * 2^k, halving per block), D mirrors it with
stride-2 4x4 convolutions and LeakyReLU. Adam 2e-4, betas 0.5 / 0.999, one D step per G step,
train images area-resized to ``--size`` and flipped at random. Every ``--eval-every`` steps
it scores ``--images`` images of the (unaveraged) generator with the toy detector (the
evaluation's, at SOA's objectness threshold), enlarged to 64 px like the evaluation's stage
images, against as many val images at ``--size`` and back:

* FID with the toy classifier's features (the evaluation's, so comparable with a report's
  FID at the same ``--images``, 1000 in ``cpgan-eval``);
* objects per image: detected classes per image, counted once each;
* class TV: the total variation distance between the two class histograms (each class's share
  of all detections). The toy set names its eight classes about equally; blobs come out as
  circles and hexagons, so a generator that draws shapes brings this towards the real images'
  0 and one that draws blobs does not.

and writes ``OUT/step-N.png`` (32 samples). Run on an artifacts root after ``make demo``:

    .venv/bin/python bench/gan_calibration.py --artifacts A --out /tmp/cal --size 64 \\
        --steps 3000 --batch-size 32 --eval-every 1000
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from cpgan.config import load_config
from cpgan.model.metrics import detected_categories, fid
from cpgan.pipeline.coco import CocoSplit, iter_images
from cpgan.trainer.classifier import resize_image, to_unit_range
from cpgan.trainer.evaluate import Scoring, load_scoring, load_soa_detector
from cpgan.trainer.sampling import enlarge, to_uint8

Z_DIM = 64
EVAL_SIZE = 64
BATCH = 50


class DcganGenerator(nn.Module):
    """z -> FC -> 4x4 -> (nearest x2, conv3x3, BN, ReLU) per doubling -> conv3x3 -> tanh."""

    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        blocks = int(math.log2(size)) - 2
        self.channels = width * 2 ** (blocks - 1)
        self.fc = nn.Sequential(nn.Linear(Z_DIM, self.channels * 16),
                                nn.BatchNorm1d(self.channels * 16), nn.ReLU())
        layers: list[nn.Module] = []
        channels = self.channels
        for _ in range(blocks):
            out = max(channels // 2, width // 2)
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(channels, out, 3, 1, 1),
                       nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        layers += [nn.Conv2d(channels, 3, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.fc(z).view(len(z), self.channels, 4, 4))


class DcganDiscriminator(nn.Module):
    """(spectral-norm conv4x4 stride 2, LeakyReLU 0.2) down to 4x4, then a linear logit."""

    def __init__(self, size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, out = 3, 32
        for _ in range(int(math.log2(size)) - 2):
            layers += [spectral_norm(nn.Conv2d(channels, out, 4, 2, 1)), nn.LeakyReLU(0.2)]
            channels, out = out, min(out * 2, 256)
        self.net = nn.Sequential(*layers)
        self.fc = spectral_norm(nn.Linear(channels * 16, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(self.net(images).flatten(1)).squeeze(1)


def load_images(split: CocoSplit, size: int, limit: int | None = None) -> Tensor:
    """The split's captioned images that decode, area-resized to ``size``, in [-1, 1]; each
    one that does not is named on stderr and left out."""
    images = []
    for image_id, rgb, reason in iter_images(split, split.captioned_image_ids()[:limit]):
        if rgb is None:
            print(f"{split.split} image {image_id} skipped: {reason}", file=sys.stderr)
        else:
            images.append(resize_image(rgb, size))
    return to_unit_range(torch.stack(images))


def class_shares(found: list[set[int]], category_ids: list[int]) -> np.ndarray:
    """Each class's share of all (image, class) detections."""
    counts = np.array([sum(c in f for f in found) for c in category_ids], dtype=np.float64)
    return counts / max(counts.sum(), 1.0)


def scores(detector: nn.Module, scoring: Scoring, images: Tensor,
           category_ids: list[int]) -> tuple[list[set[int]], Tensor]:
    """Detected classes per image and the classifier's FID features, at 64 px."""
    found: list[set[int]] = []
    pools = []
    with torch.no_grad():
        for start in range(0, len(images), BATCH):
            chunk = enlarge(images[start:start + BATCH], EVAL_SIZE)  # as cpgan-eval does
            found += detected_categories(detector, chunk, category_ids)
            pools.append(scoring.score(chunk)[1])
    return found, torch.cat(pools)


def write_grid(path: Path, images: Tensor) -> None:
    """32 images as 4 rows of 8, each enlarged (nearest) to 128 px."""
    tiles = to_uint8(images[:32])  # [N, H, W, 3]
    rows = [np.concatenate(list(tiles[r * 8:(r + 1) * 8]), axis=1) for r in range(4)]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    scale = 128 // images.shape[-1]
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=64, choices=(16, 32, 64))
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    config = load_config("toy")
    coco = args.artifacts / "toy-coco"
    val = CocoSplit.open(coco, "val2014", require_instances=True)
    detector, category_ids = load_soa_detector(
        Path(__file__).resolve().parent.parent / config.detector.cfg,
        args.artifacts / "models" / "detector.pt", val)
    train = load_images(CocoSplit.open(coco, "train2014"), args.size)
    scoring = load_scoring("toy", args.artifacts / "models" / "classifier.pt", None, EVAL_SIZE)
    real_found, real_pool = scores(detector, scoring, load_images(val, args.size, args.images),
                                   category_ids)
    real_shares = class_shares(real_found, category_ids)
    print(f"{len(train)} train images at {args.size} px; real val: "
          f"{np.mean([len(f) for f in real_found]):.2f} objects per image", flush=True)
    generator, discriminator = DcganGenerator(args.size, args.width), DcganDiscriminator(args.size)
    optimizer_g = torch.optim.Adam(generator.parameters(), 2e-4, betas=(0.5, 0.999))
    optimizer_d = torch.optim.Adam(discriminator.parameters(), 2e-4, betas=(0.5, 0.999))
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        real = train[torch.randint(len(train), (args.batch_size,))]
        flip = torch.rand(args.batch_size, 1, 1, 1) < 0.5
        real = torch.where(flip, real.flip(3), real)
        fake = generator(torch.randn(args.batch_size, Z_DIM))
        loss_d = (F.relu(1 - discriminator(real)).mean()
                  + F.relu(1 + discriminator(fake.detach())).mean())
        optimizer_d.zero_grad()
        loss_d.backward()
        optimizer_d.step()
        loss_g = -discriminator(fake).mean()
        optimizer_g.zero_grad()
        loss_g.backward()
        optimizer_g.step()
        if step % args.eval_every == 0 or step == args.steps:
            generator.eval()
            with torch.no_grad():
                images = torch.cat([generator(torch.randn(BATCH, Z_DIM))
                                    for _ in range(math.ceil(args.images / BATCH))])
            generator.train()
            found, pool = scores(detector, scoring, images[:args.images], category_ids)
            shares = class_shares(found, category_ids)
            tv = 0.5 * np.abs(shares - real_shares).sum()
            names = val.categories()
            top = sorted(zip(shares, (names[c] for c in category_ids)), reverse=True)[:2]
            write_grid(args.out / f"step-{step}.png", images)
            print(f"step {step}: loss_d {loss_d.item():.3f}, {time.perf_counter() - start:.0f} s; "
                  f"FID {fid(pool, real_pool):.1f}, objects per image "
                  f"{np.mean([len(f) for f in found]):.2f}, class TV {tv:.3f} "
                  f"(most detected: {', '.join(f'{n} {s:.2f}' for s, n in top)})", flush=True)


if __name__ == "__main__":
    main()
