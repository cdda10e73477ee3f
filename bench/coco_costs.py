"""What the paper-preset stages cost per unit of work on this machine, for the README's COCO
2014 arithmetic. Not a test.

Times, with random weights at the paper preset's sizes (configs/paper.toml) and FLOPs counted
by ``torch.utils.flop_counter.FlopCounterMode``:

* train-attention: one Up-Down captioner training step (batch ``attention.batch_size`` = 100
  captions, 36 regions of 1024 + 80 inputs, 18 words + <bos>/<eos>, vocabulary 27,297):
  forward, cross-entropy, backward, Adam;
* attend: the same captioner's teacher-forced forward in eval mode (what ``attend`` stores);
* damsm: one DAMSM pretraining step at batch 2 (MATE with a random memory, OAIE with YOLOv3
  at 416 and the frozen Inception-v3 at 299, Eq. 14-25 forward and backward, Adam).

The detect, build-memory and GAN figures come from bench/detect.py, bench/memory.py and
bench/train.py (BENCHMARKS.md). ``--threads`` compute threads (default 2: the whole machine).

    .venv/bin/python bench/coco_costs.py [--threads 2] [--seconds 20]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
COCO_VOCAB = 27297
COCO_CLASSES = 80
REGIONS = 36


def timed(step: Callable[[], None], seconds: float) -> tuple[float, float]:
    """(seconds per call, GFLOP per call) after one warm-up call; at least two timed calls."""
    step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        step()
        calls += 1
    return (time.perf_counter() - start) / calls, counter.get_total_flops() / 1e9


def captioner_steps(config) -> tuple[Callable[[], None], Callable[[], None], int]:
    from cpgan.model.butd import caption_loss
    from cpgan.trainer.captioner import build_captioner

    torch.manual_seed(0)
    batch, words = config.attention.batch_size, config.data.max_caption_words + 2
    feature_dim = config.detector.feature_dim
    model = build_captioner(COCO_VOCAB, feature_dim, COCO_CLASSES, config.attention)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.attention.lr)
    features = torch.randn(batch, REGIONS, feature_dim + COCO_CLASSES)
    mask = torch.ones(batch, REGIONS, dtype=torch.bool)
    captions = torch.randint(4, COCO_VOCAB, (batch, words))

    def train() -> None:
        model.train()
        loss = caption_loss(model(features, mask, captions), captions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def attend() -> None:
        model.eval()
        with torch.no_grad():
            model(features, mask, captions)

    return train, attend, batch


def damsm_step(config, batch: int) -> Callable[[], None]:
    from cpgan.model.darknet import Darknet
    from cpgan.model.image_encoder import InceptionBackbone, ObjectAwareImageEncoder
    from cpgan.model.losses import damsm_loss
    from cpgan.trainer import damsm

    torch.manual_seed(0)
    words = config.data.max_caption_words
    text = damsm.build_text_encoder(COCO_VOCAB, config.encoder,
                                    torch.randn(COCO_VOCAB, config.detector.feature_dim))
    darknet = Darknet.from_cfg_file(ROOT / config.detector.cfg)
    extractor = damsm.build_region_extractor(darknet, damsm.region_settings(darknet,
                                                                            config.detector))
    image = ObjectAwareImageEncoder(InceptionBackbone(), config.encoder.text_dim, extractor)
    parameters = [p for p in [*text.parameters(), *image.parameters()] if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.encoder.lr)
    images = torch.rand(batch, 3, config.encoder.image_size, config.encoder.image_size) * 2 - 1
    lengths = torch.full((batch,), words)
    captions = torch.randint(4, COCO_VOCAB, (batch, words))
    e = config.encoder

    def step() -> None:
        text.train()
        image.train()
        word_features, sentence = text(captions, lengths)
        encoded = image(images)
        loss, _ = damsm_loss(word_features, lengths, sentence, encoded.regions,
                             encoded.global_feature, e.gamma1, e.gamma2, e.gamma3,
                             region_mask=encoded.region_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--damsm-batch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from cpgan.config import load_config

    config = load_config("paper")
    train, attend, captions = captioner_steps(config)
    result: dict = {"threads": args.threads}
    for name, step, per_call in (("train_attention", train, captions),
                                 ("attend", attend, captions)):
        seconds, gflop = timed(step, args.seconds)
        result[name] = {"captions_per_call": per_call, "seconds_per_call": round(seconds, 3),
                        "captions_per_s": round(per_call / seconds, 1),
                        "gflop_per_caption": round(gflop / per_call, 3)}
    seconds, gflop = timed(damsm_step(config, args.damsm_batch), args.seconds)
    result["damsm"] = {"batch": args.damsm_batch, "seconds_per_step": round(seconds, 2),
                       "images_per_s": round(args.damsm_batch / seconds, 3),
                       "gflop_per_image": round(gflop / args.damsm_batch, 1)}
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
