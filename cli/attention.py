"""``cpgan-prep train-attention``, ``attend`` and ``show-attention``: the Bottom-Up/Top-Down
attention of §3.2.1, from region shards to per-word salient regions.

The commands are module-level Click commands; ``cli/prep.py`` adds them to the ``cpgan-prep``
group. Each stage command writes its provenance record and skips work that is up to date.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from cpgan.cli.common import RunContext, cluster_options, common_options
from cpgan.config import config_defaults
from cpgan.errors import CpganError
from cpgan.layout import (
    CAPTIONER_NAME,
    CAPTIONER_TRAIN_SPLIT,
    CAPTIONER_VAL_SPLIT,
    VOCAB_NAME,
    annotation_file,
    split_shards,
)
from cpgan.pipeline import artifacts

SPLITS = ("train2014", "val2014")


def _shards(run: RunContext, split: str) -> list[Path]:
    return split_shards(run.artifacts / "regions", split)


@click.command("train-attention")
@common_options
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Passes over the train captions (default: the preset's [attention] epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Captions per step (default: the preset's [attention] batch_size).")
@click.option("--resume", is_flag=True,
              help="Continue from models/captioner.ckpt.pt (saved after every epoch) "
              "instead of starting over.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N train images (by image id) - for quick trials.")
def train_attention(run: RunContext, epochs: int | None, batch_size: int | None, resume: bool,
                    device: str, limit: int | None) -> None:
    """Train the Bottom-Up/Top-Down captioner whose attention picks each word's region.

    Needs <artifacts>/vocab.json ('cpgan-prep vocab') and the region shards of both splits
    ('cpgan-prep detect' and 'cpgan-prep detect --split val2014'). Teacher-forced
    cross-entropy on the train captions, Adam with gradient clipping, validation loss each
    epoch, a few greedy val captions printed at the end. Writes models/captioner.pt (and the
    resumable models/captioner.ckpt.pt). Skipped when already trained on the same inputs.
    """
    config = run.config.attention
    if epochs is not None:
        config.epochs = epochs
    if batch_size is not None:
        config.batch_size = batch_size
    vocab_path = run.artifacts / VOCAB_NAME
    regions_dir = run.artifacts / "regions"
    target = run.artifacts / "models" / CAPTIONER_NAME
    params = {"attention": asdict(config), "max_caption_words": run.config.data.max_caption_words,
              "seed": run.config.seed, "limit": limit}
    files = [annotation_file(run.coco_root, kind, s) for kind in ("captions", "instances")
             for s in SPLITS]  # instances: the categories give the class inputs' size
    inputs = [vocab_path, *(f for f in files if f.exists()),
              *_shards(run, CAPTIONER_TRAIN_SPLIT), *_shards(run, CAPTIONER_VAL_SPLIT)]
    artifacts.sweep_temporaries(target.parent, "captioner.")  # left by a killed run
    if artifacts.is_current(run.artifacts, "train-attention", params=params, inputs=inputs,
                            defaults=config_defaults("attention")):
        click.echo(f"train-attention: up to date ({target})")
        return
    # imported after the up-to-date check: torch and torchvision take ~5 s to import
    import torch

    from cpgan.pipeline.coco import CocoSplit
    from cpgan.pipeline.text import Vocabulary
    from cpgan.trainer.captioner import train_captioner

    vocab = Vocabulary.load(vocab_path)
    train = CocoSplit.open(run.coco_root, CAPTIONER_TRAIN_SPLIT)
    val = CocoSplit.open(run.coco_root, CAPTIONER_VAL_SPLIT)
    previous = torch.get_num_threads()
    # The captioner's steps are small matrix products: on two shared cores a second thread
    # made an epoch 8x slower (every op waits for both), and one thread is reproducible.
    torch.set_num_threads(1)
    try:
        summary = train_captioner(regions_dir, run.artifacts / "models", train, val, vocab,
                                  config, run.config.data.max_caption_words,
                                  seed=run.config.seed, device=device, resume=resume, limit=limit)
    finally:
        torch.set_num_threads(previous)
    artifacts.write_record(run.artifacts, "train-attention", config=run.config.to_dict(),
                           params=params, inputs=inputs, outputs=[target], summary=summary)
    for sample in summary["samples"]:
        click.echo(f"  val image {sample['image_id']}: {sample['caption']!r} "
                   f"(a reference: {sample['reference']!r})")
    click.echo(f"train-attention: {summary['epochs']} epochs on {summary['train_pairs']} captions "
               f"of {summary['train_images']} images ({summary['skipped_failed']} failed, "
               f"{summary['skipped_empty']} without regions skipped); loss "
               f"{summary['train_loss'][-1]:.3f}, val loss {summary['val_loss'][-1]:.3f}, "
               f"{summary['seconds']:.0f}s -> {target}")


@click.command("attend")
@common_options
@click.option("--split", type=click.Choice(SPLITS), default="train2014", show_default=True)
@cluster_options
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Captions per forward pass.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N images of the split (in shard order).")
def attend_command(run: RunContext, split: str, workers: int, scheduler: str | None,
                   device: str, batch_size: int, limit: int | None) -> None:
    """For every word of every caption: its most salient region and that region's weight.

    One teacher-forced pass of models/captioner.pt per caption; for the word at position n
    the attention of the step that predicts it gives q_n = argmax_i a_(i,n) and a_(q_n,n)
    (paper Eq. 7). Writes attention/<split>-NNNNN.parquet, one part per region shard, with
    columns image_id, caption_id, position, word_id, region, weight; one dask task per part;
    finished parts with the same inputs are reused, so an interrupted run resumes. Images
    whose detection failed or that have no region are skipped and counted. Also writes
    attention/grounding.json (grounding-<split>.json for val2014): how often a word naming a
    category chose a box overlapping an instance of it (IoU >= 0.5).
    """
    vocab_path = run.artifacts / VOCAB_NAME
    captioner = run.artifacts / "models" / CAPTIONER_NAME
    if not captioner.is_file():
        raise CpganError(f"{captioner}: captioner not found (run 'cpgan-prep train-attention')")
    max_words = run.config.data.max_caption_words
    params = {"max_caption_words": max_words, "limit": limit}
    files = [annotation_file(run.coco_root, kind, split) for kind in ("captions", "instances")]
    inputs = [vocab_path, captioner, *(f for f in files if f.exists()), *_shards(run, split)]
    if artifacts.is_current(run.artifacts, "attend", params=params, inputs=inputs, split=split):
        click.echo(f"attend [{split}]: up to date ({run.artifacts / 'attention'})")
        return
    # imported after the up-to-date check: torch and torchvision take ~5 s to import
    from cpgan.pipeline.attend import AttendSettings, attend
    from cpgan.pipeline.coco import CocoSplit
    from cpgan.pipeline.text import Vocabulary

    vocab = Vocabulary.load(vocab_path)
    settings = AttendSettings(
        captioner=str(captioner.resolve()),
        captioner_sha256=artifacts.fingerprint(captioner)["sha256"],
        vocab_sha256=artifacts.fingerprint(vocab_path)["sha256"],
        max_words=max_words, batch_size=batch_size, device=device)
    coco = CocoSplit.open(run.coco_root, split)
    out_dir = run.artifacts / "attention"
    summary, parts, report = attend(coco, vocab, settings, run.artifacts / "regions", out_dir,
                                    limit=limit, workers=workers, scheduler=scheduler)
    outputs = [*parts, *([report] if report else [])]
    artifacts.write_record(run.artifacts, "attend", split=split, config=run.config.to_dict(),
                           params=params, inputs=inputs, outputs=outputs, summary=summary)
    click.echo(f"attend [{split}]: {summary['captions']} captions of {summary['images']} images "
               f"({summary['skipped_failed']} failed, {summary['skipped_empty']} without regions "
               f"skipped), {summary['rows']} words, {summary['parts']} parts "
               f"({summary['reused_parts']} reused) -> {out_dir}")
    if report:
        fraction = summary["grounding"]
        shown = "n/a" if fraction is None else f"{fraction:.3f}"
        click.echo(f"grounding: {shown} of category-word occurrences chose a box overlapping "
                   f"that category (IoU >= 0.5) -> {report}")


@click.command("show-attention")
@common_options
@click.option("--image-id", type=int, required=True, help="COCO image id to draw.")
@click.option("--caption-id", type=int, default=None,
              help="Which of its captions (default: the first by caption id).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PNG file to write.")
def show_attention(run: RunContext, image_id: int, caption_id: int | None, out: Path) -> None:
    """Draw one caption's attention: for each word, its chosen box and weight on the image.

    Reads regions/index.parquet to find the image's split and shard, the attention part of
    that shard (run 'cpgan-prep attend' for the split first), the boxes and the image.
    """
    import pyarrow.compute as pc

    from cpgan.pipeline import regions as store
    from cpgan.pipeline.attend import caption_rows, draw_attention, part_name
    from cpgan.pipeline.coco import CocoSplit
    from cpgan.pipeline.text import tokenize

    index_path = run.artifacts / "regions" / store.INDEX_NAME
    index = store.read_index(index_path)
    found = index.filter(pc.equal(index["image_id"], image_id)).to_pylist()
    if not found:
        raise CpganError(f"{index_path}: image {image_id} is not in the region index")
    entry = found[0]
    if entry["status"] != store.STATUS_OK:
        raise CpganError(f"{index_path}: image {image_id} has no regions ({entry['status']})")
    part = run.artifacts / "attention" / part_name(entry["split"], entry["shard"])
    caption_id, rows = caption_rows(part, image_id, caption_id)
    split = CocoSplit.open(run.coco_root, entry["split"])
    text = dict(split.captions(image_id)).get(caption_id)
    if text is None:
        raise CpganError(f"{split.captions_file}: image {image_id} has no caption {caption_id}")
    tokens = tokenize(text)
    shard_path = run.artifacts / "regions" / store.shard_name(entry["split"], entry["shard"])
    with store.RegionShard(shard_path) as shard:
        boxes = shard.read("boxes", slice(entry["row"], entry["row"] + 1))[0]
    positions = rows["position"].to_pylist()
    regions = rows["region"].to_numpy()
    draw_attention(split.load_image(image_id), [tokens[p] for p in positions], regions.tolist(),
                   boxes[regions], rows["weight"].to_pylist(),
                   f"image {image_id}, caption {caption_id}: {text}", out)
    click.echo(f"show-attention: {len(positions)} words of caption {caption_id} -> {out}")
