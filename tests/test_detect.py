"""cpgan-prep detect on a tiny toy set with a randomly initialised toy detector."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cpgan.cli.prep import main as prep_main
from cpgan.model.darknet import Darknet, write_weights
from cpgan.pipeline.regions import INDEX_SCHEMA, RegionShard
from cpgan.pipeline.toy import generate_toy_coco

from builders import CFG, run_prep, write_random_weights

TRAIN_IMAGES = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detect")
    coco = generate_toy_coco(root / "coco", train_images=TRAIN_IMAGES, val_images=4, seed=3,
                             progress=False)
    weights = write_random_weights(root / "random.weights", seed=0)
    return {"root": root, "coco": coco, "weights": weights}


def _args(setup: dict[str, Path], artifacts: Path, *extra: str) -> list[str]:
    return ["detect", "--artifacts", str(artifacts), "--coco-root", str(setup["coco"]),
            "--weights", str(setup["weights"]), "--shard-size", "8", "--batch-size", "4", *extra]


def _contents(artifacts: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for path in sorted((artifacts / "regions").glob("*.h5")):
        with h5py.File(path, "r") as f:
            out[path.name] = {name: f[name][:] for name in f}
    return out


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    artifacts = setup["root"] / "reference"
    run_prep(_args(setup, artifacts, "--workers", "1"))
    return artifacts


def test_schema_matches_the_design(reference: Path):
    shards = sorted((reference / "regions").glob("train2014-*.h5"))
    assert [p.name for p in shards] == ["train2014-00000.h5", "train2014-00001.h5", "train2014-00002.h5"]
    with RegionShard(shards[0]) as shard:
        assert len(shard) == 8 and shard.feature_dim == 256 and shard.num_slots == 36
        rows = shard.rows()
        assert shard._file["features"].chunks == (1, 36, 256)
        assert set(shard.attrs) >= {"provenance", "failures", "input_size", "feature_layer"}
    valid = rows.labels >= 0
    assert (rows.num_regions == valid.sum(1)).all()
    assert (rows.boxes[..., 2] <= 128).all() and (rows.boxes[..., :2] >= 0).all()
    assert (rows.boxes[..., 2] >= rows.boxes[..., 0]).all()
    assert (np.diff(rows.scores, axis=1)[valid[:, 1:]] <= 0).all()  # best first
    assert (rows.features[~valid] == 0).all() and (rows.boxes[~valid] == 0).all()
    index = pq.read_table(reference / "regions" / "index.parquet")
    assert index.schema.equals(INDEX_SCHEMA) and index.num_rows == TRAIN_IMAGES
    assert set(index["status"].to_pylist()) == {"ok"}


def test_rerun_reuses_every_shard(setup, reference: Path, capsys):
    before = {p: p.stat().st_mtime_ns for p in (reference / "regions").glob("*.h5")}
    run_prep(_args(setup, reference, "--workers", "1"))
    assert "(3 reused)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_two_workers_give_the_same_output(setup, reference: Path):
    artifacts = setup["root"] / "two-workers"
    run_prep(_args(setup, artifacts, "--workers", "2"))
    _assert_same(_contents(artifacts), _contents(reference))


def test_killed_run_resumes_to_the_same_output(setup, reference: Path):
    artifacts = setup["root"] / "killed"
    command = [sys.executable, "-m", "cpgan.cli.prep", *_args(setup, artifacts, "--workers", "1")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = artifacts / "regions" / "train2014-00000.h5"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the client and its dask workers
    proc.wait()
    finished = sorted(p.name for p in (artifacts / "regions").glob("*.h5"))
    assert "train2014-00000.h5" in finished and len(finished) < 3, finished
    run_prep(_args(setup, artifacts, "--workers", "1"))
    _assert_same(_contents(artifacts), _contents(reference))
    assert not list((artifacts / "regions").glob(".tmp-*"))


def test_a_damaged_finished_shard_is_computed_again(setup, reference: Path, capsys):
    """Its attributes (provenance) survived but a dataset did not: rerun, not a fatal error."""
    artifacts = setup["root"] / "damaged"
    subprocess.run(["cp", "-r", str(reference), str(artifacts)], check=True)
    with h5py.File(artifacts / "regions" / "train2014-00001.h5", "a") as f:
        del f["boxes"]
    run_prep(_args(setup, artifacts, "--workers", "1"))
    assert "(2 reused)" in capsys.readouterr().out
    _assert_same(_contents(artifacts), _contents(reference))


def test_a_second_detect_on_a_locked_regions_folder_is_refused(setup, reference: Path, capsys):
    from cpgan.pipeline.artifacts import folder_lock

    with folder_lock(reference / "regions", "detect"):
        with pytest.raises(SystemExit) as info:
            prep_main(_args(setup, reference, "--workers", "1"))
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "another run is writing this folder" in err and err.count("\n") == 1


def test_corrupt_image_is_recorded_not_fatal(setup, tmp_path: Path):
    coco = tmp_path / "coco"
    subprocess.run(["cp", "-r", str(setup["coco"]), str(coco)], check=True)
    victim = sorted((coco / "train2014").glob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:200])
    artifacts = tmp_path / "artifacts"
    args = _args(setup, artifacts, "--workers", "1", "--limit", "8")
    args[args.index("--coco-root") + 1] = str(coco)
    run_prep(args)
    index = pq.read_table(artifacts / "regions" / "index.parquet").to_pylist()
    bad = [row for row in index if row["file_name"] == victim.name]
    assert len(index) == 8 and len(bad) == 1
    assert bad[0]["status"] == "truncated file" and bad[0]["row"] == -1
    with RegionShard(artifacts / "regions" / "train2014-00000.h5") as shard:
        assert len(shard) == 7 and bad[0]["image_id"] not in shard.read("image_id")
        assert shard.attrs["failures"] == [{"image_id": bad[0]["image_id"], "reason": "truncated file"}]


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys()
        for key in want[name]:
            np.testing.assert_array_equal(got[name][key], want[name][key], err_msg=f"{name}:{key}")


def test_foreign_cfg_brings_its_own_input_size_and_backbone_layer(setup, tmp_path: Path, capsys):
    tiny_cfg = CFG.parent / "yolov3-tiny.cfg"
    torch.manual_seed(1)
    weights = tmp_path / "tiny.weights"
    write_weights(Darknet.from_cfg_file(tiny_cfg), weights)
    base = ["detect", "--artifacts", str(tmp_path / "a"), "--coco-root", str(setup["coco"]),
            "--cfg", str(tiny_cfg), "--workers", "1", "--limit", "2"]
    run_prep([*base, "--weights", str(weights)])
    with RegionShard(tmp_path / "a" / "regions" / "train2014-00000.h5") as shard:
        assert (len(shard), shard.num_slots, shard.feature_dim) == (2, 36, 1024)
        assert shard.attrs["input_size"] == 416 and shard.attrs["feature_layer"] == 12
        assert shard.read("features").dtype == np.float16

    truncated = tmp_path / "truncated.weights"
    truncated.write_bytes(weights.read_bytes()[:-8])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        prep_main([*base, "--weights", str(truncated)])
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1
    size = weights.stat().st_size
    assert f"expected {size} bytes" in err and f"found {size - 8} bytes" in err
