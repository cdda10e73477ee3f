"""Benchmark of `cpgan-prep detect` (issue: YOLOv3 region stage). Not a test.

Measures, in one run on this machine:
1. Throughput of the whole stage (decode + letterbox + forward + NMS + RoIAlign + HDF5 write)
   with yolov3.cfg at 416 and random weights, as a fraction of the machine's compute limit:
   GFLOPs per image (counted by torch's FlopCounterMode) x images/s, divided by the conv
   GFLOP/s torch reaches on the same cores (one thread per worker, as detect runs).
2. Scaling: 2 dask workers vs 1.

Fixed costs (cluster start, model load) are removed by timing two runs of different sizes
and dividing the image difference by the time difference.

    .venv/bin/python bench/detect.py [--images 24] [--workdir /tmp/cpgan-bench-detect]
    .venv/bin/python bench/detect.py --machine-scaling   # the cores' own 2-vs-1 ceiling
    .venv/bin/python bench/detect.py --stage-profile     # seconds per image of each part
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
CFG = ROOT / "configs" / "darknet" / "yolov3.cfg"


def write_random_weights(cfg: Path, path: Path, seed: int = 0) -> None:
    """A Darknet weights file written with numpy, not with the project's writer: BN layers
    get beta 0, gamma 1, mean 0, var 1; convolutions He-initialised."""
    from cpgan.model.darknet import plan_network, read_cfg

    rng = np.random.default_rng(seed)
    layers = plan_network(read_cfg(cfg))[0]
    channels = 3
    with open(path, "wb") as f:
        np.array([0, 2, 0], "<i4").tofile(f)
        np.array([0], "<i8").tofile(f)
        for info in layers:
            if info.kind == "convolutional":
                n, k = info.options["filters"], info.options["size"]
                fan_in = channels * k * k
                if info.options["bn"]:
                    for fill in (0.0, 1.0, 0.0, 1.0):
                        np.full(n, fill, "<f4").tofile(f)
                else:
                    np.zeros(n, "<f4").tofile(f)
                (rng.standard_normal(n * fan_in) * np.sqrt(2.0 / fan_in)).astype("<f4").tofile(f)
            channels = info.channels


def gflops_per_image(cfg: Path, size: int) -> float:
    from cpgan.model.darknet import Darknet

    model = Darknet.from_cfg_file(cfg).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def conv_gflops_per_second(seconds: float = 3.0) -> float:
    """Single-thread conv rate on a layer typical of Darknet-53 (3x3, 256->512, 26x26)."""
    torch.set_num_threads(1)
    conv = torch.nn.Conv2d(256, 512, 3, padding=1, bias=False).eval()
    x = torch.randn(1, 256, 26, 26)
    flops = 2 * 256 * 512 * 9 * 26 * 26
    with torch.no_grad():
        for _ in range(3):
            conv(x)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            conv(x)
            count += 1
    return count * flops / (time.perf_counter() - start) / 1e9


def yolo_gflops_per_second(seconds: float) -> float:
    """One-thread GFLOP/s of the folded YOLOv3 forward at 416 (batch 4), as detect runs it."""
    from cpgan.model.darknet import Darknet, for_cpu_inference

    torch.set_num_threads(1)
    model = for_cpu_inference(Darknet.from_cfg_file(CFG).eval())
    x = torch.randn(4, 3, 416, 416).contiguous(memory_format=torch.channels_last)
    gflops = gflops_per_image(CFG, 416) * 4
    with torch.inference_mode():
        model(x)
        count, start = 0, time.perf_counter()
        while count < 2 or time.perf_counter() - start < seconds:
            model(x)
            count += 1
    return count * gflops / (time.perf_counter() - start)


PROBES = {"conv": conv_gflops_per_second, "yolov3": yolo_gflops_per_second}


def _probe_worker(probe: str, seconds: float, start_at: float, results) -> None:
    rate_of = PROBES[probe]
    if probe == "yolov3":
        rate_of(0.0)  # build and warm the model before the common start
    while time.time() < start_at:  # start both probes together
        time.sleep(0.001)
    results.put(rate_of(seconds))


def machine_scaling(probe: str, seconds: float = 10.0) -> dict[str, float]:
    """The hardware's own 2-vs-1 ceiling for a kernel: ``probe`` ("conv": the one-thread conv
    probe, cache-resident; "yolov3": the whole folded forward at 416, whose activations are
    not) in one process alone, then in two processes at once (summed). No software scales two
    workers beyond this ratio on these cores (shared caches and memory bandwidth, or two vCPUs
    that are not two whole physical cores)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rates = {}
    for count in (1, 2):
        results = context.Queue()
        start_at = time.time() + 35.0  # after the spawned interpreters have built their models
        processes = [context.Process(target=_probe_worker,
                                     args=(probe, seconds, start_at, results))
                     for _ in range(count)]
        for process in processes:
            process.start()
        rates[count] = [results.get() for _ in processes]
        for process in processes:
            process.join()
    return {"probe": probe, "one_process_gflops_per_s": round(rates[1][0], 1),
            "two_processes_gflops_per_s": [round(r, 1) for r in rates[2]],
            "ceiling_2_vs_1": round(sum(rates[2]) / rates[1][0], 2)}


def stage_profile(repeats: int = 3, batch: int = 4) -> dict[str, float]:
    """Seconds per image of each part of a detect batch at 416 px on one thread: the folded
    forward, YOLO decoding, NMS + top-36, RoIAlign, and JPEG decoding + letterboxing of a
    640 x 480 image; the part outside the forward is what two workers must share the cores
    with."""
    import cv2

    from cpgan.model.darknet import Darknet, for_cpu_inference
    from cpgan.model.yolo import decode_yolo, letterbox, region_features, select_regions

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = for_cpu_inference(Darknet.from_cfg_file(CFG).eval())
    layer = 74
    x = torch.rand(batch, 3, 416, 416).contiguous(memory_format=torch.channels_last)
    pixels = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    jpeg = cv2.imencode(".jpg", pixels)[1]
    totals: dict[str, float] = {}

    def timed(name: str, work):
        start = time.perf_counter()
        result = work()
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return result

    with torch.inference_mode():
        model(x, keep_layers=(layer,))
        for _ in range(repeats):
            heads, kept = timed("forward", lambda: model(x, keep_layers=(layer,)))
            decoded = timed("yolo_decode", lambda: decode_yolo(heads, model.yolo_specs, (416, 416)))
            regions = timed("nms_top36", lambda: select_regions(*decoded))
            timed("roi_align", lambda: region_features(kept[layer], regions.boxes, 32,
                                                       valid=regions.labels >= 0))
            for _ in range(batch):
                timed("jpeg_and_letterbox", lambda: letterbox(
                    cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), 416))
    return {name: round(total / (repeats * batch), 4) for name, total in totals.items()}


def forward_rates(gflops: float, batch: int = 4, repeats: int = 2) -> dict[str, float]:
    """One-thread GFLOP/s of the YOLOv3 forward as loaded and after ``for_cpu_inference``
    (BN folded, channels_last), timed back to back in this process."""
    import copy

    from cpgan.model.darknet import Darknet, for_cpu_inference

    torch.set_num_threads(1)
    plain = Darknet.from_cfg_file(CFG).eval()
    folded = for_cpu_inference(copy.deepcopy(plain))
    x = torch.randn(batch, 3, 416, 416)
    rates = {}
    for name, model, inputs in (("plain", plain, x),
                                ("folded", folded, x.contiguous(memory_format=torch.channels_last))):
        with torch.inference_mode():
            model(inputs)
            start = time.perf_counter()
            for _ in range(repeats):
                model(inputs)
        rates[name] = round(gflops * batch * repeats / (time.perf_counter() - start), 1)
    return rates


def run_detect(coco: Path, weights: Path, out: Path, images: int, workers: int) -> float:
    command = [str(ROOT / ".venv" / "bin" / "cpgan-prep"), "detect", "--coco-root", str(coco),
               "--cfg", str(CFG), "--weights", str(weights), "--artifacts", str(out),
               "--limit", str(images), "--shard-size", str(max(1, images // (2 * workers))),
               "--batch-size", "4", "--workers", str(workers)]
    shutil.rmtree(out, ignore_errors=True)  # a finished run would otherwise be skipped
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def throughput(coco: Path, weights: Path, work: Path, images: int, workers: int) -> float:
    """Images/s with fixed costs removed: (N2 - N1) / (T2 - T1)."""
    small = max(2 * workers, images // 4)
    t_small = run_detect(coco, weights, work / f"w{workers}-small", small, workers)
    t_large = run_detect(coco, weights, work / f"w{workers}-large", images, workers)
    return (images - small) / (t_large - t_small)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cpgan-bench-detect"))
    parser.add_argument("--forward-only", action="store_true",
                        help="Only time the forward with and without BN folding.")
    parser.add_argument("--stage-profile", action="store_true",
                        help="Only time each part of a detect batch (seconds per image).")
    parser.add_argument("--machine-scaling", action="store_true",
                        help="Only measure the cores' own 2-vs-1 ceiling: the conv probe in "
                        "one process, then in two at once.")
    args = parser.parse_args()
    if args.stage_profile:
        print(json.dumps({"seconds_per_image": stage_profile(), "load_average": os.getloadavg()}))
        return
    if args.machine_scaling:
        for probe in PROBES:
            print(json.dumps({**machine_scaling(probe), "load_average": os.getloadavg()}))
        return
    if args.forward_only:
        gflops = gflops_per_image(CFG, 416)
        print(json.dumps({"forward_gflops_per_s_one_thread": forward_rates(gflops),
                          "conv_gflops_per_s_one_thread": round(conv_gflops_per_second(), 1),
                          "load_average": os.getloadavg()}))
        return
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    # one dataset per size: a smaller one would silently cap --limit and inflate images/s
    coco, weights = work / f"coco-{args.images}", work / "yolov3-random.weights"
    if not coco.exists():
        from cpgan.pipeline.toy import generate_toy_coco

        generate_toy_coco(coco, train_images=args.images, val_images=1, image_size=480,
                          progress=False)
    if not weights.exists():
        write_random_weights(CFG, weights)
    gflops = gflops_per_image(CFG, 416)
    conv_rate = conv_gflops_per_second()
    cores = os.cpu_count() or 1
    rates = {w: throughput(coco, weights, work, args.images, w) for w in (1, 2)}
    result = {
        "gflops_per_image": round(gflops, 2),
        "conv_gflops_per_s_one_thread": round(conv_rate, 1),
        "images_per_s": {str(w): round(r, 3) for w, r in rates.items()},
        "fraction_of_compute_limit": {
            str(w): round(rates[w] * gflops / (conv_rate * min(w, cores)), 3) for w in rates},
        "scaling_2_vs_1": round(rates[2] / rates[1], 2),
        "load_average": os.getloadavg(),
    }
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
