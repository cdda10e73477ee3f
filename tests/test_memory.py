"""build-memory (Eq. 7) on hand-made attention parts and region shards, its loader, the purity
report and the pictures."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cpgan.cli.memory import build_memory_command, show_memory_command
from cpgan.errors import CpganError
from cpgan.pipeline import artifacts
from cpgan.pipeline import memory as mem
from cpgan.pipeline import regions as store
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.text import SPECIALS, Vocabulary

SPLIT = "train2014"
SLOTS = 4


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def scheduler():
    """One in-process cluster for the module, on TCP so that a child process can join it too:
    a build joins it like --scheduler ADDRESS."""
    from dask.distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                           dashboard_address=":0", silence_logs=50)
    yield cluster.scheduler_address
    cluster.close()


def write_inputs(root: Path, words: list[str], shards: list[dict[int, np.ndarray]],
                 parts: list[list[tuple]], boxes: dict[int, np.ndarray] | None = None,
                 num_regions: dict[int, int] | None = None) -> Vocabulary:
    """vocab.json, region shards ({image id: features [SLOTS, D]} each), index.parquet and
    attention parts (rows: image_id, caption_id, position, word, region, weight)."""
    vocab = Vocabulary(SPECIALS + tuple(words), (0,) * (len(SPECIALS) + len(words)), 1)
    vocab.save(root / "vocab.json")
    index = {name: [] for name in store.INDEX_SCHEMA.names}
    for number, images in enumerate(shards):
        ids = sorted(images)
        features = np.stack([images[i] for i in ids]).astype(np.float16)
        box = np.stack([(boxes or {}).get(i, _default_boxes(i)) for i in ids])
        counts = [(num_regions or {}).get(i, SLOTS) for i in ids]
        rows = store.RegionRows(ids, box, np.ones((len(ids), SLOTS)), np.zeros((len(ids), SLOTS)),
                                counts, features)
        store.write_shard(root / "regions" / store.shard_name(SPLIT, number), rows, {})
        for row, image_id in enumerate(ids):
            for name, value in (("image_id", image_id), ("file_name", f"{image_id}.jpg"),
                                ("split", SPLIT), ("shard", number), ("row", row),
                                ("width", 64), ("height", 64), ("status", "ok")):
                index[name].append(value)
    store.write_index(root / "regions" / store.INDEX_NAME, pa.table(index))
    for number, rows in enumerate(parts):
        write_part(root / "attention" / f"{SPLIT}-{number:05d}.parquet", vocab, rows)
    return vocab


def _default_boxes(image_id: int) -> np.ndarray:
    return np.array([[r, image_id, r + 10, image_id + 10] for r in range(SLOTS)], np.float32)


def write_part(path: Path, vocab: Vocabulary, rows: list[tuple],
               schema: pa.Schema = mem.ATTENTION_SCHEMA, ordered: bool = True) -> None:
    rows = sorted(rows, key=lambda r: r[:3]) if ordered else rows
    columns = list(zip(*rows)) if rows else [[]] * 6
    data = {"image_id": columns[0], "caption_id": columns[1], "position": columns[2],
            "word_id": [vocab.tokens.index(w) if isinstance(w, str) else w for w in columns[3]],
            "region": columns[4], "weight": columns[5]}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(data, schema=schema), path)


def features(**regions: list[float]) -> np.ndarray:
    """A [SLOTS, 4] feature block: the named regions (r0=..., r2=...), every other region 100s,
    so a wrongly chosen region shows in the memory."""
    block = np.full((SLOTS, 4), 100.0)
    for name, vector in regions.items():
        block[int(name[1:])] = vector
    return block


def outputs(root: Path) -> dict[str, object]:
    with h5py.File(root / "memory.h5", "r") as f:
        data = {name: f[name][()] for name in ("memory", "words", "support", "relevant")}
        data.update({key: f.attrs[key] for key in ("topk", "feature_dim", "split")})
    data["index"] = pq.read_table(root / "memory_index.parquet").to_pandas()
    return data


def assert_same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "index":
            pd.testing.assert_frame_equal(a[key], b[key])
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------- Eq. 7


@pytest.fixture(scope="module")
def hand(tmp_path_factory, scheduler) -> Path:
    """Three images; 'circle' in all three (weights 1/2, 1/4, 1/8), 'square' in one, 'red' in
    none, '<unk>' rows that must be ignored."""
    root = tmp_path_factory.mktemp("hand")
    shards = [{1: features(r0=[2, 0, 0, 4]), 2: features(r1=[0, 4, 0, 0], r2=[1, 1, 1, 1])},
              {3: features(r2=[0, 0, 8, 0])}]
    parts = [[(1, 10, 1, "circle", 0, 0.5), (2, 20, 3, "circle", 1, 0.25),
              (2, 21, 0, "square", 2, 0.75), (2, 21, 2, "<unk>", 3, 0.9)],
             [(3, 30, 2, "circle", 2, 0.125)]]
    write_inputs(root, ["circle", "square", "red"], shards, parts)
    mem.build_memory(root, topk=2, scheduler=scheduler)
    return root


def test_hand_computed_memory_is_eq7(hand: Path):
    bank = mem.load_memory(hand / "memory.h5", hand / "vocab.json")
    circle = (0.5 * np.array([2, 0, 0, 4]) + 0.25 * np.array([0, 4, 0, 0])) / (0.5 + 0.25)
    np.testing.assert_allclose(bank.memory[4].numpy(), [4 / 3, 4 / 3, 0, 8 / 3], rtol=1e-6)
    np.testing.assert_allclose(bank.memory[4].numpy(), circle, rtol=1e-6)
    np.testing.assert_array_equal(bank.memory[5].numpy(), [1, 1, 1, 1])  # K=2 > N=1
    assert bank.support.tolist() == [0, 0, 0, 0, 2, 1, 0]
    assert bank.relevant.tolist() == [0, 0, 0, 0, 3, 1, 0]
    assert (bank.memory[[0, 1, 2, 3, 6]] == 0).all()  # specials (even <unk> with rows) and 'red'
    assert bank.topk == 2 and bank.feature_dim == 4 and bank.memory.dtype.is_floating_point


def test_memory_index_lists_the_chosen_regions(hand: Path):
    index = mem.read_memory_index(hand / "memory_index.parquet")
    got = index[["word", "rank", "image_id", "caption_id", "position", "region", "weight"]]
    assert [tuple(r) for r in got.itertuples(index=False)] == [
        ("circle", 0, 1, 10, 1, 0, 0.5), ("circle", 1, 2, 20, 3, 1, 0.25),
        ("square", 0, 2, 21, 0, 2, 0.75)]
    np.testing.assert_array_equal(index[list(mem.BOX_COLUMNS)].to_numpy()[1], [1, 2, 11, 12])


def _build_one(tmp_path: Path, scheduler: str, shards, parts, topk: int, words=("circle",)):
    write_inputs(tmp_path, list(words), shards, parts)
    mem.build_memory(tmp_path, topk=topk, scheduler=scheduler)
    return mem.read_memory_index(tmp_path / "memory_index.parquet"), \
        mem.load_memory(tmp_path / "memory.h5", tmp_path / "vocab.json")


def test_relevance_is_the_largest_weight_over_an_images_occurrences(tmp_path, scheduler):
    shards = [{1: features(r1=[1, 2, 3, 4]), 2: features(r0=[9, 9, 9, 9])}]
    parts = [[(1, 10, 0, "circle", 0, 0.2), (1, 11, 3, "circle", 1, 0.9),
              (2, 20, 0, "circle", 0, 0.6)]]  # first occurrence or mean would pick image 2
    index, bank = _build_one(tmp_path, scheduler, shards, parts, topk=1)
    assert index[["image_id", "caption_id", "region"]].values.tolist() == [[1, 11, 1]]
    np.testing.assert_array_equal(bank.memory[4].numpy(), [1, 2, 3, 4])
    assert int(bank.relevant[4]) == 2  # two images, three occurrences


def test_ties_go_to_smaller_image_then_caption_then_position(tmp_path, scheduler):
    shards = [{4: features(r3=[4, 4, 4, 4]), 5: features(r0=[5, 5, 5, 5])},
              {9: features(r0=[9, 9, 9, 9])}]
    parts = [[(5, 50, 0, "circle", 0, 0.5), (4, 41, 5, "circle", 1, 0.5),
              (4, 40, 6, "circle", 2, 0.5), (4, 40, 2, "circle", 3, 0.5)],
             [(9, 90, 0, "circle", 0, 0.5)]]
    index, bank = _build_one(tmp_path, scheduler, shards, parts, topk=2)
    assert index[["rank", "image_id", "caption_id", "position", "region"]].values.tolist() == [
        [0, 4, 40, 2, 3], [1, 5, 50, 0, 0]]
    np.testing.assert_array_equal(bank.memory[4].numpy(), [4.5] * 4)
    assert int(bank.relevant[4]) == 3


# ----------------------------------------------------------------------------- a random set


def random_inputs(root: Path, seed: int = 7) -> None:
    """3 shards x 8 images, 3 captions x 5 words each over 12 words (some never used)."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(12)]
    shards, parts = [], []
    for shard in range(3):
        ids = list(range(shard * 100 + 1, shard * 100 + 9))
        shards.append({i: rng.normal(size=(SLOTS, 4)) for i in ids})
        rows = []
        for image_id in ids:
            for caption in range(3):
                for position in range(5):
                    word = int(rng.integers(len(SPECIALS) - 1, len(SPECIALS) + 9))  # <eos>, w0..w8
                    weight = float(rng.choice([0.25, 0.5, rng.uniform(0.05, 1)]))  # ties likely
                    rows.append((image_id, image_id * 10 + caption, position, word,
                                 int(rng.integers(SLOTS)), weight))
        parts.append(rows)
    write_inputs(root, words, shards, parts)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, scheduler) -> Path:
    root = tmp_path_factory.mktemp("reference")
    random_inputs(root)
    mem.build_memory(root, topk=3, scheduler=scheduler)
    return root


def test_memory_index_and_shards_recompute_the_memory(reference: Path):
    """Eq. 7 recomputed from memory_index.parquet and the shards, and the choice recomputed
    from the attention parts with pandas."""
    index = mem.read_memory_index(reference / "memory_index.parquet")
    bank = mem.load_memory(reference / "memory.h5", reference / "vocab.json")
    located = store.read_index(reference / "regions" / "index.parquet").to_pandas()
    located = located.set_index("image_id")
    expected = np.zeros_like(bank.memory.numpy())
    for word_id, rows in index.groupby("word_id"):
        total, weights = np.zeros(4), 0.0
        for entry in rows.sort_values("rank").itertuples():
            shard, row = located.loc[entry.image_id, ["shard", "row"]]
            with h5py.File(reference / "regions" / store.shard_name(SPLIT, shard), "r") as f:
                vector = f["features"][row, entry.region].astype(np.float64)
                np.testing.assert_array_equal(
                    f["boxes"][row, entry.region],
                    [getattr(entry, c) for c in mem.BOX_COLUMNS])
            total += np.float64(entry.weight) * vector
            weights += np.float64(entry.weight)
        expected[word_id] = (total / weights).astype(np.float32)
    np.testing.assert_array_equal(bank.memory.numpy(), expected)

    attention = pd.concat(pd.read_parquet(p) for p in mem.attention_parts(reference, SPLIT))
    attention = attention[attention.word_id >= len(SPECIALS)]
    best = attention.groupby(["word_id", "image_id"]).weight.max().reset_index()
    relevant = best.groupby("word_id").size().reindex(range(len(SPECIALS) + 12), fill_value=0)
    assert bank.relevant.tolist() == relevant.tolist()
    assert bank.support.tolist() == np.minimum(relevant, 3).tolist()
    top = best.sort_values(["word_id", "weight", "image_id"], ascending=[True, False, True])
    top = top.groupby("word_id").head(3)
    assert sorted(zip(top.word_id, top.image_id)) == sorted(zip(index.word_id, index.image_id))
    assert (bank.relevant[-3:] == 0).all() and (bank.memory[-3:] == 0).all()  # w9..w11 unused


def copy_inputs(source: Path, target: Path) -> None:
    for name in ("regions", "attention"):
        shutil.copytree(source / name, target / name)
    shutil.copy(source / "vocab.json", target / "vocab.json")


def test_one_worker_gives_the_same_output(reference: Path, tmp_path):
    copy_inputs(reference, tmp_path)
    result = mem.build_memory(tmp_path, topk=3, workers=1)
    assert not result.reused
    assert_same_outputs(outputs(tmp_path), outputs(reference))


def test_rerun_reuses_and_changes_rebuild(reference: Path, tmp_path, scheduler):
    shutil.copytree(reference, tmp_path / "a")
    root = tmp_path / "a"
    before = (root / "memory.h5").stat().st_mtime_ns
    assert mem.build_memory(root, topk=3, scheduler=scheduler).reused
    assert (root / "memory.h5").stat().st_mtime_ns == before
    assert not mem.build_memory(root, topk=2, scheduler=scheduler).reused
    assert outputs(root)["support"].max() == 2
    table = pq.read_table(root / "attention" / f"{SPLIT}-00001.parquet")
    weights = table["weight"].to_numpy().copy()
    weights[0] = 0.999
    pq.write_table(table.set_column(5, "weight", pa.array(weights)),
                   root / "attention" / f"{SPLIT}-00001.parquet")
    assert not mem.build_memory(root, topk=2, scheduler=scheduler).reused
    (root / "memory_index.parquet").unlink()
    assert not mem.build_memory(root, topk=2, scheduler=scheduler).reused


KILLED = """
import os, signal, sys
from cpgan.pipeline import memory

def write_then_die(path, *args):
    original(path, *args)
    os.killpg(0, signal.SIGKILL)  # before the rename: a complete temporary, no memory.h5

if __name__ == "__main__":
    original = memory._write_memory_file
    memory._write_memory_file = write_then_die
    memory.build_memory(sys.argv[1], topk=3, scheduler=sys.argv[2])
"""


def test_killed_run_leaves_nothing_finished_and_resumes(reference: Path, tmp_path, scheduler):
    root = tmp_path / "root"
    copy_inputs(reference, root)
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    proc = subprocess.run([sys.executable, str(script), str(root), scheduler], start_new_session=True,
                          capture_output=True, timeout=180)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (root / "memory.h5").exists()
    assert list(root.glob(".tmp-memory.h5.*"))  # it died mid-write
    result = mem.build_memory(root, topk=3, scheduler=scheduler)
    assert not result.reused and not list(root.glob(".tmp-*"))
    assert_same_outputs(outputs(root), outputs(reference))


# ----------------------------------------------------------------------------- bad inputs


def test_bad_attention_parts_are_one_line_errors(tmp_path, scheduler):
    shards = [{1: features(r0=[1, 1, 1, 1])}, {2: features(r0=[2, 2, 2, 2])}]
    good = [[(1, 10, 0, "circle", 0, 0.5)], [(2, 20, 0, "circle", 0, 0.5)]]
    vocab = write_inputs(tmp_path, ["circle"], shards, good)
    part0, part1 = (tmp_path / "attention" / f"{SPLIT}-{i:05d}.parquet" for i in (0, 1))
    cases = [
        (part0, [(1, 11, 0, "circle", 0, 0.5), (1, 10, 4, "circle", 0, 0.5)], "unordered",
         "not sorted by (image_id, caption_id, position) at row 1"),
        (part1, [(2, 20, 0, "circle", 0, 0.5)],
         mem.ATTENTION_SCHEMA.set(4, pa.field("region", pa.int32())), "'region' is int32"),
        (part1, [(1, 20, 0, "circle", 0, 0.5)], None, "overlap"),
        (part1, [(2, 20, 0, 99, 0, 0.5)], None, "word id 99 is outside"),
        (part1, [(2, 20, 0, "circle", 0, 1.5)], None, "not an attention weight"),
        (part1, [(3, 20, 0, "circle", 0, 0.5)], None, "image id 3 has attention rows"),
        (part0, [(1, 10, 0, "circle", 2, 0.5)], None, "region 2 of image 1, which has 1"),
    ]
    store.write_shard(tmp_path / "regions" / store.shard_name(SPLIT, 0),
                      store.RegionRows([1], np.zeros((1, SLOTS, 4)), np.ones((1, SLOTS)),
                                       np.zeros((1, SLOTS)), [1],
                                       np.ones((1, SLOTS, 4))), {})
    for path, rows, schema, message in cases:
        write_part(part0, vocab, good[0])
        write_part(part1, vocab, good[1])
        if schema == "unordered":
            write_part(path, vocab, rows, ordered=False)
        else:
            write_part(path, vocab, rows, schema or mem.ATTENTION_SCHEMA)
        with pytest.raises(CpganError) as err:
            mem.build_memory(tmp_path, topk=1, scheduler=scheduler)
        assert message in str(err.value) and "\n" not in str(err.value)
        assert not (tmp_path / "memory.h5").exists()


def test_overlap_check_reads_the_column_without_footer_statistics(tmp_path):
    vocab = Vocabulary(SPECIALS + ("circle",), (0,) * 5, 1)
    write_part(tmp_path / "a.parquet", vocab,
               [(1, 10, 0, "circle", 0, 0.5), (5, 50, 0, "circle", 0, 0.5)])
    table = pq.read_table(tmp_path / "a.parquet")
    pq.write_table(table.slice(1), tmp_path / "b.parquet", write_statistics=False)
    pq.write_table(table.slice(0, 1), tmp_path / "c.parquet", write_statistics=False)
    mem.check_parts([tmp_path / "c.parquet", tmp_path / "b.parquet"])  # 1..1 and 5..5
    with pytest.raises(CpganError, match="image ids 5..5 overlap those of a.parquet"):
        mem.check_parts([tmp_path / "a.parquet", tmp_path / "b.parquet"])


def test_attention_schema_is_the_one_attend_writes():
    attend = pytest.importorskip("cpgan.pipeline.attend")
    assert attend.SCHEMA.equals(mem.ATTENTION_SCHEMA)


@pytest.mark.parametrize("damage, message", [
    ("vocab_token", "word 5 is 'square' but 'squares' in"),
    ("vocab_length", "7 words but"),
    ("truncated", "not a readable HDF5 file"),
    ("nan", "non-finite values (row 4, 'circle')"),
    ("support_shape", "'support' has shape (6,), expected (7,)"),
    ("memory_dtype", "'memory' is float64, expected float32"),
    ("no_relevant", "dataset 'relevant' is missing"),
    ("support_value", "has support 3 and relevant 1"),
    ("zero_support_vector", "no relevant image but a non-zero memory"),
])
def test_load_memory_refuses_damaged_or_foreign_files(hand: Path, tmp_path, damage, message):
    path = tmp_path / "memory.h5"
    shutil.copy(hand / "memory.h5", path)
    vocab = Vocabulary.load(hand / "vocab.json")
    tokens = list(vocab.tokens)
    if damage == "vocab_token":
        tokens[5] = "squares"
    elif damage == "vocab_length":
        tokens.append("blue")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:600])
    else:
        with h5py.File(path, "r+") as f:
            _damage(f, damage)
    vocab_path = tmp_path / "vocab.json"
    Vocabulary(tuple(tokens), (0,) * len(tokens), 1).save(vocab_path)
    with pytest.raises(CpganError) as err:
        mem.load_memory(path, vocab_path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def _damage(f: h5py.File, damage: str) -> None:
    if damage == "nan":
        f["memory"][4, 0] = np.nan
    elif damage == "support_shape":
        data = f["support"][:-1]
        del f["support"]
        f["support"] = data
    elif damage == "memory_dtype":
        data = f["memory"][:].astype(np.float64)
        del f["memory"]
        f["memory"] = data
    elif damage == "no_relevant":
        del f["relevant"]
    elif damage == "support_value":
        f["support"][5] = 3
    elif damage == "zero_support_vector":
        f["memory"][6, 1] = 0.5


# ----------------------------------------------------------------------------- purity, CLI


@pytest.fixture(scope="module")
def toy(tmp_path_factory, scheduler) -> tuple[Path, Path, dict]:
    """Six toy images: the word naming each image's first instance attends to that instance's
    box (region 0), except the last image's, which attends to a 3-pixel corner (region 1)."""
    from cpgan.pipeline.toy import TOY_CATEGORIES, generate_toy_coco

    base = tmp_path_factory.mktemp("toy")
    coco_root = generate_toy_coco(base / "coco", train_images=6, val_images=1, seed=5,
                                  progress=False)
    split = CocoSplit.open(coco_root, SPLIT)
    names = split.categories()
    shards, boxes, rows, expected = [{}], {}, [], {}
    for n, image_id in enumerate(split.image_ids()):
        first = split.instances(image_id)[0]
        x, y, w, h = first["bbox"]
        boxes[image_id] = np.array([[x, y, x + w, y + h], [0, 0, 3, 3]] * (SLOTS // 2), np.float32)
        shards[0][image_id] = np.full((SLOTS, 4), float(n))
        hit = n < 5
        word = names[first["category_id"]]
        rows.append((image_id, image_id * 10, 1, word, 0 if hit else 1, 0.5 + n / 100))
        regions, hits = expected.get(word, (0, 0))
        expected[word] = (regions + 1, hits + hit)
    root = base / "artifacts"
    write_inputs(root, list(TOY_CATEGORIES) + ["grass"], shards, [rows], boxes=boxes)
    return root, coco_root, expected


def test_cli_builds_reports_purity_and_reuses(toy, scheduler):
    root, coco_root, expected = toy
    args = ["--artifacts", str(root), "--coco-root", str(coco_root), "--topk", "6",
            "--scheduler", scheduler]
    result = CliRunner().invoke(build_memory_command, args)
    assert result.exit_code == 0, result.output
    unused = [w for w in ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross",
                          "heart", "grass") if w not in expected]
    assert f"{len(unused)} without a relevant image ({', '.join(unused[:8])}" in result.output
    report = __import__("json").loads((root / mem.PURITY_NAME).read_text())
    for word, (regions, hits) in expected.items():
        assert (report["words"][word]["regions"], report["words"][word]["hits"]) == (regions, hits)
    assert report["overall"]["regions"] == 6 and report["overall"]["hits"] == 5
    assert "grass" not in report["words"] and report["words"]["ball"]["regions"] == 0
    record = artifacts.read_record(root, "build-memory")
    assert record["params"]["topk"] == 6 and "memory.h5" in record["outputs"]
    assert record["summary"]["purity"]["hits"] == 5 and record["summary"]["zero_support"] == len(unused)
    assert artifacts.stage_state(root, "build-memory")[0] == "done"
    again = CliRunner().invoke(build_memory_command, args)
    assert again.exit_code == 0 and "(up to date, reused)" in again.output


def test_show_memory_draws_the_crops(toy, scheduler, tmp_path):
    import matplotlib.image

    root, coco_root, expected = toy
    if not (root / "memory.h5").exists():
        mem.build_memory(root, topk=6, scheduler=scheduler)
    out = tmp_path / "words.png"
    word = max(expected, key=lambda w: expected[w][0])
    args = ["--artifacts", str(root), "--coco-root", str(coco_root), word, "grass",
            "--out", str(out)]
    result = CliRunner().invoke(show_memory_command, args)
    assert result.exit_code == 0, result.output
    picture = matplotlib.image.imread(out)
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 300
    bad = CliRunner().invoke(show_memory_command, [*args[:4], "zebra", "--out", str(out)])
    assert isinstance(bad.exception, CpganError)
    assert "'zebra' is not in the vocabulary" in str(bad.exception)


def test_crop_box_is_the_box_in_original_pixels():
    image = np.arange(10 * 8 * 3).reshape(10, 8, 3)
    np.testing.assert_array_equal(mem.crop_box(image, [1.2, 2.0, 3.5, 5.0]), image[2:5, 1:4])
    assert mem.crop_box(image, [5, 5, 5, 5]).shape[:2] == (1, 1)
    assert mem.crop_box(image, [-3, -3, 50, 50]).shape[:2] == (10, 8)
