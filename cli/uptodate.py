"""The file names and small rules the commands' up-to-date checks need, restated without
importing the modules that own them.

The owners (``cpgan.trainer.*``, ``cpgan.pipeline.coco``) import torch, torchvision or OpenCV,
about 5 s before a command can say anything; a command whose stage is up to date decides so
with what is here and never imports them. tests/test_cli_skip.py checks that every name and
rule here agrees with its owner's, and that an up-to-date command imports no torch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# cpgan.pipeline.coco


def annotation_file(root: Path, kind: str, split: str) -> Path:
    """``root/annotations/{captions,instances}_{split}.json`` of the official layout."""
    return Path(root) / "annotations" / f"{kind}_{split}.json"


# cpgan.pipeline.regions and cpgan.pipeline.memory

REGION_INDEX_NAME = "index.parquet"
MEMORY_NAME = "memory.h5"

# cpgan.trainer.captioner

CAPTIONER_NAME = "captioner.pt"
CAPTIONER_TRAIN_SPLIT = "train2014"
CAPTIONER_VAL_SPLIT = "val2014"


def split_shards(regions_dir: Path, split: str) -> list[Path]:
    """The split's region shards ``<split>-NNNNN.h5`` in shard order."""
    pattern = re.compile(rf"{re.escape(split)}-\d{{5}}\.h5")
    return sorted(p for p in Path(regions_dir).glob(f"{split}-*.h5") if pattern.fullmatch(p.name))


# cpgan.trainer.classifier

CLASSIFIER_NAME = "classifier.pt"
CLASSIFIER_TRAIN_SPLIT = "train2014"
CLASSIFIER_VAL_SPLIT = "val2014"
CLASSIFIER_EPOCHS = 30
CLASSIFIER_BATCH_SIZE = 32
CLASSIFIER_LR = 3e-3

# cpgan.trainer.damsm

DAMSM_VARIANTS = ((True, True), (False, True), (True, False), (False, False))


def damsm_name(use_memory: bool = True, use_objects: bool = True) -> str:
    """``damsm``, ``damsm-no-memory``, ``damsm-no-oaie`` or ``damsm-no-memory-no-oaie``."""
    return "damsm" + ("" if use_memory else "-no-memory") + ("" if use_objects else "-no-oaie")


def damsm_path(models_dir: Path, use_memory: bool = True, use_objects: bool = True) -> Path:
    return Path(models_dir) / f"{damsm_name(use_memory, use_objects)}.pt"


def damsm_record(model: Path) -> Path:
    """``models/<name>.provenance.json`` beside ``models/<name>.pt``."""
    return model.with_name(f"{model.stem}.provenance.json")


def damsm_files(models_dir: Path) -> list[Path]:
    """Every encoder variant file present in ``models_dir``, in the order of DAMSM_VARIANTS."""
    found = [damsm_path(models_dir, memory, objects) for memory, objects in DAMSM_VARIANTS]
    return [path for path in found if path.is_file()]


def describe_damsm_metrics(metrics: dict[str, float]) -> str:
    """'R-precision 0.934 ± 0.021 (in-batch 0.951), val loss 2.310' for summary lines."""
    return (f"R-precision {metrics['r_precision']:.3f} ± {metrics['r_precision_std']:.3f} "
            f"(in-batch {metrics['r_precision_in_batch']:.3f}, "
            f"{int(metrics['candidates'])} candidates), val loss {metrics['val_loss']:.3f}")


# cpgan.trainer.gan and cpgan.trainer.sampling

RUN_STEM = "cpgan"
RUNS_DIR = "runs"
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def run_name(use_memory: bool = True, use_objects: bool = True, use_fgcd: bool = True) -> str:
    """``cpgan`` plus ``-no-memory``, ``-no-oaie``, ``-no-fgcd`` (in this order) per switch off."""
    return (RUN_STEM + ("" if use_memory else "-no-memory") + ("" if use_objects else "-no-oaie")
            + ("" if use_fgcd else "-no-fgcd"))


def is_plain_run_name(name: str) -> bool:
    """What cpgan.trainer.gan.check_run_name accepts (it also says why it refuses a name)."""
    return _RUN_NAME.fullmatch(name) is not None


def under_torchrun() -> bool:
    """Whether torchrun's variables are set (cpgan.trainer.gan.distributed_from_env reads and
    checks them; without them a run is one process)."""
    return any(key in os.environ for key in TORCHRUN_ENV)


def default_checkpoint(artifacts: Path) -> Path:
    """The most recently modified ``runs/*/checkpoint.pt`` under ``artifacts``, else
    ``runs/cpgan/checkpoint.pt``."""
    found = [p for p in (Path(artifacts) / RUNS_DIR).glob(f"*/{CHECKPOINT_NAME}") if p.is_file()]
    if found:
        return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)))
    return Path(artifacts) / RUNS_DIR / RUN_STEM / CHECKPOINT_NAME
