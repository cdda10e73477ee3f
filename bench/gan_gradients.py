"""Who steers the generator: the discriminators or TISCL? A diagnostic for issue 7. Not a test.

Eq. 3 + lambda * Eq. 6 reaches the generator's weights through its images. This script takes a
trained run's checkpoint (generator and discriminators as they were at that step) and one
batch of train (image, caption) pairs, and measures, per generated image, the norm of

* the gradient of the adversarial loss L_G (Eq. 3-4) with respect to each stage's image, and
* the gradient of lambda * TISCL (Eq. 6, the run's lambda) with respect to the last image,

with the generator and discriminators in training mode, as in a step. It also gives the share of
each last-image gradient's energy above half the Nyquist frequency (the generator's
row-and-column stripes are high-frequency; a gradient made of them would be the clue). Adam
normalises the sum of both, so their ratio says how much each can move the generator.

    .venv/bin/python bench/gan_gradients.py --artifacts artifacts --run cpgan [--batches 4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cpgan import layout
from cpgan.cli.common import PROJECT_ROOT
from cpgan.errors import CpganError
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.detect import load_detector
from cpgan.pipeline.text import Vocabulary
from cpgan.trainer import gan
from cpgan.trainer.data import TextImageDataset, collate, multi_resolution_sizes
from cpgan.trainer.sampling import config_from_dict

HIGH_FREQUENCY = 0.25  # cycles per pixel: half the Nyquist frequency


def high_frequency_share(gradient: torch.Tensor) -> float:
    """Fraction of the gradient's energy with a spatial frequency above HIGH_FREQUENCY."""
    power = torch.fft.rfft2(gradient).abs().pow(2)
    fy = torch.fft.fftfreq(gradient.shape[-2]).abs()[:, None]
    fx = torch.fft.rfftfreq(gradient.shape[-1])[None, :]
    high = torch.maximum(fy, fx) > HIGH_FREQUENCY
    return float((power * high).sum() / power.sum())


def per_image_norm(gradient: torch.Tensor) -> float:
    return float(gradient.flatten(1).norm(dim=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, default=PROJECT_ROOT / "artifacts")
    parser.add_argument("--run", default="cpgan", help="run name under <artifacts>/runs")
    parser.add_argument("--batches", type=int, default=4, help="train batches to average over")
    args = parser.parse_args()
    root = args.artifacts
    path = layout.checkpoint_file(layout.run_dir(root, args.run))
    try:
        data = gan.read_checkpoint(path)
        config = config_from_dict(data["config"], path)
        switches = gan.Switches(**data["switches"])
        vocab = Vocabulary.load(root / layout.VOCAB_NAME)
        detector = (load_detector(PROJECT_ROOT / config.detector.cfg,
                                  root / "models" / layout.DETECTOR_NAME)
                    if switches.use_objects else None)
        encoders = gan.load_encoders(root, vocab, config, switches, None, detector, None,
                                     torch.device("cpu"))
    except CpganError as exc:
        sys.exit(f"error: {exc}")
    state = gan.build_state(config, switches.use_fgcd, torch.device("cpu"))
    gan.restore_state(state, data, path)
    state.generator.train()
    state.discriminators.train().requires_grad_(False)
    g = config.gan
    dataset = TextImageDataset(CocoSplit.open(root / "toy-coco", gan.TRAIN_SPLIT), vocab,
                               config.data.max_caption_words,
                               multi_resolution_sizes(g.base_size, g.stages), augment=False)
    sums: dict[str, float] = {}
    for b in range(args.batches):
        batch = collate([dataset[i] for i in range(b * g.batch_size, (b + 1) * g.batch_size)])
        text = gan.encode_text(encoders.text, batch.captions, batch.lengths)
        z = gan.sample_noise(len(batch), config, b, torch.device("cpu"))
        with torch.no_grad():
            images = state.generator(z, text.sentence, text.words, text.mask).images
        images = [i.clone().requires_grad_(True) for i in images]
        adversarial = gan.adversarial_loss(state.discriminators, images, text)
        adversarial_grads = torch.autograd.grad(adversarial, images)
        tiscl = gan.tiscl_loss(encoders.image, images[-1], text, config)
        [tiscl_grad] = torch.autograd.grad(g.tiscl_lambda * tiscl, images[-1])
        values = {f"adversarial, stage {i} image": per_image_norm(grad)
                  for i, grad in enumerate(adversarial_grads)}
        values["lambda * TISCL, last image"] = per_image_norm(tiscl_grad)
        values["high-frequency share, adversarial"] = high_frequency_share(adversarial_grads[-1])
        values["high-frequency share, TISCL"] = high_frequency_share(tiscl_grad)
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value / args.batches
    print(f"{path} (step {data['step']}, lambda {g.tiscl_lambda}), {args.batches} batches of "
          f"{g.batch_size}: gradient norm per image")
    for key, value in sums.items():
        print(f"  {key}: {value:.4f}")
    ratio = sums["lambda * TISCL, last image"] / sums[f"adversarial, stage {g.stages - 1} image"]
    print(f"  lambda * TISCL / adversarial at the last image: {ratio:.1f}")


if __name__ == "__main__":
    main()
