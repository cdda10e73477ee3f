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

With ``--device cuda`` (issue 7's GPU figure: ``--paper-batch 72``) everything runs on the
GPU, the timed steps end with a synchronise, and each preset also reports the peak memory of
its tensors over the warm-up, counted and timed steps (``torch.cuda.max_memory_allocated``,
reset after building the models, whose own share is ``models_gib``) and what the caching
allocator reserved (``max_memory_reserved``; the cache is emptied between presets). The compute limit there is a large square matmul in plain float32
and in TF32 (``torch.backends.cuda.matmul.allow_tf32``, off by default in PyTorch, so the
step's own matmuls are plain float32 while cuDNN's convolutions may use TF32 by default):
the step's fraction is given against both. CPU seconds mean nothing on a GPU and are left out.

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
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a wall-clock interval covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, seconds: float = 3.0) -> tuple[float, float]:
    """(GFLOP per wall second, GFLOP per process CPU second) of a square float32 matmul at
    the current thread count (on a GPU: at the current TF32 setting)."""
    size = MATMUL_SIZE[device.type]
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    for _ in range(2):
        torch.matmul(a, b)
    synchronize(device)
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        count += 1
        synchronize(device)
    gflop = count * 2 * size**3 / 1e9
    return gflop / (time.perf_counter() - start), gflop / (time.process_time() - cpu_start)


def compute_limits(device: torch.device) -> dict[str, float]:
    """The matmul rates the step is set against: plain float32, and on a GPU also TF32."""
    rate, cpu_rate = matmul_gflops(device)
    limits = {"matmul_gflops": round(rate, 1)}
    if device.type == "cpu":
        limits["matmul_gflop_per_cpu_s"] = round(cpu_rate, 1)
    else:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        limits["matmul_tf32_gflops"] = round(matmul_gflops(device)[0], 1)
        torch.backends.cuda.matmul.allow_tf32 = previous
    return limits


def build_encoders(config, vocab_size: int, device: torch.device):
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
        module.to(device).eval().requires_grad_(False)
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


def measure(preset: str, batch_size: int | None, seconds: float, vocab_size: int,
            device: torch.device) -> dict:
    from cpgan.config import load_config
    from cpgan.trainer import gan

    config = load_config(preset)
    if batch_size is not None:
        config.gan.batch_size = batch_size
    batch_size = config.gan.batch_size
    encoders = build_encoders(config, vocab_size, device)
    state = gan.build_state(config, True, device)
    batch = random_batch(config, batch_size, vocab_size)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # else the previous preset's cache counts as reserved here
        torch.cuda.reset_peak_memory_stats(device)
        models_bytes = torch.cuda.memory_allocated(device)
    gan.train_step(state, batch, encoders, config, seed=0)  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        gan.train_step(state, batch, encoders, config, seed=1)
    flops = counter.get_total_flops()
    synchronize(device)
    steps, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while steps < 2 or time.perf_counter() - start < seconds:
        gan.train_step(state, batch, encoders, config, seed=2 + steps)
        steps += 1
    synchronize(device)
    step_seconds = (time.perf_counter() - start) / steps
    cpu_seconds = (time.process_time() - cpu_start) / steps
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    row = {"batch": batch_size, "timed_steps": steps, "seconds_per_step": round(step_seconds, 3),
           "steps_per_s": round(1 / step_seconds, 3),
           "images_per_s": round(batch_size / step_seconds, 2),
           "gflop_per_step": round(flops / 1e9, 2),
           "achieved_gflops": round(flops / 1e9 / step_seconds, 2),
           "generator_params": count(state.generator),
           "discriminator_params": count(state.discriminators)}
    if device.type == "cpu":
        row["cpu_seconds_per_step"] = round(cpu_seconds, 3)
        row["achieved_gflop_per_cpu_s"] = round(flops / 1e9 / cpu_seconds, 2)
    else:
        gib = 2**30
        # weights, the EMA copy and the encoders; Adam's state is made at the first step
        row["models_gib"] = round(models_bytes / gib, 2)
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / gib, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / gib, 2)
    return row


def fractions(row: dict, limits: dict[str, float]) -> dict[str, float]:
    """The step's achieved FLOP rate as a fraction of each measured matmul rate."""
    out = {"fraction_of_matmul_rate": round(row["achieved_gflops"] / limits["matmul_gflops"], 3)}
    if "matmul_gflop_per_cpu_s" in limits:
        out["fraction_of_matmul_rate_cpu"] = round(
            row["achieved_gflop_per_cpu_s"] / limits["matmul_gflop_per_cpu_s"], 3)
    if "matmul_tf32_gflops" in limits:
        out["fraction_of_tf32_matmul_rate"] = round(
            row["achieved_gflops"] / limits["matmul_tf32_gflops"], 3)
    return out


def describe(device: torch.device) -> str:
    """The device's name and the software that drives it."""
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    return f"cpu, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="timed steps per preset run for at least this long (min 2 steps)")
    parser.add_argument("--presets", default="paper,toy")
    parser.add_argument("--paper-batch", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    limits = compute_limits(device)
    result: dict = {"threads": args.threads, "device": describe(device), **limits}
    for preset in args.presets.split(","):
        batch = args.paper_batch if preset == "paper" else None
        vocab = COCO_VOCAB if preset == "paper" else TOY_VOCAB
        row = measure(preset, batch, args.seconds, vocab, device)
        row.update(fractions(row, limits))
        result[preset] = row
        print(json.dumps({preset: row}), file=sys.stderr, flush=True)  # kept if a later one dies
    # a machine that got busier during the run shows here
    result.update({f"{k}_after": v for k, v in compute_limits(device).items()})
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
