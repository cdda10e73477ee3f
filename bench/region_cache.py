"""DAMSM pretraining with the V_o cache against without it (trainer/region_cache.py). Not a test.

Trains the demo's main encoders (toy preset, memory and objects on) twice from the inputs of a
finished ``make demo``, each in its own folder under ``--workdir``, one after the other in this
process: first as ``cpgan-train --stage damsm`` does, then with the cache switched off
(``damsm.REGION_CACHE_LIMIT = 0``, so the frozen detector runs in every step and every
validation). Same seed and data, so the two differ only by floating-point rounding.

    .venv/bin/python bench/region_cache.py --artifacts artifacts --workdir /tmp/rc [--epochs 5]

Prints one JSON object: each run's wall seconds, their ratio, and each run's val R-precision
per epoch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import copy_encoder_inputs  # noqa: E402


def train(artifacts: Path, folder: Path, epochs: int, cache: bool) -> dict:
    from cpgan.cli.train import cli
    from cpgan.trainer import damsm

    copy_encoder_inputs(artifacts, folder)
    limit = damsm.REGION_CACHE_LIMIT
    damsm.REGION_CACHE_LIMIT = limit if cache else 0
    start = time.perf_counter()
    try:
        cli.main(["--stage", "damsm", "--artifacts", str(folder), "--coco-root",
                  str(artifacts / "toy-coco"), "--epochs", str(epochs)], standalone_mode=False)
    finally:
        damsm.REGION_CACHE_LIMIT = limit
    seconds = time.perf_counter() - start
    history = damsm.recorded_history(damsm.model_path(folder / "models"))
    return {"seconds": round(seconds, 1), "r_precision": [round(r, 3) for r in history or []]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    cached = train(args.artifacts, args.workdir / "cache", args.epochs, cache=True)
    uncached = train(args.artifacts, args.workdir / "no-cache", args.epochs, cache=False)
    print(json.dumps({"epochs": args.epochs, "cache": cached, "no_cache": uncached,
                      "ratio_no_cache_to_cache": round(uncached["seconds"] / cached["seconds"],
                                                       3)}, indent=1))


if __name__ == "__main__":
    main()
