"""What can TISCL alone teach? Pixels optimised against it, scored by SOA. Not a test.

A diagnostic for issue 7. The toy GAN's images get nearly everything they show from TISCL
(Eq. 6, RESULTS.md session 13), and they are blobs in the caption's colours and places. This
asks whether the encoders' gradient could draw more: for val captions it starts from noise,
optimises each image's pixels directly (Adam on an unbounded tensor mapped through tanh) to
lower TISCL under the given DAMSM encoders, in batches as the GAN sees them, and then runs the
evaluation's detector on the result. If the optimised images score a SOA-C far below the real
images', a generator trained through these encoders is taught pixels that satisfy them, not
objects. Encoders pretrained with ``encoder.adversarial_epsilon`` > 0 are the comparison.

    .venv/bin/python bench/tiscl_pixels.py --artifacts artifacts \
        [--encoders artifacts/models/damsm.pt] [--config overlay.toml] [--images 128] \
        [--steps 100] [--grid pixels.png]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cpgan import layout
from cpgan.cli.common import PROJECT_ROOT, TOY_DIRNAME
from cpgan.config import load_config
from cpgan.errors import CpganError
from cpgan.model.darknet import for_cpu_inference
from cpgan.model.metrics import caption_categories, detected_categories, soa_scores
from cpgan.pipeline.categories import category_words
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.report import draw_mosaic
from cpgan.pipeline.text import Vocabulary
from cpgan.trainer import gan
from cpgan.trainer.damsm import load_pretrained_encoders
from cpgan.trainer.data import TextImageDataset, batches, make_loader
from cpgan.trainer.evaluate import load_soa_detector
from cpgan.trainer.sampling import to_uint8

GRID_COLUMNS = 8


def optimise(encoder, images: torch.Tensor, text: gan.TextFeatures, config, steps: int,
             lr: float) -> tuple[torch.Tensor, float, float]:
    """Images of the same shape as ``images``, from noise, with TISCL lowered; TISCL at the
    start and at the end."""
    x = (0.1 * torch.randn_like(images)).requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=lr)
    first = last = float("nan")
    for step in range(steps):
        loss = gan.tiscl_loss(encoder, torch.tanh(x), text, config)
        first = loss.item() if step == 0 else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        last = loss.item()
    return torch.tanh(x).detach(), first, last


def write_grid(path: Path, real: torch.Tensor, optimised: torch.Tensor,
               captions: list[str]) -> None:
    """The first GRID_COLUMNS real images with their captions, their optimised images below."""
    count = min(GRID_COLUMNS, len(real))
    tiles = to_uint8(torch.cat([real[:count], optimised[:count]]))
    draw_mosaic(tiles, count, path, captions=captions[:count] + ["optimised"] * count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, default=PROJECT_ROOT / "artifacts")
    parser.add_argument("--encoders", type=Path, default=None,
                        help="DAMSM file (default: <artifacts>/models/damsm.pt)")
    parser.add_argument("--config", type=Path, default=None, help="overlay on the toy preset")
    parser.add_argument("--images", type=int, default=128, help="val images")
    parser.add_argument("--batch-size", type=int, default=16, help="the toy GAN's batch")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, default=None,
                        help="PNG: real images with their captions above their optimised counterparts")
    args = parser.parse_args()
    root = args.artifacts
    try:
        config = load_config("toy", args.config)
        vocab = Vocabulary.load(root / layout.VOCAB_NAME)
        split = CocoSplit.open(root / TOY_DIRNAME, "val2014", require_instances=True)
        detector, category_ids = load_soa_detector(PROJECT_ROOT / config.detector.cfg,
                                                   root / "models" / layout.DETECTOR_NAME, split)
        text_encoder, image_encoder = load_pretrained_encoders(
            args.encoders or layout.damsm_path(root / "models", True, True), vocab, config,
            root / layout.MEMORY_NAME, detector, None, "cpu")
    except (CpganError, OSError) as exc:
        sys.exit(f"tiscl_pixels: {exc}")
    soa_detector = for_cpu_inference(copy.deepcopy(detector))
    words = category_words(split)
    torch.manual_seed(args.seed)
    dataset = TextImageDataset(split, vocab, config.data.max_caption_words,
                               [config.encoder.image_size], augment=False, seed=args.seed,
                               limit=args.images)
    loader = make_loader(dataset, args.batch_size, shuffle=False, num_workers=0)
    found: dict[str, list[set[int]]] = {"optimised": [], "real": []}
    expected, starts, ends, grid = [], [], [], None
    began = time.perf_counter()
    for batch in batches(loader, {}):
        encoded = gan.encode_text(text_encoder, batch.captions, batch.lengths)
        real = batch.images[-1]
        images, first, last = optimise(image_encoder, real, encoded, config, args.steps, args.lr)
        starts.append(first)
        ends.append(last)
        texts = [dict(split.captions(image_id))[caption_id] for image_id, caption_id
                 in zip(batch.image_ids.tolist(), batch.caption_ids.tolist())]
        expected += [caption_categories(text, words) for text in texts]
        found["optimised"] += detected_categories(soa_detector, images, category_ids)
        found["real"] += detected_categories(soa_detector, real, category_ids)
        grid = grid or (real, images, texts)
        print(f"{len(expected)} images, {time.perf_counter() - began:.0f} s", file=sys.stderr)
    print(f"{args.encoders or 'models/damsm.pt'}: {len(expected)} val captions, {args.steps} "
          f"Adam steps at lr {args.lr}; TISCL {np.mean(starts):.3f} -> {np.mean(ends):.3f}")
    for name, detected in found.items():
        soa_c, soa_i = soa_scores(detected, expected)
        print(f"  {name:9s} SOA-C {soa_c:.3f}  SOA-I {soa_i:.3f}")
    if args.grid and grid is not None:
        write_grid(args.grid, *grid)


if __name__ == "__main__":
    main()
