"""DAMSM pretraining on several seeds: the mean and spread of val R-precision (not a test).

On toy the recipe's val R-precision moves by up to 0.03 between training seeds (RESULTS.md,
session 8), more than most recipe changes, so one run says little about a change. This runs
``cpgan-train --stage damsm`` once per seed, each in its own artifacts folder under
``--workdir`` (holding copies of the finished inputs: vocab.json, memory.h5, models/detector.pt,
models/classifier.pt; the toy COCO is read in place), with ``seed = S`` plus the optional
``--config`` file's settings, and prints each run's figure, then mean and sample sd:

    .venv/bin/python bench/damsm_seeds.py --artifacts A --workdir W --seeds 0,1,2,3 \\
        [--config variant.toml] [--no-memory]

with A an artifacts root after ``make demo``'s prep stages and ``fit-classifier``. A seed
whose folder already holds a finished model is not trained again, whatever its settings: give
each variant its own ``--workdir``. Runs one after another: on two cores, two at once only slow each other down.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

from cpgan import layout

ROOT = Path(__file__).resolve().parent.parent
INPUTS = (layout.VOCAB_NAME, layout.MEMORY_NAME, f"models/{layout.DETECTOR_NAME}",
          f"models/{layout.CLASSIFIER_NAME}")


def seed_config(workdir: Path, seed: int, extra: Path | None) -> Path:
    """A TOML file with the variant's settings and ``seed = S``."""
    lines = [f"seed = {seed}"]
    if extra is not None:
        settings = tomllib.loads(extra.read_text())
        if "seed" in settings:
            sys.exit(f"{extra}: sets seed itself; --seeds chooses it")
        lines.append(extra.read_text())
    path = workdir / f"seed{seed}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def train(artifacts: Path, folder: Path, config: Path, no_memory: bool) -> dict:
    """One DAMSM run in ``folder``; returns the published file's metrics."""
    model = layout.damsm_path(folder / "models", use_memory=not no_memory)
    if not model.exists():
        for name in INPUTS:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(artifacts / name, folder / name)
        command = [str(Path(sys.executable).parent / "cpgan-train"), "--stage", "damsm",
                   "--artifacts", str(folder), "--coco-root", str(artifacts / "toy-coco"),
                   "--config", str(config), *(["--no-memory"] if no_memory else [])]
        subprocess.run(command, check=True, cwd=ROOT)
    return torch.load(model, map_location="cpu", weights_only=True)["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    figures = []
    for seed in seeds:
        config = seed_config(args.workdir, seed, args.config)
        metrics = train(args.artifacts, args.workdir / f"seed{seed}", config, args.no_memory)
        figures.append(metrics["r_precision"])
        print(f"seed {seed}: val R-precision {metrics['r_precision']:.3f}", flush=True)
    spread = statistics.stdev(figures) if len(figures) > 1 else 0.0
    print(f"{len(figures)} seeds: mean {statistics.mean(figures):.3f}, sd {spread:.3f}, "
          f"min {min(figures):.3f}, max {max(figures):.3f}")


if __name__ == "__main__":
    main()
