"""Refusals of the artifact readers, one real malformed file per branch.

Every region shard and region index, memory bank and memory index, attention part and
vocab.json the pipeline reads is validated before use; a bad one must stop with a one-line
:class:`CpganError` that starts with the file's path and says what is wrong. The rest of the
suite reaches few of these refusals (tests/test_memory.py covers a damaged memory.h5's
vocabulary, NaNs, dataset shapes and dtypes and bad attention rows through build-memory;
tests/test_hostile_inputs.py the same bank through 'cpgan-prep'), so they are not repeated
here. Each case starts from a valid file written by the project's own writers, at toy sizes,
introduces one defect, and reads it through the reader's public entry point. The last two
sections hold damage that once escaped as a traceback or a message of several lines (found by
flipping bytes of valid files), kept so that it cannot again.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpgan.errors import CpganError
from cpgan.pipeline import memory as mem
from cpgan.pipeline import regions as store
from cpgan.pipeline.text import SPECIALS, Vocabulary, build_vocabulary

from builders import refusal

SPLIT = "train2014"
IMAGES, SLOTS, DIM = (3, 7), 4, 8
WORDS = ("circle", "square", "red")
TOPK = 3


def replace(f: h5py.File, name: str, data: Any) -> None:
    del f[name]
    f[name] = data


def unreadable(kind: str, path: Path) -> None:
    """Damage the valid file at ``path`` so that it no longer opens as what it was."""
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("image_id,shard,row\n1,0,0\n")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif kind == "directory":
        path.unlink()
        path.mkdir()
        (path / "inside").write_bytes(b"not a file of the artifact's kind")
    else:
        raise AssertionError(kind)


UNREADABLE = ["empty", "text", "truncated", "directory"]


def garble_chunk(path: Path, name: str) -> None:
    """Store dataset ``name`` gzip-compressed in one chunk, then overwrite that chunk's bytes:
    the file and the dataset's metadata stay sound, its data no longer inflates."""
    with h5py.File(path, "r+") as f:
        data = f[name][:]
        del f[name]
        f.create_dataset(name, data=data, chunks=data.shape, compression="gzip")
        chunk = f[name].id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(chunk.byte_offset)
        raw.write(b"\xff" * chunk.size)


# ----------------------------------------------------------------------------- region shards


def write_valid_shard(path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = len(IMAGES)
    rows = store.RegionRows(IMAGES, rng.uniform(0, 50, (n, SLOTS, 4)), rng.uniform(size=(n, SLOTS)),
                            np.zeros((n, SLOTS)), [SLOTS, 2], rng.standard_normal((n, SLOTS, DIM)))
    store.write_shard(path, rows, {"provenance": {"seed": 0}})
    return path


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    return write_valid_shard(tmp_path / store.shard_name(SPLIT, 0))


def test_the_valid_shard_opens(shard: Path) -> None:
    with store.RegionShard(shard) as regions:
        assert regions.read("image_id").tolist() == list(IMAGES)
        assert (len(regions), regions.num_slots, regions.feature_dim) == (2, SLOTS, DIM)


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    path = tmp_path / store.shard_name(SPLIT, 3)
    refusal(lambda: store.RegionShard(path), path, "region shard is missing")


@pytest.mark.parametrize("kind", UNREADABLE)
def test_a_shard_that_is_not_hdf5_is_refused(shard: Path, kind: str) -> None:
    unreadable(kind, shard)
    refusal(lambda: store.RegionShard(shard), shard, "not a readable HDF5 file (")


SHARD_DEFECTS: dict[str, tuple[Callable[[h5py.File], None], str]] = {
    "scores float64": (lambda f: replace(f, "scores", f["scores"][:].astype(np.float64)),
                       "'scores' is float64, expected float32"),
    "labels int32": (lambda f: replace(f, "labels", f["labels"][:].astype(np.int32)),
                     "'labels' is int32, expected int16"),
    "features float32": (lambda f: replace(f, "features", f["features"][:].astype(np.float32)),
                         "'features' is float32, expected float16"),
    "image ids as text": (lambda f: replace(f, "image_id", np.array([b"3", b"7"])),
                          "'image_id' is |S1, expected int64"),
    "scores one slot short": (lambda f: replace(f, "scores", f["scores"][:, :-1]),
                              "'scores' has shape (2, 3), expected (2, 4)"),
    "labels one image short": (lambda f: replace(f, "labels", f["labels"][:1]),
                               "'labels' has shape (1, 4), expected (2, 4)"),
    "num_regions per slot": (lambda f: replace(f, "num_regions", f["labels"][:]),
                             "'num_regions' has shape (2, 4), expected (2,)"),
    "boxes flattened": (lambda f: replace(f, "boxes", f["boxes"][:].reshape(2, -1)),
                        "'boxes' has shape (2, 16), expected (2, -1, 4)"),
    "features one slot more": (
        lambda f: replace(f, "features", np.zeros((2, SLOTS + 1, DIM), np.float16)),
        "'features' has shape (2, 5, 8), expected (2, 4, D)"),
    "features flattened": (
        lambda f: replace(f, "features", f["features"][:].reshape(2, -1)),
        "'features' has shape (2, 32), expected (2, 4, D)"),
    "num_regions above the slots": (
        lambda f: f["num_regions"].write_direct(np.array([SLOTS + 1, 2], np.int16)),
        "'num_regions' outside 0..4"),
    "num_regions negative": (
        lambda f: f["num_regions"].write_direct(np.array([SLOTS, -1], np.int16)),
        "'num_regions' outside 0..4"),
}


@pytest.mark.parametrize("defect", sorted(SHARD_DEFECTS))
def test_a_malformed_shard_is_refused(shard: Path, defect: str) -> None:
    damage, phrase = SHARD_DEFECTS[defect]
    with h5py.File(shard, "r+") as f:
        damage(f)
    refusal(lambda: store.RegionShard(shard), shard, phrase)
    assert not store.shard_is_sound(shard)


# ----------------------------------------------------------------------------- region index


def index_table() -> pa.Table:
    return pa.table({"image_id": list(IMAGES), "file_name": [f"{i}.jpg" for i in IMAGES],
                     "split": [SPLIT] * 2, "shard": [0, 0], "row": [0, 1], "width": [64, 64],
                     "height": [48, 48], "status": [store.STATUS_OK] * 2})


@pytest.fixture
def region_index(tmp_path: Path) -> Path:
    path = tmp_path / "regions" / store.INDEX_NAME
    path.parent.mkdir()
    store.write_index(path, index_table())
    return path


def test_the_valid_region_index_reads(region_index: Path) -> None:
    assert store.read_index(region_index)["image_id"].to_pylist() == list(IMAGES)


def test_a_missing_region_index_is_named(tmp_path: Path) -> None:
    path = tmp_path / store.INDEX_NAME
    refusal(lambda: store.read_index(path), path, "region index is missing (run 'cpgan-prep")


@pytest.mark.parametrize("kind", UNREADABLE)
def test_a_region_index_that_is_not_parquet_is_refused(region_index: Path, kind: str) -> None:
    unreadable(kind, region_index)
    refusal(lambda: store.read_index(region_index), region_index, "not a readable Parquet file")


def rewrite(path: Path, edit: Callable[[pa.Table], pa.Table]) -> None:
    """Write ``edit`` of the table at ``path`` back with pyarrow alone (no schema cast)."""
    pq.write_table(edit(pq.read_table(path)), path)


def retype(table: pa.Table, name: str, kind: pa.DataType) -> pa.Table:
    at = table.schema.get_field_index(name)
    return table.set_column(at, name, table.column(name).cast(kind))


SCHEMA_EDITS: dict[str, Callable[[pa.Table], pa.Table]] = {
    "a column dropped": lambda t: t.drop_columns([t.schema.names[-1]]),
    "a column added": lambda t: t.append_column("extra", pa.array([0] * t.num_rows)),
    "a column renamed": lambda t: t.rename_columns(["x" + t.schema.names[0], *t.schema.names[1:]]),
}


@pytest.mark.parametrize("edit", [
    *sorted(SCHEMA_EDITS), "row int64", "image_id as text",
])
def test_a_region_index_of_another_schema_is_refused(region_index: Path, edit: str) -> None:
    change = SCHEMA_EDITS.get(edit) or {
        "row int64": lambda t: retype(t, "row", pa.int64()),
        "image_id as text": lambda t: retype(t, "image_id", pa.string()),
    }[edit]
    rewrite(region_index, change)
    refusal(lambda: store.read_index(region_index), region_index,
            "do not match the region index schema")


# ----------------------------------------------------------------------------- memory bank


VOCAB = Vocabulary(SPECIALS + WORDS, (0,) * len(SPECIALS) + (9, 4, 2), 1)
RELEVANT = np.array([0, 0, 0, 0, 5, 1, 2])


def write_valid_bank(path: Path) -> Path:
    memory = np.random.default_rng(1).standard_normal((len(VOCAB), DIM)).astype(np.float32)
    memory[: len(SPECIALS)] = 0
    mem._write_memory_file(path, memory, VOCAB.tokens, np.minimum(RELEVANT, TOPK), RELEVANT,
                           {"topk": TOPK, "feature_dim": DIM, "split": SPLIT}, {})
    return path


@pytest.fixture
def bank(tmp_path: Path) -> Path:
    return write_valid_bank(tmp_path / mem.MEMORY_NAME)


def test_the_valid_memory_bank_loads(bank: Path) -> None:
    loaded = mem.load_memory(bank, VOCAB)
    assert tuple(loaded.memory.shape) == (len(VOCAB), DIM) and loaded.topk == TOPK


def test_a_missing_memory_bank_is_named(tmp_path: Path) -> None:
    path = tmp_path / mem.MEMORY_NAME
    refusal(lambda: mem.load_memory(path, VOCAB), path,
            "memory bank not found (run 'cpgan-prep build-memory')")


def set_attr(f: h5py.File, name: str, value: Any) -> None:
    if value is None:
        del f.attrs[name]
    else:
        f.attrs[name] = value


def positive(name: str, value: str) -> re.Pattern[str]:
    """The refusal of attribute ``name`` read as ``value`` (bare or as a numpy scalar's repr)."""
    return re.compile(rf"attribute '{name}' is (np\.\w+\()?{re.escape(value)}\)?, "
                      "expected a positive integer$")


BANK_DEFECTS: dict[str, tuple[Callable[[h5py.File], None], str | re.Pattern[str]]] = {
    "words as ids": (lambda f: replace(f, "words", np.arange(len(VOCAB))),
                     "'words' is int64, expected strings"),
    "words as floats": (lambda f: replace(f, "words", np.zeros(len(VOCAB), np.float32)),
                        "'words' is float32, expected strings"),
    "memory flattened": (lambda f: replace(f, "memory", f["memory"][:].ravel()),
                         f"'memory' has shape ({len(VOCAB) * DIM},), expected (V, D)"),
    "memory 3-d": (lambda f: replace(f, "memory", f["memory"][:][:, :, None]),
                   f"'memory' has shape ({len(VOCAB)}, {DIM}, 1), expected (V, D)"),
    "topk missing": (lambda f: set_attr(f, "topk", None),
                     "attribute 'topk' is None, expected a positive integer"),
    "topk zero": (lambda f: set_attr(f, "topk", 0), positive("topk", "0")),
    "topk negative": (lambda f: set_attr(f, "topk", -3), positive("topk", "-3")),
    "topk a float": (lambda f: set_attr(f, "topk", 3.0), positive("topk", "3.0")),
    "feature_dim as text": (lambda f: set_attr(f, "feature_dim", str(DIM)),
                            "attribute 'feature_dim' is '8', expected a positive integer"),
    "feature_dim missing": (lambda f: set_attr(f, "feature_dim", None),
                            "attribute 'feature_dim' is None, expected a positive integer"),
}


@pytest.mark.parametrize("defect", sorted(BANK_DEFECTS))
def test_a_malformed_memory_bank_is_refused(bank: Path, defect: str) -> None:
    damage, phrase = BANK_DEFECTS[defect]
    with h5py.File(bank, "r+") as f:
        damage(f)
    refusal(lambda: mem.load_memory(bank, VOCAB), bank, phrase)


def test_words_that_are_not_utf8_are_refused(bank: Path) -> None:
    with h5py.File(bank, "r+") as f:
        words = [t.encode() for t in VOCAB.tokens]
        words[4] = b"caf\xe9"
        replace(f, "words", np.array(words, dtype=object).astype(h5py.string_dtype("utf-8")))
    refusal(lambda: mem.load_memory(bank, VOCAB), bank, "cannot read the memory bank (")


def test_a_memory_dataset_whose_data_is_damaged_is_refused(bank: Path) -> None:
    garble_chunk(bank, "memory")
    refusal(lambda: mem.load_memory(bank, VOCAB), bank, "cannot read the memory bank (")


# ----------------------------------------------------------------------------- memory index


@pytest.fixture
def memory_index(tmp_path: Path) -> Path:
    top = pd.DataFrame({"word_id": [4, 4, 5], "rank": [0, 1, 0], "image_id": [3, 7, 3],
                        "caption_id": [30, 70, 31], "position": [1, 0, 2], "region": [0, 1, 3],
                        "weight": np.float32([0.9, 0.5, 0.7])})
    boxes = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / mem.INDEX_NAME
    pq.write_table(mem._index_table(top, VOCAB.tokens, boxes), path)
    return path


def test_the_valid_memory_index_reads(memory_index: Path) -> None:
    assert mem.read_memory_index(memory_index)["word"].tolist() == ["circle", "circle", "square"]


def test_a_missing_memory_index_is_named(tmp_path: Path) -> None:
    path = tmp_path / mem.INDEX_NAME
    refusal(lambda: mem.read_memory_index(path), path,
            "memory index not found (run 'cpgan-prep build-memory')")


@pytest.mark.parametrize("kind", UNREADABLE)
def test_a_memory_index_that_is_not_parquet_is_refused(memory_index: Path, kind: str) -> None:
    unreadable(kind, memory_index)
    refusal(lambda: mem.read_memory_index(memory_index), memory_index,
            "not a readable Parquet file")


@pytest.mark.parametrize("edit", [*sorted(SCHEMA_EDITS), "weight float64", "rank int32"])
def test_a_memory_index_of_another_schema_is_refused(memory_index: Path, edit: str) -> None:
    change = SCHEMA_EDITS.get(edit) or {
        "weight float64": lambda t: retype(t, "weight", pa.float64()),
        "rank int32": lambda t: retype(t, "rank", pa.int32()),
    }[edit]
    rewrite(memory_index, change)
    refusal(lambda: mem.read_memory_index(memory_index), memory_index,
            "do not match the memory index schema")


# ----------------------------------------------------------------------------- vocab.json


@pytest.fixture
def vocab_path(tmp_path: Path) -> Path:
    path = tmp_path / "vocab.json"
    VOCAB.save(path)
    return path


def test_the_valid_vocabulary_loads(vocab_path: Path) -> None:
    assert Vocabulary.load(vocab_path) == VOCAB


Document = Callable[[dict[str, Any]], Any]


def edit_vocab(path: Path, change: Document) -> None:
    """Replace vocab.json by ``change`` of its JSON document."""
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def put(key: str, value: Any) -> Document:
    return lambda data: {**data, key: value}


def put_in(key: str, at: int, value: Any) -> Document:
    return lambda data: {**data, key: [*data[key][:at], value, *data[key][at + 1:]]}


def without(key: str) -> Document:
    return lambda data: {k: v for k, v in data.items() if k != key}


VOCAB_DEFECTS: dict[str, tuple[Document, str]] = {
    "a list": (lambda data: data["tokens"], "expected an object with tokens, counts and min_count"),
    "null": (lambda data: None, "expected an object with tokens, counts and min_count"),
    "no min_count": (without("min_count"), "expected an object with tokens, counts and min_count"),
    "no tokens": (without("tokens"), "expected an object with tokens, counts and min_count"),
    "tokens a string": (put("tokens", " ".join(SPECIALS + WORDS)),
                        "'tokens' must be a list of strings"),
    "a token a number": (put_in("tokens", 5, 5), "'tokens' must be a list of strings"),
    "a token null": (put_in("tokens", 6, None), "'tokens' must be a list of strings"),
    "a count negative": (put_in("counts", 4, -1),
                         "'counts' must be a list of non-negative integers"),
    "a count a float": (put_in("counts", 4, 9.0),
                        "'counts' must be a list of non-negative integers"),
    "a count true": (put_in("counts", 5, True),
                     "'counts' must be a list of non-negative integers"),
    "a count text": (put_in("counts", 5, "4"),
                     "'counts' must be a list of non-negative integers"),
    "counts an object": (put("counts", {"circle": 9}),
                         "'counts' must be a list of non-negative integers"),
    "min_count text": (put("min_count", "1"), "'min_count' must be an integer of at least 1"),
    "min_count a float": (put("min_count", 1.5), "'min_count' must be an integer of at least 1"),
    "min_count true": (put("min_count", True), "'min_count' must be an integer of at least 1"),
    "min_count null": (put("min_count", None), "'min_count' must be an integer of at least 1"),
    "min_count zero": (put("min_count", 0), "'min_count' must be an integer of at least 1"),
    "min_count negative": (put("min_count", -3), "'min_count' must be an integer of at least 1"),
}


@pytest.mark.parametrize("defect", sorted(VOCAB_DEFECTS))
def test_a_malformed_vocabulary_is_refused(vocab_path: Path, defect: str) -> None:
    change, phrase = VOCAB_DEFECTS[defect]
    edit_vocab(vocab_path, change)
    refusal(lambda: Vocabulary.load(vocab_path), vocab_path, phrase)


def test_a_memory_bank_with_a_malformed_vocabulary_file_names_the_vocabulary(
        bank: Path, vocab_path: Path) -> None:
    edit_vocab(vocab_path, put("min_count", "1"))
    refusal(lambda: mem.load_memory(bank, vocab_path), vocab_path, "'min_count' must be")


@pytest.mark.parametrize("min_count", [0, -2])
def test_build_vocabulary_refuses_a_cut_off_below_one(min_count: int) -> None:
    with pytest.raises(CpganError, match=rf"^min_count must be at least 1, got {min_count}$"):
        build_vocabulary(["a red circle"], min_count=min_count)


# ----------------------------------------------------------------------------- attention parts


def write_valid_part(path: Path) -> Path:
    """What attend's run_part writes: the rows sorted by sorted_table, provenance metadata."""
    from cpgan.pipeline import attend

    piece = {"image_id": np.array([7, 3, 3], np.int64), "caption_id": np.array([70, 31, 30]),
             "position": np.array([0, 2, 1], np.int16), "word_id": np.array([4, 5, 4], np.int32),
             "region": np.array([1, 3, 0], np.int16),
             "weight": np.array([0.5, 0.7, 0.9], np.float32)}
    table = attend.sorted_table([piece])
    table = table.replace_schema_metadata({attend.METADATA_KEY: b'{"provenance": {}}'})
    pq.write_table(table, path)
    return path


@pytest.fixture
def part(tmp_path: Path, region_index: Path) -> Path:
    folder = tmp_path / mem.ATTENTION_DIR
    folder.mkdir()
    return write_valid_part(folder / f"{SPLIT}-00000.parquet")


def read_attention_part(path: Path) -> pd.DataFrame:
    """build-memory's reader, as each dask task calls it."""
    return mem.read_attention_part(path, len(VOCAB), path.parent.parent / "regions" /
                                   store.INDEX_NAME, SPLIT)


def read_part(path: Path) -> pa.Table:
    from cpgan.pipeline import attend

    return attend.read_part(path)


PART_READERS: dict[str, Callable[[Path], Any]] = {
    "build-memory": read_attention_part, "attend": read_part,
    "check_parts": lambda path: mem.check_parts([path]),
}


def test_the_valid_part_reads(part: Path) -> None:
    assert read_attention_part(part)["image_id"].tolist() == [3, 3, 7]
    assert read_part(part).num_rows == 3
    mem.check_parts([part])


@pytest.mark.parametrize("reader", ["build-memory", "attend"])
def test_a_missing_part_is_named(tmp_path: Path, reader: str) -> None:
    path = tmp_path / f"{SPLIT}-00004.parquet"
    refusal(lambda: PART_READERS[reader](path), path, "attention part is missing")


@pytest.mark.parametrize("kind", UNREADABLE)
@pytest.mark.parametrize("reader", sorted(PART_READERS))
def test_a_part_that_is_not_parquet_is_refused(part: Path, reader: str, kind: str) -> None:
    unreadable(kind, part)
    refusal(lambda: PART_READERS[reader](part), part, "not a readable Parquet file")


PART_SCHEMA_EDITS: dict[str, tuple[Callable[[pa.Table], pa.Table], str]] = {
    "weight float64": (lambda t: retype(t, "weight", pa.float64()),
                       "not an attention part: column 'weight' is double, expected float"),
    "word_id int64": (lambda t: retype(t, "word_id", pa.int64()),
                      "not an attention part: column 'word_id' is int64, expected int32"),
    "region dropped": (lambda t: t.drop_columns(["region"]),
                       "not an attention part: column 'region' is missing"),
    "a column added": (SCHEMA_EDITS["a column added"],
                       "not an attention part: unexpected columns ['extra']"),
}


@pytest.mark.parametrize("edit", sorted(PART_SCHEMA_EDITS))
@pytest.mark.parametrize("reader", ["build-memory", "attend"])
def test_a_part_of_another_schema_is_refused(part: Path, reader: str, edit: str) -> None:
    change, phrase = PART_SCHEMA_EDITS[edit]
    rewrite(part, change)
    if reader == "attend":
        phrase = "do not match the attention schema"
    refusal(lambda: PART_READERS[reader](part), part, phrase)


@pytest.mark.parametrize("name", mem.ATTENTION_SCHEMA.names)
def test_a_part_with_a_null_is_refused(part: Path, name: str) -> None:
    def blank(table: pa.Table) -> pa.Table:
        values = table.column(name).to_pylist()
        values[1] = None
        at = table.schema.get_field_index(name)
        return table.set_column(at, name, pa.array(values, table.schema.field(name).type))

    rewrite(part, blank)
    refusal(lambda: read_attention_part(part), part, f"column '{name}' has null values")


def test_a_part_with_a_negative_region_is_refused(part: Path) -> None:
    def negative(table: pa.Table) -> pa.Table:
        at = table.schema.get_field_index("region")
        return table.set_column(at, "region", pa.array([0, -2, 1], pa.int16()))

    rewrite(part, negative)
    refusal(lambda: read_attention_part(part), part, "negative region index -2")


# ----------------------------------------------------------------------------- fixed readers
# Files that made a reader fail with a traceback or a message of several lines.


def zero_footer(path: Path) -> None:
    """The Parquet footer's metadata overwritten with zeros, its length and magic intact:
    pyarrow's thrift error then ends in a newline."""
    data = path.read_bytes()
    size = int.from_bytes(data[-8:-4], "little")
    path.write_bytes(data[:-8 - size] + bytes(size) + data[-8:])


FOOTER_READERS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "region index": ("region_index", store.read_index),
    "memory index": ("memory_index", mem.read_memory_index),
    **{f"{name} part": ("part", read) for name, read in PART_READERS.items()},
}


@pytest.mark.parametrize("reader", sorted(FOOTER_READERS))
def test_a_parquet_footer_of_zeros_is_refused_in_one_line(request: pytest.FixtureRequest,
                                                          reader: str) -> None:
    fixture, read = FOOTER_READERS[reader]
    path = request.getfixturevalue(fixture)
    zero_footer(path)
    refusal(lambda: read(path), path, "not a readable Parquet file (")


def test_a_directory_in_place_of_the_memory_bank_is_refused_in_one_line(bank: Path) -> None:
    unreadable("directory", bank)
    refusal(lambda: mem.load_memory(bank, VOCAB), bank, "not a readable HDF5 file (")


@pytest.mark.parametrize("image_ids, shape", [
    (np.int64(IMAGES[0]), "()"), (np.array([[i] for i in IMAGES], np.int64), "(2, 1)"),
], ids=["scalar", "2-d"])
def test_a_shard_whose_image_ids_are_not_a_vector_is_refused(shard: Path, image_ids: np.ndarray,
                                                             shape: str) -> None:
    with h5py.File(shard, "r+") as f:
        replace(f, "image_id", image_ids)
    refusal(lambda: store.RegionShard(shard), shard, f"'image_id' has shape {shape}, expected (n,)")
    assert not store.shard_is_sound(shard)


def test_attention_rows_without_a_region_index_name_the_index(part: Path,
                                                               region_index: Path) -> None:
    region_index.unlink()
    refusal(lambda: read_attention_part(part), region_index, "region index is missing")


@pytest.mark.parametrize("damage, phrase", [
    (lambda path: unreadable("directory", path), "cannot read the vocabulary ("),
    (lambda path: path.write_text("[" * 100_000), "not valid JSON (maximum recursion depth"),
], ids=["a directory", "nested too deep"])
def test_a_vocabulary_that_cannot_be_parsed_is_refused(vocab_path: Path,
                                                       damage: Callable[[Path], None],
                                                       phrase: str) -> None:
    damage(vocab_path)
    refusal(lambda: Vocabulary.load(vocab_path), vocab_path, phrase)


# ----------------------------------------------------------------------------- escaped damage
# Damage that made a reader raise a bare OSError, KeyError, TypeError, OverflowError, pyarrow
# or Unicode error, or a message of several lines.


def test_a_shard_whose_region_counts_do_not_inflate_is_refused(shard: Path) -> None:
    garble_chunk(shard, "num_regions")
    refusal(lambda: store.RegionShard(shard), shard, "cannot read 'num_regions' (")
    assert not store.shard_is_sound(shard)


def dangle(f: h5py.File, name: str, link: str) -> None:
    del f[name]
    f[name] = (h5py.SoftLink("/nowhere") if link == "soft"
               else h5py.ExternalLink("absent.h5", "/" + name))


@pytest.mark.parametrize("link", ["soft", "external"])
def test_a_shard_dataset_that_is_a_dangling_link_is_missing(shard: Path, link: str) -> None:
    with h5py.File(shard, "r+") as f:
        dangle(f, "scores", link)
    refusal(lambda: store.RegionShard(shard), shard, "dataset 'scores' is missing")


@pytest.mark.parametrize("link", ["soft", "external"])
def test_a_bank_dataset_that_is_a_dangling_link_is_missing(bank: Path, link: str) -> None:
    with h5py.File(bank, "r+") as f:
        dangle(f, "memory", link)
    refusal(lambda: mem.load_memory(bank, VOCAB), bank, "dataset 'memory' is missing")


def test_an_array_attribute_is_refused_in_one_line(bank: Path) -> None:
    with h5py.File(bank, "r+") as f:
        f.attrs["topk"] = np.arange(40)
    refusal(lambda: mem.load_memory(bank, VOCAB), bank,
            re.compile(r"attribute 'topk' is array\(\[ *0, +1, .*, 39\]\), expected a positive "
                       r"integer$"))


@pytest.mark.parametrize("topk", [np.iinfo(np.int16).max + 1, 2**40, np.uint64(2**63)],
                         ids=["int16 max + 1", "2**40", "2**63"])
def test_a_topk_beyond_what_build_memory_makes_is_refused(bank: Path, topk: int) -> None:
    with h5py.File(bank, "r+") as f:
        f.attrs["topk"] = topk
    refusal(lambda: mem.load_memory(bank, VOCAB), bank,
            f"attribute 'topk' is {int(topk)}, above the largest top-K build-memory makes "
            f"({np.iinfo(np.int16).max})")


def footer_edit(path: Path, old: bytes, new: bytes) -> None:
    """Replace every ``old`` by ``new`` (same length) in the Parquet footer's metadata."""
    assert len(old) == len(new)
    data = path.read_bytes()
    start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    footer = data[start:-8]
    assert old in footer, (path, old)
    path.write_bytes(data[:start] + footer.replace(old, new) + data[-8:])


def name_not_utf8(path: Path) -> None:
    footer_edit(path, b"\x08image_id", b"\x08\xe9mage_id")


def four_bit_integers(path: Path) -> None:
    """The stored Arrow schema (footer key ARROW:schema) declares the int16 column 'position'
    4 bits wide: its width is the one byte that differs when 'position' is int8 instead."""
    stored = pq.read_metadata(path).metadata[b"ARROW:schema"]
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(stored)))
    int16 = schema.serialize().to_pybytes()
    int8 = schema.set(schema.get_field_index("position"),
                      pa.field("position", pa.int8())).serialize().to_pybytes()
    assert len(int8) == len(int16)
    (at,) = [k for k in range(len(int16)) if int16[k] != int8[k]]
    footer_edit(path, stored, base64.b64encode(int16[:at] + b"\x04" + int16[at + 1:]))


FOOTER_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "column name not utf-8": (
        name_not_utf8, "not a readable Parquet file ('utf-8' codec can't decode byte 0xe9"),
    "4-bit integers": (
        four_bit_integers, "not a readable Parquet file (Integers with less than 8 bits"),
}


@pytest.mark.parametrize("reader, damage", [
    (reader, damage) for reader in sorted(FOOTER_READERS) for damage in sorted(FOOTER_DAMAGE)
    if (reader, damage) != ("region index", "4-bit integers")  # it has no 'position' column
])
def test_a_parquet_footer_that_arrow_cannot_map_is_refused(request: pytest.FixtureRequest,
                                                           reader: str, damage: str) -> None:
    fixture, read = FOOTER_READERS[reader]
    path = request.getfixturevalue(fixture)
    edit, phrase = FOOTER_DAMAGE[damage]
    edit(path)
    refusal(lambda: read(path), path, phrase)


def without_statistics(path: Path, edit: Callable[[pa.Table], pa.Table] = lambda t: t) -> None:
    """The part rewritten without footer statistics: check_parts reads its image ids."""
    pq.write_table(edit(pq.read_table(path)), path, write_statistics=False, compression="gzip")


def test_a_part_whose_image_ids_are_all_null_is_refused_by_the_overlap_check(part: Path) -> None:
    rewrite(part, lambda t: t.set_column(0, "image_id", pa.nulls(t.num_rows, pa.int64())))
    refusal(lambda: mem.check_parts([part]), part, "column 'image_id' has null values")


def test_a_part_whose_image_ids_do_not_inflate_is_refused_by_the_overlap_check(
        part: Path) -> None:
    without_statistics(part)
    column = pq.ParquetFile(part).metadata.row_group(0).column(0)
    with open(part, "r+b") as raw:
        raw.seek(column.data_page_offset + column.total_compressed_size // 2)
        raw.write(b"\xff" * 8)
    refusal(lambda: mem.check_parts([part]), part, "not a readable Parquet file (")


def test_a_part_whose_image_ids_lost_their_column_metadata_is_refused(part: Path) -> None:
    """The first column chunk's ColumnMetaData (thrift field 3, after file_offset 0 in the list
    of 6 chunks) re-tagged as unknown field 11: readers skip it, so 'image_id' has no statistics
    and reads as no values at all although the row group has 3 rows."""
    footer_edit(part, b"\x19\x6c&\x00\x1c", b"\x19\x6c&\x00\x9c")
    refusal(lambda: mem.check_parts([part]), part,
            "not a readable Parquet file (column 'image_id' has 0 values for 3 rows)")
