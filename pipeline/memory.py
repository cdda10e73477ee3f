"""The per-word memory of §3.2.1, Eq. 7: ``memory.h5`` and ``memory_index.parquet``.

For word r, its relevant images are those with a caption containing r. Eq. 7 leaves two
choices open and DESIGN §4 fixes them:

* an image's relevance to r is the largest attention weight a_{q_n,n} over that image's
  occurrences of r (every caption, every position); the occurrence reaching it supplies the
  region q_n whose feature v_{q_n,n} enters the memory;
* only the K most relevant images are kept (the paper's top-K "to avoid feature pollution"),
  and m_r = sum_k a_k v_k / sum_k a_k over them.

Ties never depend on partitioning or scheduling: images of equal relevance are taken in
ascending image id; within an image, among the occurrences reaching its maximum, the one with
the smallest (caption_id, position) gives the region. Special tokens never get a memory
(``<unk>`` stands for many different rare words, the others are not words): like every word
without a relevant image they get a zero vector and support 0.

Streaming. The attention table (~4.3 M rows on COCO) is never held whole. Each attention part
(one per region shard) is one dask partition that a worker reduces to at most K rows per word;
these states merge in a tree. Every image's rows sit in one part (checked from the parts'
image-id ranges), so an image's relevance is final within its part, the top-K of merged states
is exact, and N (the word's relevant-image count, carried on the first row of each word) adds
up. The client ends with O(V*K) rows and reads their region features itself, from the HDF5
shards in shard/row order, each needed row once (it has to hold those vectors anyway; reading
them on workers only added their transfer). The weighted means are taken in rank order
(float64 sums, stored float32), so the output is bit-identical whatever the number of workers,
the partitioning or the shard size.

``memory_index.parquet`` has one row per chosen region, sorted by (word_id, rank), rank 0 the
most relevant image; the region's box (original pixels) is four float32 columns box_x1, box_y1,
box_x2, box_y2. ``memory.h5`` is written last, so it exists only when both files are complete;
it records the fingerprints of its inputs, and a rerun with the same inputs and parameters
reuses it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cpgan import __version__, layout
from cpgan.errors import CpganError, ItemError, one_line
from cpgan.pipeline import artifacts
from cpgan.pipeline import regions as store
from cpgan.pipeline.artifacts import TMP_PREFIX, atomic_write, atomic_write_text, fingerprint
from cpgan.pipeline.attention_table import ATTENTION_SCHEMA
from cpgan.pipeline.cluster import local_cluster
from cpgan.pipeline.text import SPECIALS, Vocabulary

if TYPE_CHECKING:  # the dask workers import this module: keep torch and OpenCV out of them
    import torch

    from cpgan.pipeline.coco import CocoSplit

MEMORY_NAME = layout.MEMORY_NAME  # in cpgan.layout: read without torch
INDEX_NAME = "memory_index.parquet"
PURITY_NAME = "memory_purity.json"
VOCAB_NAME = layout.VOCAB_NAME
ATTENTION_DIR = "attention"
REGIONS_DIR = "regions"

BOX_COLUMNS = ("box_x1", "box_y1", "box_x2", "box_y2")
MEMORY_INDEX_SCHEMA = pa.schema([
    ("word_id", pa.int32()),
    ("word", pa.string()),
    ("rank", pa.int16()),
    ("image_id", pa.int64()),
    ("caption_id", pa.int64()),
    ("position", pa.int16()),
    ("region", pa.int16()),
    ("weight", pa.float32()),
    *((name, pa.float32()) for name in BOX_COLUMNS),
])

WEIGHT_TOLERANCE = 1e-6
"""Softmax weights may round a hair above 1; anything beyond is not an attention weight."""
FEATURE_BATCH = 64
"""Feature rows per HDF5 read: 64 x 36 x 1024 float16 is 4.7 MB."""
WORD_BLOCK = 4096
"""Words per block of the float64 accumulation of Eq. 7 (4096 x 1024 x 8 bytes = 32 MB)."""
SPLIT_EVERY = 8
"""Fan-in of the tree that merges the per-part top-K states."""

_STATE_DTYPES = {
    "word_id": np.int32, "image_id": np.int64, "caption_id": np.int64, "position": np.int16,
    "region": np.int16, "weight": np.float32, "relevant": np.int64,
}


# ------------------------------------------------------------------------- attention parts


def attention_parts(root: Path, split: str) -> list[Path]:
    """The split's ``attention/<split>-NNNNN.parquet`` parts, in part order."""
    folder = Path(root) / ATTENTION_DIR
    pattern = re.compile(rf"{re.escape(split)}-\d{{5}}\.parquet")
    parts = sorted(p for p in folder.glob(f"{split}-*.parquet") if pattern.fullmatch(p.name))
    if not parts:
        raise CpganError(f"{folder}: no attention parts for {split} (run 'cpgan-prep attend')")
    return parts


def _schema_problem(schema: pa.Schema) -> str | None:
    """What differs from ATTENTION_SCHEMA (column order and nullability aside), or None."""
    found = {field.name: field.type for field in schema}
    for field in ATTENTION_SCHEMA:
        if field.name not in found:
            return f"column '{field.name}' is missing"
        if found[field.name] != field.type:
            return f"column '{field.name}' is {found[field.name]}, expected {field.type}"
    extra = sorted(set(found) - set(ATTENTION_SCHEMA.names))
    return f"unexpected columns {extra}" if extra else None


def _part_image_range(path: Path) -> tuple[int, int] | None:
    """(min, max) image id of a part from its footer statistics (column read if absent);
    None when the part has no rows. The schema is checked here, before any worker starts."""
    try:
        meta = pq.ParquetFile(path).metadata
        problem = _schema_problem(meta.schema.to_arrow_schema())
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise CpganError(f"{path}: not a readable Parquet file "
                         f"({one_line(exc)})") from None
    if problem:
        raise CpganError(f"{path}: not an attention part: {problem}")
    column = meta.schema.names.index("image_id")
    lows, highs = [], []
    for group in range(meta.num_row_groups):
        row_group = meta.row_group(group)
        if row_group.num_rows == 0:
            continue
        stats = row_group.column(column).statistics
        if stats is None or not stats.has_min_max:
            values = artifacts.read_parquet(path, "attention part is missing",
                                            columns=["image_id"])["image_id"]
            if len(values) != meta.num_rows:
                raise CpganError(f"{path}: not a readable Parquet file (column 'image_id' has "
                                 f"{len(values)} values for {meta.num_rows} rows)")
            if values.null_count:
                raise CpganError(f"{path}: column 'image_id' has null values")
            bounds = pc.min_max(values)
            return int(bounds["min"].as_py()), int(bounds["max"].as_py())
        lows.append(stats.min)
        highs.append(stats.max)
    return (int(min(lows)), int(max(highs))) if lows else None


def check_parts(parts: Sequence[Path]) -> None:
    """Refuse parts that do not follow the attention schema or whose image-id ranges overlap:
    relevant-image counts add up across parts only when each image sits in one part."""
    ranges = sorted((bounds, path) for path in parts if (bounds := _part_image_range(path)))
    for (before, before_path), (after, path) in zip(ranges, ranges[1:]):
        if after[0] <= before[1]:
            raise CpganError(
                f"{path}: image ids {after[0]}..{after[1]} overlap those of {before_path.name} "
                f"({before[0]}..{before[1]}); each image's attention rows must sit in one part")


def read_attention_part(path: str | Path, vocab_size: int, index_path: str | Path,
                        split: str) -> pd.DataFrame:
    """One attention part's non-special rows, after checking the contract: exact column types,
    no nulls, word ids inside the vocabulary, regions >= 0, weights finite in (0, 1], every
    image detected (an ``ok`` row of the split in ``regions/index.parquet``)."""
    path = Path(path)
    table = artifacts.read_parquet(path, "attention part is missing")
    if problem := _schema_problem(table.schema):
        raise CpganError(f"{path}: not an attention part: {problem}")
    for name in ATTENTION_SCHEMA.names:
        if table.column(name).null_count:
            raise CpganError(f"{path}: column '{name}' has null values")
    frame = table.select(ATTENTION_SCHEMA.names).to_pandas()
    _check_values(path, frame, vocab_size)
    _check_order(path, frame)
    images = frame["image_id"].unique()
    missing = images[~np.isin(images, _detected_images(Path(index_path), split))]
    if missing.size:
        raise CpganError(f"{path}: image id {missing.min()} has attention rows but no detected "
                         f"regions in {split} ({index_path})")
    keep = frame["word_id"].to_numpy() >= len(SPECIALS)
    return frame[keep].reset_index(drop=True)


_DETECTED: dict[tuple[str, str, int], np.ndarray] = {}


def _detected_images(index_path: Path, split: str) -> np.ndarray:
    """The split's detected image ids, read once per worker process and index version."""
    try:
        key = (str(index_path), split, index_path.stat().st_mtime_ns)
    except FileNotFoundError:
        raise CpganError(f"{index_path}: region index is missing "
                         "(run 'cpgan-prep detect')") from None
    if key not in _DETECTED:
        table = split_index(store.read_index(index_path), split)
        table = table.filter(pc.equal(table["status"], store.STATUS_OK))
        _DETECTED.clear()
        _DETECTED[key] = table["image_id"].to_numpy()
    return _DETECTED[key]


def _check_order(path: Path, frame: pd.DataFrame) -> None:
    """Rows strictly increasing in (image_id, caption_id, position), as the contract says;
    the tie-break on caption and position relies on it."""
    image, caption = frame["image_id"].to_numpy(), frame["caption_id"].to_numpy()
    position = frame["position"].to_numpy().astype(np.int32)
    step_image, step_caption, step_position = np.diff(image), np.diff(caption), np.diff(position)
    ordered = (step_image > 0) | ((step_image == 0) & (
        (step_caption > 0) | ((step_caption == 0) & (step_position > 0))))
    if not ordered.all():
        row = int(np.flatnonzero(~ordered)[0]) + 1
        raise CpganError(f"{path}: rows are not sorted by (image_id, caption_id, position) "
                         f"at row {row}")


def _check_values(path: Path, frame: pd.DataFrame, vocab_size: int) -> None:
    word = frame["word_id"].to_numpy()
    bad = np.flatnonzero((word < 0) | (word >= vocab_size))
    if bad.size:
        raise CpganError(f"{path}: word id {word[bad[0]]} is outside the vocabulary of "
                         f"{vocab_size} tokens")
    region = frame["region"].to_numpy()
    if (region < 0).any():
        raise CpganError(f"{path}: negative region index {region.min()}")
    weight = frame["weight"].to_numpy()
    bad = np.flatnonzero(~(np.isfinite(weight) & (weight > 0) & (weight <= 1 + WEIGHT_TOLERANCE)))
    if bad.size:
        image = frame["image_id"].iat[bad[0]]
        raise CpganError(f"{path}: weight {weight[bad[0]]} of image {image} is not an attention "
                         "weight in (0, 1]")


# ------------------------------------------------------------------------- top-K selection


def _empty_state() -> pd.DataFrame:
    return pd.DataFrame({name: np.empty(0, dtype) for name, dtype in _STATE_DTYPES.items()})


def _packed_order(keys: Sequence[np.ndarray]) -> np.ndarray:
    """The stable order of rows by ``keys`` (first key most significant), as np.lexsort gives
    it, from one argsort of the keys packed into an int64 when their value ranges fit in 63
    bits (they do at COCO scale, and it is several times faster), else from np.lexsort."""
    if len(keys[0]) == 0:
        return np.zeros(0, dtype=np.int64)
    lows = [int(key.min()) for key in keys]
    bits = [(int(key.max()) - low).bit_length() for key, low in zip(keys, lows)]
    if sum(bits) > 63:
        return np.lexsort(tuple(reversed(keys)))
    packed = np.zeros(len(keys[0]), dtype=np.int64)
    for key, low, width in zip(keys, lows, bits):
        packed = (packed << width) | (key.astype(np.int64) - low)
    return np.argsort(packed, kind="stable")


def _descending(weight: np.ndarray) -> np.ndarray:
    """An integer key sorting positive float32 weights from largest to smallest (their bit
    patterns are ordered like the values)."""
    return -np.ascontiguousarray(weight, dtype=np.float32).view(np.int32).astype(np.int64)


def best_occurrences(part: pd.DataFrame) -> pd.DataFrame:
    """One row per (word, image): the occurrence with the image's largest weight for the word,
    ties to the smallest (caption_id, position). Its weight is the image's relevance. Rows come
    sorted by (image_id, caption_id, position) (checked by the reader), so a stable sort on
    (word, image, -weight) leaves equal weights in caption/position order."""
    word, image = part["word_id"].to_numpy(), part["image_id"].to_numpy()
    order = _packed_order([word, image, _descending(part["weight"].to_numpy())])
    word, image = word[order], image[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (word[1:] != word[:-1]) | (image[1:] != image[:-1])
    return part.iloc[order[first]]


def _keep_top(best: pd.DataFrame, relevant: pd.Series, topk: int) -> pd.DataFrame:
    """The ``topk`` most relevant images of each word (equal relevance: smaller image id first),
    sorted by word then rank. ``relevant`` (N by word) goes on each word's first row and 0 on
    the others, so that the column sums to N whichever states are concatenated."""
    if best.empty:
        return _empty_state()
    word = best["word_id"].to_numpy()
    weight, image = _descending(best["weight"].to_numpy()), best["image_id"].to_numpy()
    order = _packed_order([word, weight, image])
    word = word[order]
    starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = rank < topk
    top = best.iloc[order[keep]].assign(relevant=0)
    counts = relevant.reindex(top["word_id"].to_numpy()).to_numpy()
    top["relevant"] = np.where(rank[keep] == 0, counts, 0)
    return top[list(_STATE_DTYPES)].astype(_STATE_DTYPES).reset_index(drop=True)


def part_state(part: pd.DataFrame, topk: int) -> pd.DataFrame:
    """The reduction's chunk: one part's top-K rows per word and its relevant-image counts."""
    best = best_occurrences(part)
    return _keep_top(best, best.groupby("word_id").size(), topk)


def merge_states(states: pd.DataFrame, topk: int) -> pd.DataFrame:
    """The reduction's combine and aggregate: concatenated states to one state. No (word,
    image) pair is in two states, since no image is in two parts (:func:`check_parts`)."""
    return _keep_top(states, states.groupby("word_id")["relevant"].sum(), topk)


def select_top(client: Any, parts: Sequence[Path], vocab_size: int, topk: int,
               index_path: Path, split: str) -> pd.DataFrame:
    """Per word, its top-K images with the chosen occurrence (word_id, image_id, caption_id,
    position, region, weight), their ``rank`` and ``relevant`` (N, on every row of the word);
    sorted by (word_id, rank). A dask dataframe of one partition per part, tree-reduced."""
    import dask.dataframe as dd

    meta = pd.DataFrame({f.name: np.empty(0, f.type.to_pandas_dtype()) for f in ATTENTION_SCHEMA})
    # absolute paths: the workers of a --scheduler cluster have another cwd
    frame = dd.from_map(read_attention_part, [str(Path(p).resolve()) for p in parts], meta=meta,
                        label="attention-part", vocab_size=vocab_size,
                        index_path=str(Path(index_path).resolve()), split=split)
    reduced = frame.reduction(part_state, aggregate=merge_states, combine=merge_states,
                              meta=_empty_state(), split_every=SPLIT_EVERY, topk=topk)
    state = client.compute(reduced).result()
    word = state["word_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]]) if len(word) else np.zeros(0, int)
    lengths = np.diff(np.r_[starts, len(word)])
    state["rank"] = (np.arange(len(word)) - np.repeat(starts, lengths)).astype(np.int16)
    state["relevant"] = np.repeat(state["relevant"].to_numpy()[starts], lengths)
    return state


# ------------------------------------------------------------------------- region features


def split_index(index: pa.Table, split: str) -> pa.Table:
    """The split's rows of ``regions/index.parquet``."""
    return index.filter(pc.equal(index["split"], split))


def region_shards(root: Path, index: pa.Table, split: str) -> list[Path]:
    """The split's region shards named by the index."""
    numbers = sorted(set(split_index(index, split)["shard"].to_pylist()))
    if not numbers:
        raise CpganError(f"{Path(root) / REGIONS_DIR / store.INDEX_NAME}: no detected images of "
                         f"{split} (run 'cpgan-prep detect --split {split}')")
    return [Path(root) / REGIONS_DIR / store.shard_name(split, n) for n in numbers]


def locate_images(index: pa.Table, index_path: Path, split: str,
                  image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard, row) of each image id; an image without detected regions is an error."""
    table = split_index(index, split)
    table = table.filter(pc.equal(table["status"], store.STATUS_OK))
    ids = table["image_id"].to_numpy()
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    pos = np.minimum(np.searchsorted(ids, image_ids), max(len(ids) - 1, 0))
    found = (ids[pos] == image_ids) if len(ids) else np.zeros(len(image_ids), dtype=bool)
    if not found.all():  # the parts were checked; the index changed during the build
        missing = image_ids[np.flatnonzero(~found)[0]]
        raise CpganError(f"{index_path}: image id {missing} is no longer a detected image of "
                         f"{split}")
    shard = table["shard"].to_numpy()[order][pos]
    row = table["row"].to_numpy()[order][pos]
    return shard.astype(np.int64), row.astype(np.int64)


def iter_feature_rows(shard: store.RegionShard, rows: np.ndarray,
                      batch: int = FEATURE_BATCH) -> Iterator[tuple[int, np.ndarray]]:
    """``(offset, features[rows[offset:offset + batch]])`` over sorted unique ``rows``: every
    needed row read once, in file order, a contiguous run as one slice. Alone, this loop is
    the I/O floor of build-memory."""
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        contiguous = int(chunk[-1]) - int(chunk[0]) + 1 == len(chunk)
        selection = slice(int(chunk[0]), int(chunk[-1]) + 1) if contiguous else chunk
        yield start, shard.read("features", selection)


def gather_regions(path: Path, rows: np.ndarray, regions: np.ndarray, image_ids: np.ndarray,
                   targets: np.ndarray, vectors: np.ndarray, boxes: np.ndarray) -> None:
    """Copy the features and boxes of (row, region) pairs sorted by row into ``vectors``
    (float16 [P, D]) and ``boxes`` (float32 [P, 4]) at positions ``targets``, each needed row
    read once; a region beyond the image's detections is an error."""
    with store.RegionShard(path) as shard:
        if rows[-1] >= len(shard):
            raise CpganError(f"{path}: image id {image_ids[-1]} is at row {rows[-1]} but the "
                             f"shard has {len(shard)} rows (regions/index.parquet is stale)")
        if shard.feature_dim != vectors.shape[1]:
            raise CpganError(f"{path}: features are {shard.feature_dim}-d, other shards "
                             f"{vectors.shape[1]}-d")
        counts = shard.read("num_regions")[rows]  # small datasets: read whole, index in memory
        bad = np.flatnonzero(regions >= counts)
        if bad.size:
            i = bad[0]
            raise CpganError(f"{path}: attention chose region {regions[i]} of image "
                             f"{image_ids[i]}, which has {counts[i]} detected regions")
        boxes[targets] = shard.read("boxes")[rows, regions]
        unique = np.unique(rows)
        for start, block in iter_feature_rows(shard, unique):
            low, high = np.searchsorted(rows, [unique[start], unique[start + len(block) - 1] + 1])
            local = np.searchsorted(unique[start:start + len(block)], rows[low:high])
            vectors[targets[low:high]] = block[local, regions[low:high]]


def gather_chosen(root: Path, split: str, top: pd.DataFrame, shard: np.ndarray, row: np.ndarray,
                  feature_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and boxes of every chosen region, aligned with ``top``, read shard by shard in
    row order. This runs in the client: it must hold every chosen vector anyway, and reading
    them on workers only added their transfer."""
    region = top["region"].to_numpy().astype(np.int64)
    image = top["image_id"].to_numpy()
    order = np.lexsort((region, row, shard))
    vectors = np.empty((len(top), feature_dim), dtype=np.float16)
    boxes = np.empty((len(top), 4), dtype=np.float32)
    bounds = np.flatnonzero(np.r_[True, np.diff(shard[order]) != 0, True]) if len(top) else []
    for low, high in zip(bounds[:-1], bounds[1:]):
        members = order[low:high]
        path = Path(root) / REGIONS_DIR / store.shard_name(split, int(shard[members[0]]))
        gather_regions(path, row[members], region[members], image[members], members, vectors, boxes)
    return vectors, boxes


# ------------------------------------------------------------------------- Eq. 7


def weighted_means(word_ids: np.ndarray, weights: np.ndarray, vectors: np.ndarray,
                   vocab_size: int) -> np.ndarray:
    """Eq. 7: m_r = sum_k a_k v_k / sum_k a_k for rows sorted by (word, rank); float64 sums
    taken in rank order, stored float32; words without rows stay zero."""
    memory = np.zeros((vocab_size, vectors.shape[1]), dtype=np.float32)
    words, starts = np.unique(word_ids, return_index=True)
    ends = np.r_[starts[1:], len(word_ids)]
    for block in range(0, len(words), WORD_BLOCK):
        first, last = starts[block], ends[min(block + WORD_BLOCK, len(words)) - 1]
        block_words = words[block:block + WORD_BLOCK]
        local = np.searchsorted(block_words, word_ids[first:last])
        rank = np.arange(first, last) - starts[block:block + WORD_BLOCK][local]
        total = np.zeros((len(block_words), vectors.shape[1]), dtype=np.float64)
        weight_sum = np.zeros(len(block_words), dtype=np.float64)
        for k in range(int(rank.max()) + 1):
            at = np.flatnonzero(rank == k)
            a = weights[first + at].astype(np.float64)
            total[local[at]] += a[:, None] * vectors[first + at]  # float16 -> float64, exact
            weight_sum[local[at]] += a
        memory[block_words] = (total / weight_sum[:, None]).astype(np.float32)
    return memory


# ------------------------------------------------------------------------- provenance


def _relative(root: Path, path: Path) -> str:
    """Inputs are keyed relative to the artifacts root when inside it (the root can move)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _known_fingerprints(root: Path, split: str, previous: dict[str, Any] | None) -> dict[str, Any]:
    """Fingerprints recorded by detect, attend and the previous memory build: a file whose size
    and mtime are unchanged is not hashed again."""
    known: dict[str, Any] = {}
    for stage in ("detect", "attend"):
        record = artifacts.read_record(root, stage, split) or {}
        known.update(record.get("outputs", {}))
    if previous:
        known.update(previous["inputs"])
    return known


def _fingerprints(root: Path, paths: Sequence[Path], known: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for path in paths:
        key = _relative(root, path)
        if not Path(path).is_file():
            raise CpganError(f"{path}: input of build-memory is missing")
        out[key] = fingerprint(Path(path), known.get(key))
    return out


def _group_digest(fingerprints: dict[str, Any], keys: Sequence[str]) -> str:
    lines = "".join(f"{key} {fingerprints[key]['sha256']}\n" for key in sorted(keys))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _recorded(path: Path) -> dict[str, Any] | None:
    """The params, input fingerprints and index digest a finished memory.h5 recorded."""
    try:
        with h5py.File(path, "r") as f:
            return {"params": json.loads(f.attrs["params"]),
                    "inputs": json.loads(f["inputs"].asstr()[()]),
                    "index_sha256": str(f.attrs["memory_index_sha256"])}
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _is_finished(previous: dict[str, Any] | None, params: dict[str, Any],
                 inputs: dict[str, Any], index_path: Path) -> bool:
    if previous is None or previous["params"] != params or set(previous["inputs"]) != set(inputs):
        return False
    if any(previous["inputs"][k]["sha256"] != inputs[k]["sha256"] for k in inputs):
        return False
    return index_path.is_file() and fingerprint(index_path)["sha256"] == previous["index_sha256"]


def _sweep(root: Path) -> None:
    """Remove temporaries a killed build left; only this stage's, the root is shared."""
    record = artifacts.record_path(root, "build-memory").name  # written by cli/memory.py
    for name in (MEMORY_NAME, INDEX_NAME, PURITY_NAME, record):
        for leftover in Path(root).glob(f"{TMP_PREFIX}{name}.*"):
            leftover.unlink(missing_ok=True)


# ------------------------------------------------------------------------- writing


def _index_table(top: pd.DataFrame, tokens: Sequence[str], boxes: np.ndarray) -> pa.Table:
    word = top["word_id"].to_numpy()
    columns = {
        "word_id": word.astype(np.int32),
        "word": np.asarray(tokens, dtype=object)[word] if len(word) else np.empty(0, object),
        "rank": top["rank"].to_numpy().astype(np.int16),
        **{name: top[name].to_numpy() for name in
           ("image_id", "caption_id", "position", "region", "weight")},
        **{name: boxes[:, i] for i, name in enumerate(BOX_COLUMNS)},
    }
    return pa.table({name: pa.array(columns[name], type=MEMORY_INDEX_SCHEMA.field(name).type)
                     for name in MEMORY_INDEX_SCHEMA.names}, schema=MEMORY_INDEX_SCHEMA)


def _write_memory_file(path: Path, memory: np.ndarray, tokens: Sequence[str], support: np.ndarray,
                       relevant: np.ndarray, attrs: dict[str, Any], inputs: dict[str, Any]) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("memory", data=memory.astype(np.float32))
        f.create_dataset("words", data=np.asarray(tokens, dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("support", data=support.astype(np.int32))
        f.create_dataset("relevant", data=relevant.astype(np.int32))
        # a dataset, not an attribute: attributes are capped at 64 KB and COCO has ~160 inputs
        f.create_dataset("inputs", data=json.dumps(inputs, sort_keys=True),
                         dtype=h5py.string_dtype("utf-8"))
        for key, value in attrs.items():
            f.attrs[key] = value


# ------------------------------------------------------------------------- the stage


@dataclass
class MemoryResult:
    """What a build made (or found already made)."""

    path: Path
    index_path: Path
    split: str
    topk: int
    feature_dim: int
    words: int
    zero_support: list[str]
    inputs: list[Path]
    params: dict[str, Any]
    reused: bool

    def summary(self, first: int = 10) -> dict[str, Any]:
        return {"words": self.words, "feature_dim": self.feature_dim, "topk": self.topk,
                "with_memory": self.words - len(SPECIALS) - len(self.zero_support),
                "zero_support": len(self.zero_support),
                "zero_support_first": self.zero_support[:first], "reused": self.reused}


@contextlib.contextmanager
def dask_client(workers: int, scheduler: str | None) -> Iterator[Any]:
    """A Client on the scheduler at ``scheduler``, or on a LocalCluster of ``workers``
    single-threaded processes that is closed on exit (as ``cluster.run_tasks`` starts one)."""
    from dask.distributed import Client

    cluster = None
    if scheduler is None:
        cluster = local_cluster(workers)
    try:
        with Client(scheduler or cluster) as client:
            yield client
    finally:
        if cluster is not None:
            cluster.close()


def _feature_dim(shards: Sequence[Path]) -> int:
    with store.RegionShard(shards[0]) as shard:
        return shard.feature_dim


def _zero_support(tokens: Sequence[str], support: np.ndarray) -> list[str]:
    return [tokens[i] for i in np.flatnonzero(support == 0) if i >= len(SPECIALS)]


@dataclass
class _Inputs:
    """The files a build reads, opened and fingerprinted."""

    root: Path
    split: str
    vocab: Vocabulary
    parts: list[Path]
    index: pa.Table
    index_path: Path
    shards: list[Path]
    prints: dict[str, Any]

    @property
    def paths(self) -> list[Path]:
        return [self.root / VOCAB_NAME, self.index_path, *self.shards, *self.parts]

    def digests(self) -> dict[str, str]:
        """memory.h5's digest attributes: vocabulary, attention parts, regions."""
        key = functools.partial(_relative, self.root)
        return {"vocab_sha256": self.prints[key(self.root / VOCAB_NAME)]["sha256"],
                "attention_sha256": _group_digest(self.prints, [key(p) for p in self.parts]),
                "regions_sha256": _group_digest(
                    self.prints, [key(p) for p in (self.index_path, *self.shards)])}


def _open_inputs(root: Path, split: str, previous: dict[str, Any] | None) -> _Inputs:
    vocab = Vocabulary.load(root / VOCAB_NAME)
    index_path = root / REGIONS_DIR / store.INDEX_NAME
    index = store.read_index(index_path)
    inputs = _Inputs(root, split, vocab, attention_parts(root, split), index, index_path,
                     region_shards(root, index, split), {})
    inputs.prints = _fingerprints(root, inputs.paths, _known_fingerprints(root, split, previous))
    return inputs


def _compute(inputs: _Inputs, topk: int, workers: int,
             scheduler: str | None) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The chosen regions (``top``), Eq. 7's memory and the chosen boxes."""
    check_parts(inputs.parts)
    feature_dim = _feature_dim(inputs.shards)
    with dask_client(workers, scheduler) as client:
        top = select_top(client, inputs.parts, len(inputs.vocab), topk, inputs.index_path,
                         inputs.split)
    shard, row = locate_images(inputs.index, inputs.index_path, inputs.split,
                               top["image_id"].to_numpy())
    vectors, boxes = gather_chosen(inputs.root, inputs.split, top, shard, row, feature_dim)
    memory = weighted_means(top["word_id"].to_numpy(), top["weight"].to_numpy(), vectors,
                            len(inputs.vocab))
    return top, memory, boxes


def _write_outputs(inputs: _Inputs, topk: int, params: dict[str, Any], top: pd.DataFrame,
                   memory: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """memory_index.parquet, then memory.h5 (the file whose presence means "finished");
    returns the support per word."""
    size = len(inputs.vocab)
    support = np.bincount(top["word_id"].to_numpy(), minlength=size)
    relevant = np.zeros(size, dtype=np.int64)
    relevant[top["word_id"].to_numpy()] = top["relevant"].to_numpy()
    table_path = inputs.root / INDEX_NAME
    with atomic_write(table_path) as tmp:
        pq.write_table(_index_table(top, inputs.vocab.tokens, boxes), tmp)
    attrs = {"topk": topk, "feature_dim": memory.shape[1], "split": inputs.split,
             "version": __version__, "params": json.dumps(params, sort_keys=True),
             **inputs.digests(), "memory_index_sha256": fingerprint(table_path)["sha256"]}
    with atomic_write(inputs.root / MEMORY_NAME) as tmp:
        _write_memory_file(tmp, memory, inputs.vocab.tokens, support, relevant, attrs,
                           inputs.prints)
    return support


def build_memory(root: str | Path, *, split: str = "train2014", topk: int, workers: int = 1,
                 scheduler: str | None = None, force: bool = False) -> MemoryResult:
    """Build ``memory.h5`` and ``memory_index.parquet`` under the artifacts ``root`` from
    vocab.json, ``attention/<split>-*.parquet`` and ``regions/`` (Eq. 7). Reuses a finished
    memory.h5 whose recorded inputs and parameters equal the current ones unless ``force``."""
    if not 1 <= topk <= np.iinfo(np.int16).max:  # ranks are stored as int16
        raise CpganError(f"--topk must be in 1..{np.iinfo(np.int16).max}, got {topk}")
    root = Path(root)
    _sweep(root)
    previous = _recorded(root / MEMORY_NAME)
    inputs = _open_inputs(root, split, previous)
    params = {"split": split, "topk": topk, "version": __version__}
    result = MemoryResult(root / MEMORY_NAME, root / INDEX_NAME, split, topk, 0,
                          len(inputs.vocab), [], inputs.paths, params, reused=False)
    if not force and _is_finished(previous, params, inputs.prints, result.index_path):
        try:  # the recorded inputs match, but the file itself may be damaged since
            _, support, _, _, dim = read_bank(result.path, inputs.vocab, VOCAB_NAME)
        except CpganError:
            pass  # not a valid memory bank any more: build it again
        else:
            result.feature_dim, result.reused = dim, True
            result.zero_support = _zero_support(inputs.vocab.tokens, support)
            return result
    top, memory, boxes = _compute(inputs, topk, workers, scheduler)
    support = _write_outputs(inputs, topk, params, top, memory, boxes)
    result.feature_dim = memory.shape[1]
    result.zero_support = _zero_support(inputs.vocab.tokens, support)
    return result


# ------------------------------------------------------------------------- reading it back


@dataclass
class MemoryBank:
    """A validated memory: m_r for every vocabulary word, as the text encoder consumes it."""

    memory: "torch.Tensor"  # float32 [V, D]
    support: "torch.Tensor"  # int32 [V]: images used, <= topk
    relevant: "torch.Tensor"  # int32 [V]: N, the word's relevant images
    topk: int
    feature_dim: int


_MEMORY_DTYPES = {"memory": np.float32, "support": np.int32, "relevant": np.int32}


def _check_layout(f: h5py.File, path: Path) -> tuple[int, int, int]:
    """(V, D, topk) after checking datasets, dtypes, shapes and attributes."""
    for name in ("memory", "words", "support", "relevant"):
        if not isinstance(f.get(name), h5py.Dataset):  # get: a dangling link is missing
            raise CpganError(f"{path}: dataset '{name}' is missing")
    for name, dtype in _MEMORY_DTYPES.items():
        if f[name].dtype != dtype:
            raise CpganError(f"{path}: '{name}' is {f[name].dtype}, expected {np.dtype(dtype)}")
    if h5py.check_string_dtype(f["words"].dtype) is None:
        raise CpganError(f"{path}: 'words' is {f['words'].dtype}, expected strings")
    if f["memory"].ndim != 2:
        raise CpganError(f"{path}: 'memory' has shape {f['memory'].shape}, expected (V, D)")
    size, dim = f["memory"].shape
    for name in ("words", "support", "relevant"):
        if f[name].shape != (size,):
            raise CpganError(f"{path}: '{name}' has shape {f[name].shape}, expected ({size},)")
    attrs = {}
    for name in ("topk", "feature_dim"):
        value = f.attrs.get(name)
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise CpganError(f"{path}: attribute '{name}' is {one_line(repr(value))}, "
                             "expected a positive integer")
        attrs[name] = int(value)
    if attrs["topk"] > np.iinfo(np.int16).max:  # build_memory's bound: ranks are int16
        raise CpganError(f"{path}: attribute 'topk' is {attrs['topk']}, above the largest top-K "
                         f"build-memory makes ({np.iinfo(np.int16).max})")
    if attrs["feature_dim"] != dim:
        raise CpganError(f"{path}: attribute feature_dim is {attrs['feature_dim']} but 'memory' "
                         f"is {dim}-d")
    return size, dim, attrs["topk"]


def _check_words(path: Path, words: Sequence[str], vocab: Vocabulary, vocab_name: str) -> None:
    if len(words) != len(vocab):
        raise CpganError(f"{path}: {len(words)} words but {vocab_name} has {len(vocab)} tokens "
                         "(built for another vocabulary)")
    for i, (word, token) in enumerate(zip(words, vocab.tokens)):
        if word != token:
            raise CpganError(f"{path}: word {i} is {word!r} but {token!r} in {vocab_name} "
                             "(built for another vocabulary)")


def _check_values_of(path: Path, memory: np.ndarray, support: np.ndarray, relevant: np.ndarray,
                     topk: int, words: Sequence[str]) -> None:
    finite = np.isfinite(memory).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise CpganError(f"{path}: 'memory' has non-finite values (row {row}, {words[row]!r})")
    bad = np.flatnonzero((relevant < 0) | (support != np.minimum(relevant, topk)))
    if bad.size:
        i = int(bad[0])
        raise CpganError(f"{path}: word {words[i]!r} has support {support[i]} and relevant "
                         f"{relevant[i]}, expected support = min(relevant, topk {topk})")
    empty = np.flatnonzero((support == 0) & np.any(memory != 0, axis=1))
    if empty.size:
        raise CpganError(f"{path}: word {words[int(empty[0])]!r} has no relevant image but a "
                         "non-zero memory")


def load_memory(path: str | Path, vocab: Vocabulary | str | Path) -> MemoryBank:
    """Read and validate ``memory.h5`` against the vocabulary (a Vocabulary or vocab.json's
    path): every consumer goes through here, so a bank built for another vocabulary or a
    damaged file is one CpganError line naming the file and what differs."""
    import torch

    vocab_name = "the given vocabulary"
    if not isinstance(vocab, Vocabulary):
        vocab_name, vocab = str(vocab), Vocabulary.load(vocab)
    memory, support, relevant, topk, dim = read_bank(path, vocab, vocab_name)
    return MemoryBank(torch.from_numpy(memory), torch.from_numpy(support),
                      torch.from_numpy(relevant), topk, dim)


def read_bank(path: str | Path, vocab: Vocabulary, vocab_name: str,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(memory, support, relevant, topk, D) of a validated ``memory.h5``, as numpy arrays:
    :func:`load_memory` without torch, for build-memory's check of a bank it would reuse."""
    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except FileNotFoundError:
        raise CpganError(f"{path}: memory bank not found (run 'cpgan-prep build-memory')") from None
    except OSError as exc:
        raise CpganError(f"{path}: not a readable HDF5 file "
                         f"({one_line(exc)})") from None
    with handle as f:
        size, dim, topk = _check_layout(f, path)
        try:
            words = list(f["words"].asstr()[:])
            memory, support, relevant = (f[name][:] for name in ("memory", "support", "relevant"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CpganError(f"{path}: cannot read the memory bank "
                             f"({one_line(exc)})") from None
    _check_words(path, words, vocab, vocab_name)
    _check_values_of(path, memory, support, relevant, topk, words)
    return memory, support, relevant, topk, dim


def read_memory_index(path: str | Path) -> pd.DataFrame:
    """``memory_index.parquet`` as a DataFrame, its schema checked."""
    path = Path(path)
    table = artifacts.read_parquet(path, "memory index not found (run 'cpgan-prep build-memory')")
    if not table.schema.equals(MEMORY_INDEX_SCHEMA):
        raise CpganError(f"{path}: columns {table.schema.names} do not match the memory index "
                         "schema")
    return table.to_pandas()


# ------------------------------------------------------------------------- purity


def _instances(split: CocoSplit, image_id: int, index_path: Path) -> list[dict]:
    try:
        return split.instances(image_id)
    except KeyError:
        raise CpganError(f"{index_path}: image id {image_id} is not in {split.captions_file} "
                         "(--coco-root is another dataset)") from None


def purity_report(index: pd.DataFrame, split: CocoSplit, index_path: Path) -> dict[str, Any]:
    """For words naming an instance category, the fraction of their chosen regions that
    overlap (IoU >= 0.5) an instance of that category in their image; per word and overall."""
    from cpgan.pipeline.categories import HIT_IOU, category_words, region_hits

    names = split.categories()
    per_word: dict[str, Any] = {}
    cache: dict[int, list[dict]] = {}
    total = hits_total = 0
    for word, category in sorted(category_words(split).items()):
        rows = index[index["word"] == word]
        hits = 0
        for image_id, *box in rows[["image_id", *BOX_COLUMNS]].itertuples(index=False):
            if image_id not in cache:
                cache[image_id] = _instances(split, int(image_id), index_path)
            hits += region_hits(box, cache[image_id], category)
        per_word[word] = {"category": names[category], "category_id": category,
                          "regions": len(rows), "hits": hits,
                          "purity": hits / len(rows) if len(rows) else None}
        total, hits_total = total + len(rows), hits_total + hits
    measured = [w for w, entry in per_word.items() if entry["regions"]]
    return {"split": split.split, "iou_threshold": HIT_IOU, "words": per_word,
            "overall": {"words": len(measured), "regions": total, "hits": hits_total,
                        "purity": hits_total / total if total else None}}


def write_purity(root: str | Path, split: CocoSplit) -> dict[str, Any]:
    """Compute the purity report of ``root``'s memory_index.parquet and write it atomically
    to ``memory_purity.json`` beside memory.h5."""
    index_path = Path(root) / INDEX_NAME
    report = purity_report(read_memory_index(index_path), split, index_path)
    atomic_write_text(Path(root) / PURITY_NAME, json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report


# ------------------------------------------------------------------------- pictures


def crop_box(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The pixels of an (x1, y1, x2, y2) box in original pixels, at least one pixel."""
    height, width = image.shape[:2]
    x1 = min(max(int(math.floor(box[0])), 0), width - 1)
    y1 = min(max(int(math.floor(box[1])), 0), height - 1)
    x2 = max(min(int(math.ceil(box[2])), width), x1 + 1)
    y2 = max(min(int(math.ceil(box[3])), height), y1 + 1)
    return image[y1:y2, x1:x2]


def draw_memory(root: str | Path, split: CocoSplit, words: Sequence[str], out: str | Path) -> None:
    """Figure 3 for real: per word a row with the K region crops that built m_r, each labelled
    with its weight a_k and source image id; written as PNG to ``out`` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    root = Path(root)
    vocab = Vocabulary.load(root / VOCAB_NAME)
    bank = load_memory(root / MEMORY_NAME, vocab)
    unknown = [w for w in words if w not in vocab.tokens]
    if unknown:
        raise CpganError(f"{root / VOCAB_NAME}: {unknown[0]!r} is not in the vocabulary")
    index = read_memory_index(root / INDEX_NAME)
    columns = bank.topk
    figure = Figure(figsize=(1.7 * columns + 1.5, 1.9 * len(words)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(words), columns, squeeze=False)
    for line, word in zip(axes, words):
        word_id = vocab.tokens.index(word)
        rows = index[index["word_id"] == word_id].sort_values("rank")
        _draw_row(line, split, word, rows, int(bank.relevant[word_id]), root / INDEX_NAME)
    with atomic_write(out) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def _draw_row(line: Sequence[Any], split: CocoSplit, word: str, rows: pd.DataFrame,
              relevant: int, index_path: Path) -> None:
    line[0].text(-0.12, 0.5, f"{word}\nN={relevant}\nused {len(rows)}", ha="right",
                 va="center", transform=line[0].transAxes, fontsize=9)
    for position, ax in enumerate(line):
        ax.set_xticks([])
        ax.set_yticks([])
        if position >= max(len(rows), 1):
            ax.set_axis_off()
    if rows.empty:
        line[0].text(0.5, 0.5, "no relevant\nimage", ha="center", va="center", fontsize=8)
        return
    for ax, entry in zip(line, rows.itertuples(index=False)):
        label = f"a={entry.weight:.3f}\nimage {entry.image_id}"
        try:
            image = split.load_image(int(entry.image_id))
        except KeyError:
            raise CpganError(f"{index_path}: image id {entry.image_id} is not in "
                             f"{split.captions_file} (--coco-root is another dataset)") from None
        except ItemError as exc:
            ax.text(0.5, 0.5, f"unreadable:\n{exc}"[:60], ha="center", va="center", fontsize=6)
            ax.set_title(label, fontsize=7)
            continue
        ax.imshow(crop_box(image, [getattr(entry, name) for name in BOX_COLUMNS]))
        ax.set_title(label, fontsize=7)
