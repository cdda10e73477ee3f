"""``cpgan-prep detect``: YOLOv3 top-36 regions and their features for every image (§3.2.1).

The split's images are cut into shards of ``shard_size`` in image-id order; each shard is one
dask task that decodes its images (in a background thread, so JPEG decoding overlaps the
forward pass), letterboxes them, runs the detector, maps the boxes back to original pixels and
writes ``regions/<split>-NNNNN.h5`` atomically. Each worker process loads the detector once.

A shard whose file exists with the same provenance (detector and cfg digests, parameters, image
ids, code version) is reused, so a killed run resumes where it stopped and gives the same
files. Images that fail to decode have no row in their shard: the shard's ``failures``
attribute and the ``status`` column of ``regions/index.parquet`` keep their reason.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cpgan import __version__
from cpgan.errors import CpganError
from cpgan.pipeline import regions as store
from cpgan.pipeline.artifacts import fingerprint, folder_lock, sweep_temporaries
from cpgan.pipeline.cluster import run_tasks
from cpgan.pipeline.coco import CocoSplit, iter_images
from cpgan.torch_file import load_torch_file, refuse_nonfinite


@dataclass(frozen=True)
class DetectSettings:
    """Everything a worker needs, as plain data so dask can ship it to another machine."""

    coco_root: str
    split: str
    cfg: str
    weights: str
    input_size: int
    feature_layer: int
    num_regions: int
    score_threshold: float
    nms_iou: float
    batch_size: int = 16
    device: str = "cpu"

    def provenance(self, image_ids: Sequence[int]) -> dict[str, Any]:
        """What decides a shard's content: a shard with equal provenance can be reused."""
        ids = np.asarray(image_ids, dtype=np.int64).tobytes()
        return {
            "cfg_sha256": fingerprint(Path(self.cfg))["sha256"],
            "weights_sha256": fingerprint(Path(self.weights))["sha256"],
            "input_size": self.input_size,
            "feature_layer": self.feature_layer,
            "num_regions": self.num_regions,
            "score_threshold": self.score_threshold,
            "nms_iou": self.nms_iou,
            "image_ids_sha256": hashlib.sha256(ids).hexdigest(),
            "version": __version__,
        }


# ------------------------------------------------------------------------------ the detector


def load_detector(cfg: str | Path, weights: str | Path) -> "torch.nn.Module":
    """A Darknet from ``cfg`` with ``weights``: a Darknet ``.weights`` file or the state-dict
    file ``models/detector.pt`` written by ``train-detector`` (loaded with weights_only)."""
    return load_detector_record(cfg, weights)[0]


def load_detector_record(cfg: str | Path, weights: str | Path) -> tuple["torch.nn.Module", dict]:
    """``load_detector`` and what else the weights file records: the whole ``detector.pt`` dict
    (its ``category_ids`` and ``class_names``), or ``{}`` for a Darknet ``.weights`` file, which
    records nothing but weights. One read of the file serves both."""
    from cpgan.model.darknet import Darknet, read_weights

    model = Darknet.from_cfg_file(cfg)
    weights = Path(weights)
    if not weights.is_file():
        raise CpganError(f"{weights}: detector weights not found (train one with "
                         "'cpgan-prep train-detector' or pass --weights)")
    record: dict = {}
    if weights.suffix == ".pt":
        record = _load_state_file(model, weights)
    else:
        read_weights(model, weights)
    return model.eval().requires_grad_(False), record


def _load_state_file(model: torch.nn.Module, path: Path) -> dict:
    data = load_torch_file(path, "detector state-dict file")
    state = data.get("state_dict") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CpganError(f"{path}: expected a dict with a 'state_dict' of tensors")
    expected = model.state_dict()
    if state.keys() != expected.keys():
        raise CpganError(f"{path}: its layers do not match {model.source}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CpganError(f"{path}: {key} has shape {tuple(tensor.shape)}, "
                             f"{model.source} needs {tuple(expected[key].shape)}")
    refuse_nonfinite(path, state, "'state_dict'")
    negative = next((k for k, v in state.items() if k.endswith("running_var") and
                     v.layout == torch.strided and bool((v < 0).any())), None)
    if negative:  # as read_weights refuses: every output would be NaN
        raise CpganError(f"{path}: {negative} holds a negative batch-norm variance")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # a sparse or quantized tensor of the right shape
        raise CpganError(f"{path}: its weights cannot be loaded into {model.source} "
                         f"({str(exc).strip().splitlines()[-1].strip()})") from None
    return data


_WORKER_CACHE: dict[tuple, Any] = {}


def _extractor(settings: DetectSettings) -> Any:
    """The region extractor of this worker process, built once per detector."""
    from cpgan.model.darknet import for_cpu_inference
    from cpgan.model.yolo import YoloRegionExtractor

    key = (settings.cfg, settings.weights, settings.device, settings.feature_layer,
           settings.num_regions, settings.score_threshold, settings.nms_iou)
    if key not in _WORKER_CACHE:
        darknet = load_detector(settings.cfg, settings.weights)
        if settings.device == "cpu":
            darknet = for_cpu_inference(darknet)
        extractor = YoloRegionExtractor(darknet, settings.feature_layer, settings.num_regions,
                                        settings.score_threshold, settings.nms_iou)
        _WORKER_CACHE.clear()
        _WORKER_CACHE[key] = extractor.to(settings.device)
    return _WORKER_CACHE[key]


# ------------------------------------------------------------------------------ one shard


def _batches(split: CocoSplit, image_ids: Sequence[int], size: int, input_size: int,
             ) -> Iterator[tuple[list[tuple[int, str]], list, list[int], torch.Tensor | None]]:
    """(failures, letterbox metas, ok ids, input batch) per batch, prepared one batch ahead
    in a background thread so decoding overlaps inference."""
    from cpgan.model.yolo import letterbox

    def prepare(ids: Sequence[int]):
        failures, metas, ok, tensors = [], [], [], []
        for image_id, image, reason in iter_images(split, ids):
            if image is None:
                failures.append((image_id, reason))
                continue
            tensor, meta = letterbox(image, input_size)
            ok.append(image_id)
            metas.append(meta)
            tensors.append(tensor)
        return failures, metas, ok, torch.stack(tensors) if tensors else None

    chunks = [image_ids[i:i + size] for i in range(0, len(image_ids), size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, chunks[0]) if chunks else None
        for index in range(len(chunks)):
            batch = pending.result()
            if index + 1 < len(chunks):
                pending = pool.submit(prepare, chunks[index + 1])
            yield batch


@torch.no_grad()
def _detect_rows(extractor: Any, batch: torch.Tensor, metas: list, device: str) -> dict[str, np.ndarray]:
    from cpgan.model.yolo import unletterbox_boxes

    layout = torch.channels_last if device == "cpu" else torch.contiguous_format
    out = extractor(batch.to(device, memory_format=layout))
    boxes = torch.stack([
        unletterbox_boxes(out.boxes[i].cpu(), meta) * (out.labels[i].cpu() >= 0).unsqueeze(-1)
        for i, meta in enumerate(metas)
    ])
    return {
        "boxes": boxes.numpy(),
        "scores": out.scores.cpu().numpy(),
        "labels": out.labels.cpu().numpy(),
        "num_regions": out.num_regions.cpu().numpy(),
        "features": out.features.cpu().to(torch.float16).numpy(),
    }


def run_shard(settings: DetectSettings, shard: int, image_ids: list[int], out_dir: str) -> int:
    """Detect one shard and write it atomically; returns the number of images processed.

    Runs inside a dask worker: it opens the split and the detector itself (both cached for
    the worker's lifetime) so nothing heavy travels over the network.
    """
    # One torch thread per task: CPU kernels sum in a thread-count-dependent order, and the
    # shards must not depend on how many workers ran them. Use --workers for more cores.
    torch.set_num_threads(1)
    split = _split(settings.coco_root, settings.split)
    extractor = _extractor(settings)
    parts: list[dict[str, np.ndarray]] = []
    ok_ids: list[int] = []
    failures: list[dict[str, Any]] = []
    for bad, metas, ok, batch in _batches(split, image_ids, settings.batch_size, settings.input_size):
        failures += [{"image_id": i, "reason": r} for i, r in bad]
        if batch is not None:
            parts.append(_detect_rows(extractor, batch, metas, settings.device))
            ok_ids += ok
    if parts:
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    else:
        slots, dim = settings.num_regions, extractor.feature_dim
        arrays = {"boxes": np.zeros((0, slots, 4)), "scores": np.zeros((0, slots)),
                  "labels": np.zeros((0, slots)), "num_regions": np.zeros(0),
                  "features": np.zeros((0, slots, dim))}
    rows = store.RegionRows(image_ids=np.asarray(ok_ids), **arrays)
    attrs = {
        "provenance": settings.provenance(image_ids),
        "failures": failures,
        "detector": Path(settings.weights).name,
        "input_size": settings.input_size,
        "feature_layer": settings.feature_layer,
    }
    store.write_shard(Path(out_dir) / store.shard_name(settings.split, shard), rows, attrs)
    return len(image_ids)


_SPLIT_CACHE: dict[tuple[str, str], CocoSplit] = {}


def _split(root: str, split: str) -> CocoSplit:
    if (root, split) not in _SPLIT_CACHE:
        _SPLIT_CACHE[(root, split)] = CocoSplit.open(Path(root), split)
    return _SPLIT_CACHE[(root, split)]


# ------------------------------------------------------------------------------ the stage


def plan_shards(image_ids: Sequence[int], shard_size: int) -> list[list[int]]:
    """Image ids in ascending order, cut into shards of ``shard_size``."""
    ids = sorted(image_ids)
    return [ids[i:i + shard_size] for i in range(0, len(ids), shard_size)]


def pending_shards(settings: DetectSettings, shards: list[list[int]], out_dir: Path) -> list[int]:
    """Shards with no sound finished file of the same provenance."""
    pending = []
    for index, ids in enumerate(shards):
        path = out_dir / store.shard_name(settings.split, index)
        attrs = store.shard_attrs(path)
        if (attrs is None or attrs.get("provenance") != settings.provenance(ids)
                or not store.shard_is_sound(path)):
            pending.append(index)
    return pending


def remove_unplanned_shards(split: str, count: int, out_dir: Path) -> list[Path]:
    """Delete shards of ``split`` beyond ``count`` (an earlier run over more images)."""
    planned = {store.shard_name(split, i) for i in range(count)}
    removed = [p for p in out_dir.glob(f"{split}-*.h5") if p.name not in planned]
    for path in removed:
        path.unlink()
    return removed


def build_index(split: CocoSplit, settings: DetectSettings, shards: list[list[int]],
                out_dir: Path) -> tuple[pa.Table, int]:
    """The index rows of this split, read back from the finished shards."""
    columns: dict[str, list] = {name: [] for name in store.INDEX_SCHEMA.names}
    failed = 0
    for index, ids in enumerate(shards):
        with store.RegionShard(out_dir / store.shard_name(settings.split, index)) as shard:
            rows = {int(i): r for r, i in enumerate(shard.read("image_id"))}
            reasons = {f["image_id"]: f["reason"] for f in shard.attrs["failures"]}
        for image_id in ids:
            info = split.image_info(image_id)
            ok = image_id in rows
            failed += not ok
            for name, value in (("image_id", image_id), ("file_name", info["file_name"]),
                                ("split", settings.split), ("shard", index),
                                ("row", rows.get(image_id, -1)), ("width", info["width"]),
                                ("height", info["height"]),
                                ("status", store.STATUS_OK if ok else reasons.get(image_id, "missing"))):
                columns[name].append(value)
    return pa.table(columns, schema=store.INDEX_SCHEMA), failed


def merge_index(index_path: Path, split: str, table: pa.Table) -> pa.Table:
    """Replace ``split``'s rows of an existing index with ``table``."""
    if not index_path.exists():
        return table
    previous = store.read_index(index_path)
    keep = pc.not_equal(previous["split"], split)
    return pa.concat_tables([previous.filter(keep), table])


def detect(split: CocoSplit, settings: DetectSettings, out_dir: Path, *, shard_size: int,
           limit: int | None, workers: int, scheduler: str | None,
           progress: bool = True) -> tuple[dict[str, Any], list[Path]]:
    """Run the stage for one split; returns a summary and the split's shard paths."""
    out_dir = Path(out_dir).resolve()  # workers of a --scheduler cluster have another cwd
    with folder_lock(out_dir, "detect"):
        return _detect(split, settings, out_dir, shard_size=shard_size, limit=limit,
                       workers=workers, scheduler=scheduler, progress=progress)


def _detect(split: CocoSplit, settings: DetectSettings, out_dir: Path, *, shard_size: int,
            limit: int | None, workers: int, scheduler: str | None,
            progress: bool) -> tuple[dict[str, Any], list[Path]]:
    sweep_temporaries(out_dir)
    image_ids = split.image_ids()[:limit] if limit else split.image_ids()
    shards = plan_shards(image_ids, shard_size)
    remove_unplanned_shards(settings.split, len(shards), out_dir)
    pending = pending_shards(settings, shards, out_dir)
    tasks = [(settings, i, shards[i], str(out_dir)) for i in pending]
    run_tasks(run_shard, tasks, workers=workers, scheduler=scheduler, total=len(image_ids),
              initial=len(image_ids) - sum(len(shards[i]) for i in pending),
              description=f"detect {settings.split}", unit="img", progress=progress)
    # a worker killed mid-write leaves its temporary; dask has since redone its task elsewhere
    sweep_temporaries(out_dir, f"{settings.split}-")
    table, failed = build_index(split, settings, shards, out_dir)
    index_path = out_dir / store.INDEX_NAME
    store.write_index(index_path, merge_index(index_path, settings.split, table))
    summary = {"images": len(image_ids), "failed": failed, "shards": len(shards),
               "reused_shards": len(shards) - len(pending)}
    paths = [out_dir / store.shard_name(settings.split, i) for i in range(len(shards))]
    return summary, paths
