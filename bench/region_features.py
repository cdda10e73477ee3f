"""region_features as a linear map (model/yolo.py) against torchvision's RoIAlign on the map
itself. Not a test.

Two measurements in one process:

* the op: forward and backward of both forms, one thread, on the toy GAN's batch (32 x 36
  boxes on a 256 x 4 x 4 map, 2 x 2 bins) and a paper-size map (batch 4, 1024 x 13 x 13,
  7 x 7 bins), best of 5 calls after a warm-up, with the largest difference in values and
  gradients;
* a toy GAN step (``gan.train_step``, random-weight models as bench/train.py builds them,
  ``--threads`` threads), alternating rounds of 3 steps with each form, mean and best.

    .venv/bin/python bench/region_features.py [--threads 2] [--rounds 4]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import roi_align

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import build_encoders, random_batch  # noqa: E402

from cpgan.config import load_config  # noqa: E402
from cpgan.model import yolo  # noqa: E402
from cpgan.trainer import gan  # noqa: E402

LINEAR = yolo.region_features


def roi_align_form(feature_map, boxes, stride, valid=None, output_size=7, sampling_ratio=2):
    """The form before the linear map: RoIAlign on the features, then the mean over bins."""
    batch, k, _ = boxes.shape
    pooled = roi_align(feature_map, list(boxes.detach().to(feature_map.dtype).unbind(0)),
                       output_size, spatial_scale=1.0 / stride, sampling_ratio=sampling_ratio,
                       aligned=True)
    features = pooled.mean(dim=(2, 3)).view(batch, k, -1)
    return features if valid is None else features * valid.unsqueeze(-1).to(features.dtype)


def op_timing(batch: int, channels: int, side: int, bins: int) -> dict:
    torch.manual_seed(0)
    stride = 32
    fmap = torch.randn(batch, channels, side, side, requires_grad=True)
    corner = torch.rand(batch, 36, 2) * side * stride * 1.1 - 5
    boxes = torch.cat([corner, corner + torch.rand(batch, 36, 2) * side * stride * 0.6], -1)
    weights = torch.randn(batch, 36, channels)  # one upstream gradient for both forms
    row = {}
    outputs = {}
    for name, form in (("roi_align", roi_align_form), ("linear", LINEAR)):
        out = form(fmap, boxes, stride, output_size=bins)
        (grad,) = torch.autograd.grad(out, fmap, weights)
        outputs[name] = (out.detach(), grad)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            form(fmap, boxes, stride, output_size=bins).backward(weights)
            best = min(best, time.perf_counter() - start)
        row[f"{name}_ms"] = round(best * 1000, 2)
    (a, ga), (b, gb) = outputs["roi_align"], outputs["linear"]
    row["max_value_difference"] = float((a - b).abs().max())
    row["max_gradient_difference"] = float((ga - gb).abs().max())
    row["ratio"] = round(row["roi_align_ms"] / row["linear_ms"], 1)
    return row


def gan_step_timing(rounds: int) -> dict:
    config = load_config("toy")
    encoders = build_encoders(config, 85)
    state = gan.build_state(config, True, torch.device("cpu"))
    batch = random_batch(config, config.gan.batch_size, 85)
    gan.train_step(state, batch, encoders, config, seed=0)  # warm-up
    times: dict[str, list[float]] = {"roi_align": [], "linear": []}
    try:
        for _ in range(rounds):
            for name, form in (("roi_align", roi_align_form), ("linear", LINEAR)):
                yolo.region_features = form
                start = time.perf_counter()
                for step in range(3):
                    gan.train_step(state, batch, encoders, config, seed=1 + step)
                times[name].append((time.perf_counter() - start) / 3)
    finally:
        yolo.region_features = LINEAR
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    return {"seconds_per_step": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "mean_ratio": round(mean["roi_align"] / mean["linear"], 3),
            "best_ratio": round(min(times["roi_align"]) / min(times["linear"]), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"toy_op": op_timing(32, 256, 4, 2), "paper_op": op_timing(4, 1024, 13, 7)}
    torch.set_num_threads(args.threads)
    result["toy_gan_step"] = gan_step_timing(args.rounds)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
