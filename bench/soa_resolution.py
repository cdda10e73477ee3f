"""How sharp must a shape be for the toy detector to name it? Not a test.

Issue 7 asks for SOA-C >= 0.5 on the toy GAN's 64-pixel images; they show the caption's
background and blobs in the objects' colours, with SOA-C 0.1-0.2. This scores SOA-C and SOA-I
(model/metrics.py, the evaluation's detector threshold) on the *real* val images, first as the
evaluation sees them (area-resized to 64 px), then degraded: area-downsampled to 48 / 32 / 24 /
16 / 12 / 8 px and resized back to 64 px (bilinear), and Gaussian-blurred at 64 px (sigma 1-4
px; at 4 the objects are blobs of their colour where they were). Each image's
expected classes are those its first caption names (cpgan-eval draws one caption per image
with the seed instead, so the first row is close to, not equal to, the report's *real*
SOA-C). The question it answers: at what resolution must a generator get the shapes right
before the detector sees them?

    .venv/bin/python bench/soa_resolution.py --artifacts A [--images 500]

with A an artifacts root after ``make demo`` (toy-coco/, models/detector.pt). Two threads,
about a minute for 500 images. Prints one line per degradation.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from cpgan.config import load_config
from cpgan.model.metrics import caption_categories, detected_categories, soa_scores
from cpgan.pipeline.categories import category_words
from cpgan.pipeline.coco import CocoSplit
from cpgan.trainer.classifier import resize_image, to_unit_range
from cpgan.trainer.evaluate import load_soa_detector

SIZE = 64
BATCH = 50


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, radius 3 sigma, edges replicated."""
    radius = int(3 * sigma)
    taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2)
                     / (2 * sigma ** 2))
    taps = (taps / taps.sum()).repeat(3, 1, 1, 1)
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    rows = F.conv2d(padded, taps.view(3, 1, 1, -1), groups=3)
    return F.conv2d(rows, taps.view(3, 1, -1, 1), groups=3)


def through(side: int):
    """Area-downsample to ``side`` px and back to SIZE (bilinear)."""
    def degrade(images: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(images, size=(side, side), mode="area")
        return F.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return degrade


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = load_config("toy")
    split = CocoSplit.open(args.artifacts / "toy-coco", "val2014", require_instances=True)
    detector, category_ids = load_soa_detector(
        Path(__file__).resolve().parent.parent / config.detector.cfg,
        args.artifacts / "models" / "detector.pt", split)
    words = category_words(split)
    images, expected = [], []
    for image_id in split.captioned_image_ids()[:args.images]:
        caption = split.captions(image_id)[0][1]
        named = caption_categories(caption, words)
        if named:
            images.append(resize_image(split.load_image(image_id), SIZE))
            expected.append(named)
    real = to_unit_range(torch.stack(images))
    rows = [("64 px (as evaluated)", lambda x: x)]
    rows += [(f"{side} px, back to 64", through(side)) for side in (48, 32, 24, 16, 12, 8)]
    rows += [(f"Gaussian blur sigma {s} px", lambda x, s=s: gaussian_blur(x, s))
             for s in (1.0, 2.0, 3.0, 4.0)]
    print(f"{len(images)} val images whose caption names a class, {args.artifacts}")
    for name, degrade in rows:
        found = []
        with torch.no_grad():
            for start in range(0, len(real), BATCH):
                found += detected_categories(detector, degrade(real[start:start + BATCH]),
                                             category_ids)
        soa_c, soa_i = soa_scores(found, expected)
        print(f"{name:28s} SOA-C {soa_c:.3f}  SOA-I {soa_i:.3f}", flush=True)


if __name__ == "__main__":
    main()
