"""Where the stages' files live, and the few rules and defaults that go with their names.

A command whose stage is up to date decides so from these names before it imports torch
(torch and torchvision take about 5 s to import). The stages' own modules, which import torch,
h5py, pyarrow or OpenCV (``cpgan.pipeline.coco``, ``regions``, ``memory``,
``cpgan.trainer.captioner``, ``classifier``, ``damsm``, ``detector``, ``gan``, ``sampling``),
take the same names from here, so the commands and the stages cannot disagree about a file.
``cpgan.pipeline.artifacts`` builds the gan stage's record path from them too. This module
imports the standard library and ``cpgan.errors`` only; tests/test_cli_skip.py checks that the
owners use its objects and that an up-to-date command imports no torch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from cpgan.errors import CpganError

# --------------------------------------------------------------------------------------------
# COCO annotations (cpgan.pipeline.coco)


def annotation_file(root: Path, kind: str, split: str) -> Path:
    """``root/annotations/{captions,instances}_{split}.json`` of the official layout."""
    return Path(root) / "annotations" / f"{kind}_{split}.json"


# --------------------------------------------------------------------------------------------
# The vocabulary (cpgan.pipeline.text's file, read by every later stage) and the trained
# detector (cpgan.trainer.detector): its state dict and the same weights in Darknet's format

VOCAB_NAME = "vocab.json"
DETECTOR_NAME = "detector.pt"
DETECTOR_DARKNET_NAME = "detector.weights"

# --------------------------------------------------------------------------------------------
# Region shards (cpgan.pipeline.regions, cpgan.trainer.captioner) and the memory bank
# (cpgan.pipeline.memory)

REGION_INDEX_NAME = "index.parquet"
MEMORY_NAME = "memory.h5"


def split_shards(regions_dir: Path, split: str) -> list[Path]:
    """The split's region shards ``<split>-NNNNN.h5`` in shard order."""
    pattern = re.compile(rf"{re.escape(split)}-\d{{5}}\.h5")
    return sorted(p for p in Path(regions_dir).glob(f"{split}-*.h5") if pattern.fullmatch(p.name))


# --------------------------------------------------------------------------------------------
# The attention captioner (cpgan.trainer.captioner)

CAPTIONER_NAME = "captioner.pt"
CAPTIONER_TRAIN_SPLIT = "train2014"
CAPTIONER_VAL_SPLIT = "val2014"

# --------------------------------------------------------------------------------------------
# The toy scoring classifier (cpgan.trainer.classifier): its file, splits and fitting defaults,
# which fit-classifier's record compares

CLASSIFIER_NAME = "classifier.pt"
CLASSIFIER_TRAIN_SPLIT = "train2014"
CLASSIFIER_VAL_SPLIT = "val2014"
CLASSIFIER_EPOCHS = 30
CLASSIFIER_BATCH_SIZE = 32
CLASSIFIER_LR = 3e-3

# --------------------------------------------------------------------------------------------
# The DAMSM encoders (cpgan.trainer.damsm), and the line that sums up an encoder's val figures
# (the stage prints it after training, its up-to-date check from the record)

DAMSM_STEM = "damsm"
DAMSM_VARIANTS: tuple[tuple[bool, bool], ...] = ((True, True), (False, True), (True, False),
                                                (False, False))
"""(use_memory, use_objects) of every encoder file: damsm, -no-memory, -no-oaie, both."""


def damsm_name(use_memory: bool = True, use_objects: bool = True) -> str:
    """``damsm``, ``damsm-no-memory``, ``damsm-no-oaie`` or ``damsm-no-memory-no-oaie``."""
    return DAMSM_STEM + ("" if use_memory else "-no-memory") + ("" if use_objects else "-no-oaie")


def damsm_path(models_dir: Path, use_memory: bool = True, use_objects: bool = True) -> Path:
    """``models/<name>.pt`` of one encoder variant."""
    return Path(models_dir) / f"{damsm_name(use_memory, use_objects)}.pt"


def damsm_record(model: Path) -> Path:
    """``models/<name>.provenance.json``: the record of how ``models/<name>.pt`` was trained
    (for ``damsm.pt`` this is the damsm stage's own record)."""
    return model.with_name(f"{model.stem}.provenance.json")


def damsm_variant_files(models_dir: Path) -> list[tuple[Path, bool, bool]]:
    """(file, use_memory, use_objects) of every encoder variant present in ``models_dir``, in
    the order of DAMSM_VARIANTS."""
    found = [(damsm_path(models_dir, memory, objects), memory, objects)
             for memory, objects in DAMSM_VARIANTS]
    return [entry for entry in found if entry[0].is_file()]


def describe_damsm_metrics(metrics: dict[str, float]) -> str:
    """'R-precision 0.934 ± 0.021 (in-batch 0.951), val loss 2.310' for summary lines."""
    return (f"R-precision {metrics['r_precision']:.3f} ± {metrics['r_precision_std']:.3f} "
            f"(in-batch {metrics['r_precision_in_batch']:.3f}, "
            f"{int(metrics['candidates'])} candidates), val loss {metrics['val_loss']:.3f}")


# --------------------------------------------------------------------------------------------
# GAN runs (cpgan.trainer.gan, cpgan.trainer.sampling)

RUN_STEM = "cpgan"
RUNS_DIR = "runs"
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
GAN_RECORD_NAME = "gan.provenance.json"  # the gan stage's provenance, in the run folder
# How often a GAN run writes its checkpoint, sample grid and metrics line (steps): the
# trainer's defaults and cpgan-train's option defaults, which --help shows without torch
GAN_CHECKPOINT_EVERY = 500
GAN_SAMPLE_EVERY = 500
GAN_LOG_EVERY = 10
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def run_name(use_memory: bool = True, use_objects: bool = True, use_fgcd: bool = True) -> str:
    """``cpgan`` plus ``-no-memory``, ``-no-oaie``, ``-no-fgcd`` (in this order) per switch off."""
    return (RUN_STEM + ("" if use_memory else "-no-memory") + ("" if use_objects else "-no-oaie")
            + ("" if use_fgcd else "-no-fgcd"))


def check_run_name(name: str) -> str:
    """A run name is one plain folder name (no path separators, no leading dot)."""
    if not _RUN_NAME.fullmatch(name):
        raise CpganError(f"run name {name!r}: use letters, digits, '.', '_' and '-' only, "
                         "starting with a letter or digit")
    return name


def run_dir(root: Path, name: str) -> Path:
    """``runs/<name>`` under the artifacts folder ``root``; the name is checked."""
    return Path(root) / RUNS_DIR / check_run_name(name)


def checkpoint_file(folder: Path) -> Path:
    return Path(folder) / CHECKPOINT_NAME


def metrics_file(folder: Path) -> Path:
    return Path(folder) / METRICS_NAME


def default_checkpoint(artifacts: Path) -> Path:
    """The most recently modified ``runs/*/checkpoint.pt`` under ``artifacts``, else
    ``runs/cpgan/checkpoint.pt`` (the full model's run, whose absence is then reported)."""
    found = [p for p in (Path(artifacts) / RUNS_DIR).glob(f"*/{CHECKPOINT_NAME}") if p.is_file()]
    if found:
        return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)))
    return Path(artifacts) / RUNS_DIR / RUN_STEM / CHECKPOINT_NAME


def under_torchrun() -> bool:
    """Whether torchrun's variables are set; without them a run is one process
    (cpgan.trainer.gan.distributed_from_env reads and checks them)."""
    return any(key in os.environ for key in TORCHRUN_ENV)
