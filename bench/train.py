"""Benchmark of one GAN training step (trainer/gan.py: D update + G update with TISCL). Not a test.

For the paper preset (batch 2: 64/128/256 generator, YOLOv3 at 416 and Inception-v3 in OAIE,
MATE over a COCO-sized vocabulary and memory) and the toy preset (its own batch size), with
every model built directly with random weights (no file needed):

* images/s of full steps (``gan.train_step``: text encoding, generator, Eq. 5 update of every
  stage, Eq. 3-4 + lambda TISCL + KL update, EMA), after one warm-up step;
* process CPU seconds per step besides wall seconds: on a shared machine the wall time
  includes waiting for the cores, the CPU time (all threads) does not;
* FLOPs of one step, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
  convolutions and their backward; elementwise work and RoIAlign are not counted), and the
  achieved FLOP rate as a fraction of the rate a large ``torch.matmul`` reaches in the same
  process with the same thread count: how close the step runs to the machine's compute limit.
  Both per wall second and per CPU second (``fraction_of_matmul_rate_cpu``), the latter being
  the meaningful one on a machine shared with other jobs.

    .venv/bin/python bench/train.py [--threads 2] [--seconds 20] [--presets paper,toy]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
COCO_VOCAB = 27297          # AttnGAN's COCO vocabulary size (captions.pickle n_words)
TOY_VOCAB = 85              # the toy dataset's vocabulary
MATMUL_SIZE = 2048


def matmul_gflops(seconds: float = 3.0) -> tuple[float, float]:
    """(GFLOP per wall second, GFLOP per process CPU second) of a square float32 matmul at
    the current thread count."""
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    for _ in range(2):
        torch.matmul(a, b)
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        count += 1
    gflop = count * 2 * MATMUL_SIZE**3 / 1e9
    return gflop / (time.perf_counter() - start), gflop / (time.process_time() - cpu_start)


def build_encoders(config, vocab_size: int):
    """Frozen MATE (random memory of the detector's feature size) and OAIE (the preset's
    backbone and detector, random weights), as the GAN step uses them."""
    from cpgan.model.darknet import Darknet
    from cpgan.model.image_encoder import InceptionBackbone, ObjectAwareImageEncoder
    from cpgan.trainer import damsm, gan

    torch.manual_seed(0)
    memory = torch.randn(vocab_size, config.detector.feature_dim)
    text = damsm.build_text_encoder(vocab_size, config.encoder, memory)
    darknet = Darknet.from_cfg_file(ROOT / config.detector.cfg)
    extractor = damsm.build_region_extractor(darknet, damsm.region_settings(darknet,
                                                                            config.detector))
    if config.encoder.backbone == "inception":
        image = ObjectAwareImageEncoder(InceptionBackbone(), config.encoder.text_dim, extractor)
    else:
        image = damsm.build_image_encoder(config.encoder, extractor)
    for module in (text, image):
        module.eval().requires_grad_(False)
    return gan.Encoders(text, image, "random", None)


def random_batch(config, batch_size: int, vocab_size: int):
    """Real images per stage in [-1, 1] and captions of 5..T words."""
    from cpgan.trainer.data import Batch, multi_resolution_sizes

    words = config.data.max_caption_words
    lengths = torch.randint(5, words + 1, (batch_size,))
    captions = torch.randint(4, vocab_size, (batch_size, words))
    captions[torch.arange(words)[None, :] >= lengths[:, None]] = 0
    sizes = multi_resolution_sizes(config.gan.base_size, config.gan.stages)
    images = [torch.rand(batch_size, 3, s, s) * 2 - 1 for s in sizes]
    ids = torch.arange(batch_size)
    return Batch(ids, ids, ids, images, captions, lengths)


def measure(preset: str, batch_size: int | None, seconds: float, vocab_size: int) -> dict:
    from cpgan.config import load_config
    from cpgan.trainer import gan

    config = load_config(preset)
    if batch_size is not None:
        config.gan.batch_size = batch_size
    batch_size = config.gan.batch_size
    encoders = build_encoders(config, vocab_size)
    state = gan.build_state(config, True, torch.device("cpu"))
    batch = random_batch(config, batch_size, vocab_size)
    gan.train_step(state, batch, encoders, config, seed=0)  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        gan.train_step(state, batch, encoders, config, seed=1)
    flops = counter.get_total_flops()
    steps, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while steps < 2 or time.perf_counter() - start < seconds:
        gan.train_step(state, batch, encoders, config, seed=2 + steps)
        steps += 1
    step_seconds = (time.perf_counter() - start) / steps
    cpu_seconds = (time.process_time() - cpu_start) / steps
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"batch": batch_size, "timed_steps": steps, "seconds_per_step": round(step_seconds, 3),
            "cpu_seconds_per_step": round(cpu_seconds, 3),
            "steps_per_s": round(1 / step_seconds, 3),
            "images_per_s": round(batch_size / step_seconds, 2),
            "gflop_per_step": round(flops / 1e9, 2),
            "achieved_gflops": round(flops / 1e9 / step_seconds, 2),
            "achieved_gflop_per_cpu_s": round(flops / 1e9 / cpu_seconds, 2),
            "generator_params": count(state.generator),
            "discriminator_params": count(state.discriminators)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="timed steps per preset run for at least this long (min 2 steps)")
    parser.add_argument("--presets", default="paper,toy")
    parser.add_argument("--paper-batch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rate, cpu_rate = matmul_gflops()
    result: dict = {"threads": args.threads, "matmul_gflops": round(rate, 1),
                    "matmul_gflop_per_cpu_s": round(cpu_rate, 1)}
    for preset in args.presets.split(","):
        batch = args.paper_batch if preset == "paper" else None
        vocab = COCO_VOCAB if preset == "paper" else TOY_VOCAB
        row = measure(preset, batch, args.seconds, vocab)
        row["fraction_of_matmul_rate"] = round(row["achieved_gflops"] / rate, 3)
        row["fraction_of_matmul_rate_cpu"] = round(row["achieved_gflop_per_cpu_s"] / cpu_rate, 3)
        result[preset] = row
    after, after_cpu = matmul_gflops()  # a machine that got busier during the run shows here
    result["matmul_gflops_after"] = round(after, 1)
    result["matmul_gflop_per_cpu_s_after"] = round(after_cpu, 1)
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
