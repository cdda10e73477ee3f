"""``cpgan-prep``: the offline stages that turn COCO into frozen artifacts.

Each subcommand reads artifacts, writes artifacts atomically with a provenance record, and
skips work that is already done with the same inputs and parameters.
"""
from __future__ import annotations

from pathlib import Path

import click

from cpgan.cli.common import TOY_DIRNAME, RunContext, cluster_options, common_options, report_errors
from cpgan.config import DETECTOR_KEYS_TRAINING_IGNORES, config_defaults
from cpgan.layout import (
    DETECTOR_DARKNET_NAME,
    DETECTOR_NAME,
    REGION_INDEX_NAME,
    VOCAB_NAME,
    annotation_file,
)
from cpgan.pipeline import artifacts


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
def cli() -> None:
    """Offline preprocessing for CPGAN: dataset -> vocabulary -> YOLOv3 regions ->
    Bottom-Up/Top-Down attention -> per-word memory (paper §3.2.1).

    Every command works with no arguments on the embedded toy dataset (made on first use
    under <artifacts>/toy-coco) and on COCO 2014 with --coco-root. Outputs land under
    --artifacts (default ./artifacts); 'cpgan-prep status' says what is done.
    """


@cli.command("make-toy")
@common_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write the dataset. Default: <artifacts>/toy-coco.")
@click.option("--train-images", type=click.IntRange(min=1), default=4000, show_default=True)
@click.option("--val-images", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=128, show_default=True,
              help="Side of the square images in pixels.")
@click.option("--seed", type=int, default=None, help="Random seed (default: the preset's seed).")
def make_toy(run: RunContext, out: Path | None, train_images: int, val_images: int,
             image_size: int, seed: int | None) -> None:
    """Generate the toy dataset in the official COCO 2014 layout.

    Small images of coloured shapes (circle, square, triangle, star, ...) on textured
    backgrounds, each with instance boxes and 5 true captions such as "a small red circle
    left of a blue square on the grass". The same seed gives the same bytes.
    """
    out = out or run.artifacts / TOY_DIRNAME
    if out.exists():
        click.echo(f"make-toy: {out} already exists; remove it to generate again")
        return
    from cpgan.pipeline.toy import generate_toy_coco  # after the check: it imports OpenCV

    generate_toy_coco(out, train_images=train_images, val_images=val_images,
                      image_size=image_size, seed=run.config.seed if seed is None else seed)
    click.echo(f"make-toy: {train_images} train + {val_images} val images -> {out}")


@cli.command("vocab")
@common_options
@click.option("--min-count", type=click.IntRange(min=1), default=None,
              help="Keep words seen at least this often in train captions (default: preset).")
def vocab(run: RunContext, min_count: int | None) -> None:
    """Build the vocabulary shared by every stage from the train captions.

    AttnGAN's tokenisation (lower-case, \\w+ tokens, non-ASCII dropped); specials <pad>
    <unk> <bos> <eos> take ids 0-3. Writes <artifacts>/vocab.json.
    """
    if min_count is not None:
        run.config.data.min_word_count = min_count
    params = {"min_count": run.config.data.min_word_count}
    captions_file = annotation_file(run.coco_root, "captions", "train2014")
    target = run.artifacts / VOCAB_NAME
    if artifacts.is_current(run.artifacts, "vocab", params=params, inputs=[captions_file]):
        click.echo(f"vocab: up to date ({target})")
        return
    from cpgan.pipeline.coco import CocoSplit  # after the check: it imports OpenCV
    from cpgan.pipeline.text import build_vocabulary

    split = CocoSplit.open(run.coco_root, "train2014")
    texts = (text for image_id in split.image_ids() for _cid, text in split.captions(image_id))
    vocabulary = build_vocabulary(texts, params["min_count"])
    vocabulary.save(target)
    summary = {"tokens": len(vocabulary)}
    artifacts.write_record(run.artifacts, "vocab", config=run.config.to_dict(), params=params,
                           inputs=[captions_file], outputs=[target], summary=summary)
    click.echo(f"vocab: {len(vocabulary)} tokens (min count {params['min_count']}) -> {target}")


@cli.command("train-detector")
@common_options
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs (default: the preset's detector.train_epochs).")
@click.option("--resume", is_flag=True,
              help="Continue from models/detector.ckpt.pt (saved after every epoch).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N train images (for quick checks).")
def train_detector_command(run: RunContext, epochs: int | None, resume: bool, device: str,
                           limit: int | None) -> None:
    """Train the preset's YOLOv3 (toy: configs/darknet/yolov3-toy.cfg) on the dataset's
    instance boxes, then report mAP@0.5 and mAP@[.5:.95] on val with pycocotools.

    Writes models/detector.pt (state dict) and the same weights as a Darknet file
    models/detector.weights. For COCO you would normally skip this and pass the official
    yolov3.weights to 'detect --weights' instead.
    """
    from dataclasses import asdict

    det = run.config.detector
    if epochs is not None:
        det.train_epochs = epochs
    cfg = run.project_path(det.cfg)
    det.cfg = str(cfg)
    models = run.artifacts / "models"
    outputs = [models / DETECTOR_NAME, models / DETECTOR_DARKNET_NAME]
    inputs = [annotation_file(run.coco_root, "instances", s) for s in ("train2014", "val2014")]
    inputs.append(cfg)
    params = {"detector": asdict(det), "seed": run.config.seed, "limit": limit}
    artifacts.sweep_temporaries(models, "detector.")  # what a killed run left half written
    if not resume and artifacts.is_current(
            run.artifacts, "train-detector", params=params, inputs=inputs,
            defaults=config_defaults("detector"),
            ignore=[f"detector.{key}" for key in DETECTOR_KEYS_TRAINING_IGNORES]):
        record = artifacts.read_record(run.artifacts, "train-detector") or {}
        click.echo(f"train-detector: up to date (mAP@0.5 {record['summary']['map50']:.3f}) "
                   f"-> {outputs[0]}")
        return
    # imported after the up-to-date check: torch and torchvision take ~5 s to import
    from cpgan.trainer.detector import train_detector

    summary = train_detector(run.coco_root, run.artifacts, det, seed=run.config.seed,
                             device=device, resume=resume, limit=limit)
    artifacts.write_record(run.artifacts, "train-detector", config=run.config.to_dict(),
                           params=params, inputs=inputs, outputs=outputs, summary=summary)
    click.echo(f"train-detector: mAP@0.5 {summary['map50']:.3f}, mAP@[.5:.95] "
               f"{summary['map']:.3f} on val after {summary['epochs']} epochs "
               f"({summary['seconds']:.0f} s) -> {outputs[0]}")


@cli.command("inspect-weights")
@click.argument("weights", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--cfg", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              required=True, help="Darknet .cfg the weights belong to.")
def inspect_weights(weights: Path, cfg: Path) -> None:
    """Check a Darknet .weights file against its .cfg without loading it.

    Prints every layer (type, output shape, stored floats), the parameter count, the
    expected and actual file sizes and a verdict (OK, PARTIAL for backbone files such as
    darknet53.conv.74, or MISMATCH). Exits 1 unless the file matches the whole cfg.
    """
    from cpgan.model.darknet import describe_weights

    info = describe_weights(cfg, weights)
    header = info["header"]
    click.echo(f"{weights} against {cfg}")
    click.echo(f"header: version {header['major']}.{header['minor']}.{header['revision']}, "
               f"seen {header['seen']}")
    click.echo(f"{'layer':>5}  {'type':<14}{'output':<16}{'floats':>12}")
    for row in info["layers"]:
        click.echo(f"{row['index']:>5}  {row['type']:<14}{row['output']:<16}{row['weight_floats']:>12,}")
    click.echo(f"parameters: {info['total_params']:,}")
    click.echo(f"expected size: {info['expected_bytes']:,} bytes; actual: {info['actual_bytes']:,} bytes")
    click.echo(f"verdict: {info['verdict']}")
    if info["expected_bytes"] != info["actual_bytes"]:
        raise SystemExit(1)


@cli.command("detect")
@common_options
@click.option("--split", type=click.Choice(["train2014", "val2014"]), default="train2014",
              show_default=True)
@click.option("--cfg", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Darknet .cfg (default: the preset's, e.g. configs/darknet/yolov3-toy.cfg).")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Darknet .weights file or models/detector.pt "
              "(default: <artifacts>/models/detector.pt from train-detector).")
@cluster_options
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="Images per HDF5 shard and per dask task (default: preset).")
@click.option("--feature-layer", type=click.IntRange(min=0), default=None,
              help="Layer whose output is RoIAligned into region features (default: the "
              "preset's for its own cfg, else the cfg's stride-32 backbone output, e.g. 74 "
              "of yolov3.cfg).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N images of the split (by image id).")
def detect_command(run: RunContext, split: str, cfg: Path | None, weights: Path | None,
                   workers: int, scheduler: str | None, shard_size: int | None,
                   feature_layer: int | None, batch_size: int, device: str,
                   limit: int | None) -> None:
    """YOLOv3 regions: top-36 boxes and a D-dim RoIAlign feature per box for every image.

    Writes regions/<split>-NNNNN.h5 shards and regions/index.parquet (DESIGN §3). Runs one
    dask task per shard; a finished shard with the same detector, parameters and images is
    reused, so an interrupted run resumes. Images that fail to decode are recorded in the
    index's status column and skipped.
    """
    det = run.config.detector
    preset_cfg = run.project_path(det.cfg).resolve()
    cfg = run.project_path(cfg or det.cfg).resolve()
    weights = Path(weights or run.artifacts / "models" / DETECTOR_NAME)
    if shard_size is not None:
        det.shard_size = shard_size
    if feature_layer is None and cfg == preset_cfg:
        feature_layer = det.feature_layer
    out_dir = run.artifacts / "regions"
    inputs = [annotation_file(run.coco_root, "captions", split), cfg, weights]
    done = _finished_detection(run, split, cfg, weights, feature_layer, limit, inputs)
    if done is not None:
        click.echo(_detect_line(split, done, done["shards"], out_dir))
        return
    # imported after the up-to-date check: torch and torchvision take ~5 s to import
    from cpgan.model.darknet import default_feature_layer, plan_network, read_cfg
    from cpgan.pipeline.coco import CocoSplit
    from cpgan.pipeline.detect import DetectSettings, detect, load_detector

    sections = read_cfg(cfg)
    if feature_layer is None:
        feature_layer = default_feature_layer(plan_network(sections)[0])
    det.cfg, det.feature_layer = str(cfg), feature_layer
    det.input_size = sections[0].get_int("width")
    settings = DetectSettings(
        coco_root=str(run.coco_root.resolve()), split=split, cfg=str(cfg),
        weights=str(weights.resolve()), input_size=det.input_size,
        feature_layer=feature_layer, num_regions=det.num_regions,
        score_threshold=det.score_threshold, nms_iou=det.nms_iou, batch_size=batch_size,
        device=device,
    )
    load_detector(settings.cfg, settings.weights)  # fail here, once, not in every worker
    coco = CocoSplit.open(run.coco_root, split)
    summary, shards = detect(coco, settings, out_dir, shard_size=det.shard_size, limit=limit,
                             workers=workers, scheduler=scheduler)
    params = {"settings": {k: v for k, v in vars(settings).items()
                           if k not in ("coco_root", "device", "batch_size")},
              "shard_size": det.shard_size, "limit": limit}
    artifacts.write_record(run.artifacts, "detect", split=split, config=run.config.to_dict(),
                           params=params, inputs=inputs, outputs=shards, summary=summary)
    click.echo(_detect_line(split, summary, summary["reused_shards"], out_dir))


def _finished_detection(run: RunContext, split: str, cfg: Path, weights: Path,
                        feature_layer: int | None, limit: int | None,
                        inputs: list[Path]) -> dict | None:
    """The split's recorded detect summary when a run with these options would only reuse
    every shard and record the same parameters, else None.

    Decided without reading the cfg, which imports torch: the input size it gives, and the
    feature layer when it is the cfg's default, are taken from the record. They are the cfg's
    while the cfg is the recorded one, and is_current checks that (the cfg is an input).
    """
    det = run.config.detector
    record = artifacts.read_record(run.artifacts, "detect", split) or {}
    try:
        recorded = record["params"]["settings"]
        settings = {"split": split, "cfg": str(cfg), "weights": str(weights.resolve()),
                    "input_size": recorded["input_size"],
                    "feature_layer": (recorded["feature_layer"] if feature_layer is None
                                      else feature_layer),
                    "num_regions": det.num_regions, "score_threshold": det.score_threshold,
                    "nms_iou": det.nms_iou}
        summary = {key: record["summary"][key] for key in ("images", "failed", "shards")}
    except (KeyError, TypeError):
        return None
    params = {"settings": settings, "shard_size": det.shard_size, "limit": limit}
    regions = run.artifacts / "regions"
    with artifacts.folder_lock(regions, "detect"):  # refused while another run writes it
        if not artifacts.is_current(run.artifacts, "detect", params=params, inputs=inputs,
                                    split=split):
            return None
        # the index is shared by the splits: it must still hold this split's rows
        rows = _index_rows(regions / REGION_INDEX_NAME, split)
    return summary if rows == summary["images"] else None


def _index_rows(index: Path, split: str) -> int | None:
    """How many rows of ``split`` regions/index.parquet holds (None when unreadable)."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(index).read(columns=["split"])  # read_table imports pandas
        return table.column("split").to_pylist().count(split)
    except (OSError, ValueError, KeyError):
        return None


def _detect_line(split: str, summary: dict, reused: int, out_dir: Path) -> str:
    return (f"detect [{split}]: {summary['images']} images, {summary['failed']} failed, "
            f"{summary['shards']} shards ({reused} reused) -> {out_dir}")


@cli.command("status")
@common_options
def status(run: RunContext) -> None:
    """Say which stages are done, stale (an input changed since) or missing."""
    split_stages = {"detect", "attend"}
    for stage in artifacts.STAGES:
        splits = _recorded_splits(run.artifacts, stage) if stage in split_stages else [None]
        for split in splits or ["train2014"]:
            state, reason = artifacts.stage_state(run.artifacts, stage, split)
            label = f"{stage} [{split}]" if split else stage
            click.echo(f"{label:<26} {state:<8} {reason}".rstrip())


def _recorded_splits(root: Path, stage: str) -> list[str]:
    folder = artifacts.record_path(root, stage, "x").parent
    return sorted(p.name.removesuffix(".provenance.json") for p in folder.glob("*.provenance.json"))


def _register_stage_commands() -> None:
    """Commands whose stages live in their own CLI modules."""
    from cpgan.cli.attention import attend_command, show_attention, train_attention
    from cpgan.cli.memory import build_memory_command, show_memory_command

    for command in (train_attention, attend_command, show_attention, build_memory_command,
                    show_memory_command):
        cli.add_command(command)


_register_stage_commands()
main = report_errors(cli)

if __name__ == "__main__":
    main()
