"""Time of a toy GAN step with BN discriminators against spectral-norm ones. Not a test.

``gan.d_norm = "spectral"`` (the toy preset since session 12) removes D's BN and puts spectral
norm on every convolution and linear map; each update computes the normalised weights once
(trainer/gan.py). This times ``gan.train_step`` with each D in one process: random-weight toy
models as bench/train.py builds them, batch 16, two threads, alternating rounds of 3 steps
after a warm-up step each, so both see the same machine. Prints the seconds of every round
and the ratio of the means.

    .venv/bin/python bench/d_norm_step.py [--rounds 6]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import build_encoders, random_batch  # noqa: E402

from cpgan.config import load_config  # noqa: E402
from cpgan.trainer import gan  # noqa: E402

NORMS = ("batch", "spectral")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(2)
    configs = {}
    for norm in NORMS:
        configs[norm] = load_config("toy")
        configs[norm].gan.d_norm = norm
    encoders = build_encoders(configs["batch"], 85)
    batch = random_batch(configs["batch"], 16, 85)
    states = {n: gan.build_state(c, True, torch.device("cpu")) for n, c in configs.items()}
    for norm, state in states.items():
        gan.train_step(state, batch, encoders, configs[norm], seed=0)  # warm-up
    seconds: dict[str, list[float]] = {norm: [] for norm in NORMS}
    for _ in range(args.rounds):
        for norm in NORMS:
            start = time.perf_counter()
            for step in range(3):
                gan.train_step(states[norm], batch, encoders, configs[norm], seed=1 + step)
            seconds[norm].append((time.perf_counter() - start) / 3)
    means = {norm: sum(v) / len(v) for norm, v in seconds.items()}
    for norm in NORMS:
        print(f"{norm:8s} s/step {' '.join(f'{x:.3f}' for x in seconds[norm])}  "
              f"mean {means[norm]:.3f}")
    print(f"spectral / batch: {means['spectral'] / means['batch']:.3f}")


if __name__ == "__main__":
    main()
