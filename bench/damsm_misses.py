"""Where the pretrained encoders' R-precision misses come from, on toy val (not a test).

DAMSM's val R-precision (trainer/damsm.py, DM-GAN's protocol: each image's caption against 99
captions of other images) stops near 0.90 on toy however the recipe is varied (RESULTS.md).
This script tells the two kinds of miss apart, using the toy generator's ground truth
(:func:`cpgan.pipeline.toy.caption_truth`):

* a miss to a *true* caption: a distractor that scores at least as high is also true of the
  image ("a green star in the sky" for an image captioned "a green star against the sky").
  No matcher can avoid these; an oracle that knows which captions are true and breaks ties at
  random scores the *ceiling* printed here (mean over images of 1 / (1 + true distractors));
* a miss to a *false* caption: some distractor that says something false of the image wins.
  These are the encoders' errors. They are counted by the image's number of objects, and the
  first few are printed.

Same pairs and distractors as the stage's own figure: the val split's caption of each image
and the distractors are drawn with ``--seed`` (the preset's seed, 0, by default), so the hit
rate printed equals the R-precision the stage reported for these encoders.

    .venv/bin/python bench/damsm_misses.py --artifacts A [--model A/models/damsm.pt]

with A an artifacts root after ``make demo``'s DAMSM stage (vocab.json, memory.h5,
models/detector.pt, toy-coco/). One thread, about a minute.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from cpgan.config import load_config
from cpgan.model.metrics import CANDIDATES, mismatched_captions
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.detect import load_detector
from cpgan.pipeline.text import Vocabulary
from cpgan.pipeline.toy import caption_truth
from cpgan.trainer import damsm
from cpgan.trainer.data import TextImageDataset, batches, make_loader

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def features(model: Path, artifacts: Path, val: TextImageDataset, config) -> tuple:
    """(f, s, caption ids) of every val pair, as the stage's evaluation computes them."""
    vocab = Vocabulary.load(artifacts / "vocab.json")
    detector = load_detector(ROOT / config.detector.cfg, artifacts / "models" / "detector.pt")
    text, image = damsm.load_pretrained_encoders(model, vocab, config,
                                                 artifacts / "memory.h5", detector)
    images, sentences, caption_ids = [], [], []
    for batch in batches(make_loader(val, config.encoder.batch_size, shuffle=False), {}):
        _, sentence = text(batch.captions, batch.lengths)
        images.append(image(batch.images[-1]).global_feature)
        sentences.append(sentence)
        caption_ids += batch.caption_ids.tolist()
    normalise = torch.nn.functional.normalize
    return normalise(torch.cat(images), dim=1), normalise(torch.cat(sentences), dim=1), caption_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="default: <artifacts>/models/damsm.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config("toy")
    split = CocoSplit.open(args.artifacts / "toy-coco", damsm.VAL_SPLIT, require_instances=True)
    vocab = Vocabulary.load(args.artifacts / "vocab.json")
    val = TextImageDataset(split, vocab, config.data.max_caption_words,
                           [config.encoder.image_size], augment=False, seed=args.seed)
    f, s, caption_ids = features(args.model or args.artifacts / "models" / "damsm.pt",
                                 args.artifacts, val, config)
    texts = {cid: text for i in val.image_ids for cid, text in split.captions(i)}
    backgrounds = {im["id"]: im.get("background")
                   for im in json.loads(split.instances_file.read_text())["images"]}

    distractors = mismatched_captions(len(val), CANDIDATES - 1, args.seed)
    hits, to_true, to_false, ceiling = 0, 0, 0, []
    by_objects: dict[int, Counter] = defaultdict(Counter)
    examples = []
    for i, others in enumerate(distractors):
        image_id = val.image_ids[i]
        info, instances = split.image_info(image_id), split.instances(image_id)
        claims = {int(j): caption_truth(texts[caption_ids[j]], instances,
                                        (info["width"], info["height"]),
                                        background=backgrounds[image_id]) for j in others}
        true_others = {j for j, false in claims.items() if not false}
        ceiling.append(1.0 / (1 + len(true_others)))
        scores = f[i] @ s[torch.as_tensor(others)].T
        winners = [int(j) for j, score in zip(others, scores) if score >= f[i] @ s[i]]
        by_objects[len(instances)]["images"] += 1
        if not winners:
            hits += 1
            continue
        wrong = [j for j in winners if j not in true_others]
        if not wrong:
            to_true += 1
            continue
        to_false += 1
        by_objects[len(instances)]["false"] += 1
        if len(examples) < args.examples:
            examples.append((texts[caption_ids[i]], texts[caption_ids[wrong[0]]],
                             claims[wrong[0]]))
    n = len(val)
    print(f"{n} val images: R-precision {hits / n:.3f}; missed to a true caption "
          f"{to_true / n:.3f}, to a false one {to_false / n:.3f}; oracle ceiling "
          f"{np.mean(ceiling):.3f}")
    for objects in sorted(by_objects):
        row = by_objects[objects]
        print(f"  {objects} object(s): {row['images']} images, {row['false'] / row['images']:.3f} "
              "lost to a false caption")
    for own, winner, claims in examples:
        print(f"  '{own}' lost to '{winner}' ({'; '.join(claims)})")


if __name__ == "__main__":
    main()
