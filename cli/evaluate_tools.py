"""Evaluation helper commands, attached under ``cpgan-eval`` (cli/evaluate.py).

``fit-classifier`` fits the toy preset's scoring network for IS and FID (DESIGN §4: on the
toy dataset a classifier fitted on real toy images replaces Inception-v3) and writes
``<artifacts>/models/classifier.pt`` with ``models/classifier.json`` beside it: the summary
(validation accuracy, per-epoch history, seconds), the parameters, the resolved config and the
fingerprints of the model file and the annotation files it was fitted on.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from cpgan.cli.common import RunContext, common_options
from cpgan.layout import (
    CLASSIFIER_BATCH_SIZE,
    CLASSIFIER_EPOCHS,
    CLASSIFIER_LR,
    CLASSIFIER_NAME,
    CLASSIFIER_TRAIN_SPLIT,
    CLASSIFIER_VAL_SPLIT,
)
from cpgan.pipeline import artifacts

RECORD_NAME = "classifier.json"


def generator_image_size(run: RunContext) -> int:
    """Side of the generator's last stage (64 for the toy preset, 256 for the paper's)."""
    return run.config.gan.base_size * 2 ** (run.config.gan.stages - 1)


@click.command("fit-classifier")
@common_options
@click.option("--epochs", type=click.IntRange(min=1), default=CLASSIFIER_EPOCHS,
              show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=CLASSIFIER_BATCH_SIZE,
              show_default=True)
@click.option("--image-size", type=click.IntRange(min=16), default=None,
              help="Side the classifier scores at, a multiple of 8 "
              "(default: the generator's output size, 64 for the toy preset).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
def fit_classifier(run: RunContext, epochs: int, batch_size: int, image_size: int | None,
                   device: str) -> None:
    """Fit the toy scoring network for IS and FID on real toy train images.

    Its classes are the (shape, colour) of each image's largest object (8 x 8 = 64); its
    pooled features play the part of Inception's pool3 in FID. Reports the val accuracy and
    writes <artifacts>/models/classifier.pt and classifier.json.
    """
    size = generator_image_size(run) if image_size is None else image_size
    root = run.coco_root
    models = run.artifacts / "models"
    params = {"epochs": epochs, "batch_size": batch_size, "image_size": size, "lr": CLASSIFIER_LR,
              "seed": run.config.seed}
    inputs = [Path(root) / "annotations" / f"instances_{split}.json"
              for split in (CLASSIFIER_TRAIN_SPLIT, CLASSIFIER_VAL_SPLIT)]
    done = _finished_record(models, params, inputs)
    if done is not None:
        click.echo(f"fit-classifier: up to date (val accuracy "
                   f"{done['summary']['val_accuracy']:.3f}) -> {models / CLASSIFIER_NAME}")
        return
    # imported after the up-to-date check: torch and torchvision take ~5 s to import
    from cpgan.trainer import classifier as trainer

    summary = trainer.fit_classifier(root, run.artifacts, image_size=size, epochs=epochs,
                                     batch_size=batch_size, seed=run.config.seed, device=device)
    record = {
        "params": params | {"width": summary["width"]},
        "coco_root": str(root),
        "inputs": {str(p): artifacts.fingerprint(p) for p in inputs},
        "outputs": {CLASSIFIER_NAME: artifacts.fingerprint(models / CLASSIFIER_NAME)},
        "summary": summary,
        "config": run.config.to_dict(),
    }
    artifacts.atomic_write_text(models / RECORD_NAME,
                                json.dumps(record, indent=1, sort_keys=True) + "\n")
    click.echo(f"fit-classifier: val accuracy {summary['val_accuracy']:.3f} (shape "
               f"{summary['val_shape_accuracy']:.3f}, colour {summary['val_colour_accuracy']:.3f}) "
               f"on {summary['val_images']} images after {epochs} epochs in "
               f"{summary['seconds']:.0f} s -> {models / CLASSIFIER_NAME}")


def _finished_record(models: Path, params: dict, inputs: list[Path]) -> dict | None:
    """The classifier's record when it was fitted with ``params`` on these exact inputs and
    its model file is the one it wrote; else None (fit again)."""
    try:
        record = json.loads((models / RECORD_NAME).read_text(encoding="utf-8"))
        known_params = {k: v for k, v in record["params"].items() if k != "width"}
        if known_params != params or set(record["inputs"]) != {str(p) for p in inputs}:
            return None
        for path, known in [*((Path(p), record["inputs"][str(p)]) for p in inputs),
                            *((models / name, fp) for name, fp in record["outputs"].items())]:
            if artifacts.fingerprint(path, known)["sha256"] != known.get("sha256"):
                return None
        return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
