"""Step time with TISCL's frozen encoders in channels-last layout against the plain layout.
Not a test.

``gan.tiscl_channels_last`` hands the detector and the grid backbone the generated images in
channels-last layout. oneDNN's kernels for the detector's first convolutions (3 -> 8 channels
at 128 px, forward and the backward to the pixels) are several times faster in that layout on
some CPUs and not on others, so the choice is measured, not assumed. One process, the same
random-weight models and batch as ``bench/train.py``, blocks of ``--steps`` full GAN steps
alternating between the two layouts for ``--rounds`` rounds: each round's ratio compares two
neighbouring blocks, so a machine whose speed drifts over minutes still gives a fair ratio.

    .venv/bin/python bench/tiscl_layout.py [--preset toy] [--rounds 12] [--steps 6]

Prints one JSON object: seconds per step of every block in each layout, and the per-round
ratios (channels-last over plain; below 1 is faster) of wall and process CPU time with their
medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import COCO_VOCAB, TOY_VOCAB, build_encoders, random_batch  # noqa: E402


def main() -> None:
    from cpgan.config import load_config
    from cpgan.trainer import gan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="toy", choices=("toy", "paper"))
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the preset's (the paper preset: 2, as bench/train.py)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=6, help="steps per block")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    config = load_config(args.preset)
    config.gan.batch_size = args.batch_size or (2 if args.preset == "paper" else
                                                config.gan.batch_size)
    vocab = COCO_VOCAB if args.preset == "paper" else TOY_VOCAB
    encoders = build_encoders(config, vocab, device)
    state = gan.build_state(config, True, device)
    batch = random_batch(config, config.gan.batch_size, vocab)
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for layout in (False, True):  # warm-up: oneDNN builds each layout's kernels once
        config.gan.tiscl_channels_last = layout
        gan.train_step(state, batch, encoders, config, seed=0)
    for _ in range(args.rounds):
        for layout in (False, True):
            config.gan.tiscl_channels_last = layout
            start, cpu_start = time.perf_counter(), time.process_time()
            for step in range(args.steps):
                gan.train_step(state, batch, encoders, config, seed=1 + step)
            wall[layout].append((time.perf_counter() - start) / args.steps)
            cpu[layout].append((time.process_time() - cpu_start) / args.steps)

    def ratios(times: dict[bool, list[float]]) -> list[float]:
        return [round(last / plain, 3) for plain, last in zip(times[False], times[True])]

    wall_ratios, cpu_ratios = ratios(wall), ratios(cpu)
    print(json.dumps({
        "preset": args.preset, "batch": config.gan.batch_size, "threads": args.threads,
        "rounds": args.rounds, "steps_per_block": args.steps,
        "plain_s_per_step": [round(t, 3) for t in wall[False]],
        "channels_last_s_per_step": [round(t, 3) for t in wall[True]],
        "wall_ratio_per_round": wall_ratios, "wall_ratio_median": round(statistics.median(wall_ratios), 3),
        "cpu_ratio_per_round": cpu_ratios, "cpu_ratio_median": round(statistics.median(cpu_ratios), 3),
    }, indent=1))


if __name__ == "__main__":
    main()
