"""The region artifacts of DESIGN §3: ``regions/<split>-NNNNN.h5`` shards and
``regions/index.parquet``.

A shard holds, for each image that decoded and ran through the detector, the top-R boxes (x1,
y1, x2, y2 in original-image pixels), their scores and 80-class (or toy-class) labels (-1 =
padding), the number of real regions, and an R x D feature per box stored as float16, chunked one
image per chunk so a reader gathering a few rows touches only those. Shard attributes record the
provenance that decides whether a finished shard can be reused, and the images of the shard that
failed with their reasons (they have no row). Every reader validates shapes and dtypes before
trusting a file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cpgan import layout
from cpgan.errors import CpganError, one_line
from cpgan.pipeline.artifacts import atomic_write, read_parquet

INDEX_NAME = layout.REGION_INDEX_NAME  # in cpgan.layout: read without torch
INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("split", pa.string()),
        ("shard", pa.int32()),
        ("row", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
    ]
)
STATUS_OK = "ok"


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.h5"


@dataclass
class RegionRows:
    """The detector's output for n images, as stored in a shard."""

    image_ids: np.ndarray  # int64 [n]
    boxes: np.ndarray  # float32 [n, R, 4]
    scores: np.ndarray  # float32 [n, R]
    labels: np.ndarray  # int16 [n, R]
    num_regions: np.ndarray  # int16 [n]
    features: np.ndarray  # float16 [n, R, D]

    def __post_init__(self) -> None:
        self.image_ids = np.asarray(self.image_ids, dtype=np.int64)
        self.boxes = np.asarray(self.boxes, dtype=np.float32)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int16)
        self.num_regions = np.asarray(self.num_regions, dtype=np.int16)
        self.features = np.asarray(self.features, dtype=np.float16)
        n, regions = len(self.image_ids), self.boxes.shape[1] if self.boxes.ndim == 3 else -1
        expected = {
            "boxes": (n, regions, 4),
            "scores": (n, regions),
            "labels": (n, regions),
            "num_regions": (n,),
        }
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {shape}")
        if self.features.ndim != 3 or self.features.shape[:2] != (n, regions):
            raise ValueError(f"features has shape {self.features.shape}, expected ({n}, {regions}, D)")


def write_shard(path: Path, rows: RegionRows, attrs: dict[str, Any]) -> None:
    """Write one shard atomically; ``attrs`` values are stored as JSON text."""
    n, regions, dim = rows.features.shape
    with atomic_write(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("image_id", data=rows.image_ids)
            f.create_dataset("boxes", data=rows.boxes)
            f.create_dataset("scores", data=rows.scores)
            f.create_dataset("labels", data=rows.labels)
            f.create_dataset("num_regions", data=rows.num_regions)
            f.create_dataset(
                "features",
                shape=(n, regions, dim),
                dtype=np.float16,
                chunks=(1, regions, dim) if n else None,
                data=rows.features if n else None,
            )
            for key, value in attrs.items():
                f.attrs[key] = json.dumps(value, sort_keys=True)


_DTYPES = {
    "image_id": np.int64,
    "boxes": np.float32,
    "scores": np.float32,
    "labels": np.int16,
    "num_regions": np.int16,
    "features": np.float16,
}


def shard_attrs(path: Path) -> dict[str, Any] | None:
    """The JSON attributes of a readable shard, or None when it is unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return {key: json.loads(value) for key, value in f.attrs.items()}
    except (OSError, ValueError, TypeError):
        return None


def shard_is_sound(path: Path) -> bool:
    """Does ``path`` open as a region shard that passes :class:`RegionShard`'s checks?

    A shard whose attributes survived but whose datasets did not (a disk fault, a hand edit)
    must be computed again rather than stop every later run that reads it.
    """
    try:
        with RegionShard(path) as shard:
            shard.read("image_id")
    except (CpganError, OSError, KeyError, ValueError):
        return False
    return True


class RegionShard:
    """A validated, open region shard. Use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise CpganError(f"{self.path}: region shard is missing") from None
        except OSError as exc:
            raise CpganError(f"{self.path}: not a readable HDF5 file "
                             f"({one_line(exc)})") from None
        try:
            self._validate()
        except BaseException:
            self._file.close()
            raise

    def _validate(self) -> None:
        f = self._file
        for name, dtype in _DTYPES.items():
            if not isinstance(f.get(name), h5py.Dataset):  # get: a dangling link is missing
                raise CpganError(f"{self.path}: dataset '{name}' is missing")
            if f[name].dtype != dtype:
                raise CpganError(f"{self.path}: '{name}' is {f[name].dtype}, expected {np.dtype(dtype)}")
        if f["image_id"].ndim != 1:
            raise CpganError(f"{self.path}: 'image_id' has shape {f['image_id'].shape}, expected (n,)")
        n = f["image_id"].shape[0]
        regions = f["boxes"].shape[1] if f["boxes"].ndim == 3 else -1
        expected = {"boxes": (n, regions, 4), "scores": (n, regions), "labels": (n, regions),
                    "num_regions": (n,)}
        for name, shape in expected.items():
            if f[name].shape != shape:
                raise CpganError(f"{self.path}: '{name}' has shape {f[name].shape}, expected {shape}")
        if f["features"].ndim != 3 or f["features"].shape[:2] != (n, regions):
            raise CpganError(f"{self.path}: 'features' has shape {f['features'].shape}, expected ({n}, {regions}, D)")
        try:
            counts = f["num_regions"][:]
        except OSError as exc:
            raise CpganError(f"{self.path}: cannot read 'num_regions' "
                             f"({one_line(exc)})") from None
        if n and (counts.min() < 0 or counts.max() > regions):
            raise CpganError(f"{self.path}: 'num_regions' outside 0..{regions}")

    def __enter__(self) -> "RegionShard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return int(self._file["image_id"].shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self._file["features"].shape[2])

    @property
    def num_slots(self) -> int:
        return int(self._file["boxes"].shape[1])

    @property
    def attrs(self) -> dict[str, Any]:
        return {key: json.loads(value) for key, value in self._file.attrs.items()}

    def read(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Rows of one dataset (all rows when ``rows`` is None); ``rows`` arrays must be sorted."""
        if name not in _DTYPES:
            raise KeyError(name)
        dataset = self._file[name]
        return dataset[:] if rows is None else dataset[rows]

    def rows(self, rows: slice | None = None) -> RegionRows:
        sel = slice(None) if rows is None else rows
        return RegionRows(**{("image_ids" if k == "image_id" else k): self.read(k, sel) for k in _DTYPES})


def write_index(path: Path, table: pa.Table) -> None:
    """Write ``regions/index.parquet`` atomically, rows sorted by split then image id."""
    table = table.cast(INDEX_SCHEMA).sort_by([("split", "ascending"), ("image_id", "ascending")])
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)


def read_index(path: Path) -> pa.Table:
    """Read and validate ``regions/index.parquet``."""
    table = read_parquet(path, "region index is missing (run 'cpgan-prep detect')")
    if not table.schema.equals(INDEX_SCHEMA):
        raise CpganError(f"{path}: columns {table.schema.names} do not match the region index "
                         "schema")
    return table
