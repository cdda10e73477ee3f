"""train-attention: the Up-Down captioner learns from region shards; checkpoints resume exactly."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from cpgan.config import AttentionConfig
from cpgan.errors import CpganError
from cpgan.model.butd import BOS_ID, EOS_ID, PAD_ID
from cpgan.pipeline import regions as store
from cpgan.pipeline.categories import xywh_to_xyxy
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.text import build_vocabulary
from cpgan.pipeline.toy import generate_toy_coco
from cpgan.trainer.captioner import (
    CHECKPOINT_NAME,
    MODEL_NAME,
    caption_pairs,
    fit_encoding,
    load_captioner,
    plan_split,
    read_shard_arrays,
    region_inputs,
    train_captioner,
)

SLOTS, DIM, MAX_WORDS = 10, 16, 12
CONFIG = AttentionConfig(embed_dim=16, hidden_dim=32, attention_dim=16, dropout=0.2,
                         epochs=4, batch_size=8, lr=2e-2, grad_clip=1.0)


def write_regions(coco: Path, regions: Path, *, shard_size: int, failed: set[int],
                  empty: set[int], seed: int = 0) -> None:
    """Region shards and index without a detector: the instance boxes first (confident, with
    their category's label and a feature that names it), then random low-score boxes;
    ``failed`` images get no row, ``empty`` ones zero regions. Fast, and the captioner has
    something real to learn."""
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(16, DIM)).astype(np.float32) * 2
    index_rows = []
    for split_name in ("train2014", "val2014"):
        split = CocoSplit.open(coco, split_name)
        ids = split.image_ids()
        for shard, start in enumerate(range(0, len(ids), shard_size)):
            chunk = ids[start:start + shard_size]
            kept = [i for i in chunk if i not in failed]
            n = len(kept)
            boxes = np.zeros((n, SLOTS, 4), np.float32)
            features = np.zeros((n, SLOTS, DIM), np.float32)
            counts = np.zeros(n, np.int16)
            scores = np.zeros((n, SLOTS), np.float32)
            labels = np.full((n, SLOTS), -1, np.int16)
            for row, image_id in enumerate(kept):
                if image_id in empty:
                    continue
                instances = split.instances(image_id)
                real = int(rng.integers(len(instances) + 1, SLOTS + 1))
                truth = xywh_to_xyxy([a["bbox"] for a in instances]).numpy()
                xy = rng.uniform(0, 100, size=(real - len(truth), 2))
                noise = np.concatenate([xy, xy + rng.uniform(8, 28, size=xy.shape)], axis=1)
                boxes[row, :real] = np.concatenate([truth, noise])
                features[row, :real] = rng.normal(size=(real, DIM)) * 0.3
                scores[row, :real] = rng.uniform(0.001, 0.1, size=real)
                labels[row, :real] = rng.integers(0, 8, size=real)
                for slot, ann in enumerate(instances):
                    features[row, slot] += codes[ann["category_id"]]
                    scores[row, slot] = rng.uniform(0.5, 0.95)
                    labels[row, slot] = ann["category_id"] - 1
                counts[row] = real
            rows = store.RegionRows(np.asarray(kept), boxes, scores, labels, counts, features)
            store.write_shard(regions / store.shard_name(split_name, shard), rows,
                              {"provenance": {"fake": split_name, "shard": shard}})
            for image_id in chunk:
                row = kept.index(image_id) if image_id in kept else -1
                index_rows.append({"image_id": image_id, "file_name": "x", "split": split_name,
                                   "shard": shard, "row": row,
                                   "width": 128, "height": 128,
                                   "status": "truncated file" if image_id in failed else "ok"})
    store.write_index(regions / store.INDEX_NAME,
                      pa.Table.from_pylist(index_rows, schema=store.INDEX_SCHEMA))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("captioner")
    coco = generate_toy_coco(root / "coco", train_images=24, val_images=8, seed=5, progress=False)
    write_regions(coco, root / "regions", shard_size=8, failed={3}, empty={12})
    train, val = CocoSplit.open(coco, "train2014"), CocoSplit.open(coco, "val2014")
    texts = [t for i in train.image_ids() for _, t in train.captions(i)]
    return {"root": root, "regions": root / "regions", "train": train, "val": val,
            "vocab": build_vocabulary(texts, min_count=1)}


def _train(data: dict, models: Path, **kwargs) -> dict:
    return train_captioner(data["regions"], models, data["train"], data["val"], data["vocab"],
                           CONFIG, MAX_WORDS, progress=False, **kwargs)


@pytest.fixture(scope="module")
def trained(data) -> dict:
    models = data["root"] / "models-4"
    return {"models": models, "summary": _train(data, models, epochs=4)}


def test_caption_pairs_encode_bos_words_eos_and_skip_empty_images(data):
    split, vocab = data["train"], data["vocab"]
    pairs = caption_pairs(np.array([1, 2]), np.array([0, 4]), split.captions, vocab, 5)
    assert pairs.skipped_empty == 1 and set(pairs.image_ids.tolist()) == {2}
    assert pairs.caption_ids.tolist() == [cid for cid, _ in split.captions(2)]
    assert pairs.tokens.shape == (len(pairs), 7) and pairs.tokens.dtype == np.int32
    first = split.captions(2)[0][1]
    expected = [BOS_ID, *vocab.encode(first, 5), EOS_ID]
    assert pairs.tokens[0, :len(expected)].tolist() == expected
    assert (pairs.tokens[0, len(expected):] == PAD_ID).all() and (pairs.rows == 1).all()


def test_region_inputs_append_the_score_weighted_class(data):
    features = np.arange(2 * 3 * 2, dtype=np.float16).reshape(2, 3, 2)
    scores = np.array([[0.9, 0.2, 0.0], [0.5, 0.0, 0.0]], np.float32)
    labels = np.array([[2, 0, -1], [1, -1, -1]], np.int16)
    inputs = region_inputs(features, scores, labels, 3)
    assert inputs.shape == (2, 3, 5) and inputs.dtype == np.float32
    np.testing.assert_array_equal(inputs[..., :2], features.astype(np.float32))
    np.testing.assert_allclose(inputs[0, :, 2:], [[0, 0, 0.9], [0.2, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(inputs[1, :, 2:], [[0, 0.5, 0], [0, 0, 0], [0, 0, 0]])
    with pytest.raises(CpganError, match="train2014-00000.h5: labels span"):
        read_shard_arrays(data["regions"] / "train2014-00000.h5",
                          partial(region_inputs, num_classes=4))


def test_encoding_standardises_the_real_training_regions(data):
    shards, _ = plan_split(data["regions"], data["train"], data["vocab"], MAX_WORDS)
    encoding = fit_encoding(shards, 8)
    real = []
    for shard in shards:
        inputs, counts = read_shard_arrays(shard.path, encoding)
        rows = np.unique(shard.pairs.rows)
        real.append(inputs[rows][np.arange(inputs.shape[1]) < counts[rows][:, None]])
    real = np.concatenate(real)
    assert real.shape[1] == DIM + 8
    np.testing.assert_allclose(real.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(real.std(0), 1, atol=1e-3)


def test_training_loss_decreases_and_model_file_loads(data, trained):
    summary = trained["summary"]
    assert len(summary["train_loss"]) == len(summary["val_loss"]) == 4
    assert summary["train_loss"][-1] < 0.8 * summary["train_loss"][0]
    assert summary["val_loss"][-1] < summary["val_loss"][0]
    assert summary["skipped_failed"] == 1 and summary["skipped_empty"] == 1
    assert summary["train_images"] == 22 and summary["train_pairs"] == 22 * 5
    assert len(summary["samples"]) == 3 and all(s["caption"] for s in summary["samples"])
    raw = torch.load(trained["models"] / MODEL_NAME, map_location="cpu", weights_only=True)
    assert (raw["vocab_size"], raw["feature_dim"], raw["num_classes"], raw["hidden_dim"]) == (
        len(data["vocab"]), DIM, 8, 32)
    assert raw["state_dict"]["attention.feature_proj.weight"].shape[1] == DIM + 8
    assert raw["input_mean"].shape == raw["input_std"].shape == (DIM + 8,)
    model, encoding, sizes = load_captioner(trained["models"] / MODEL_NAME, len(data["vocab"]), DIM)
    assert not model.training and sizes["max_caption_words"] == MAX_WORDS
    assert np.array_equal(encoding.std, raw["input_std"].numpy()) and encoding.num_classes == 8
    with pytest.raises(CpganError, match="feature_dim"):
        load_captioner(trained["models"] / MODEL_NAME, feature_dim=DIM + 1)


def test_resume_continues_exactly(data, trained, tmp_path):
    models = tmp_path / "models"
    _train(data, models, epochs=2)
    half = _train(data, models, epochs=4, resume=True)
    ours = torch.load(models / CHECKPOINT_NAME, weights_only=True)
    reference = torch.load(trained["models"] / CHECKPOINT_NAME, weights_only=True)
    assert half["train_loss"] == trained["summary"]["train_loss"]
    for key, tensor in reference["model"].items():
        assert torch.equal(ours["model"][key], tensor), key
    for key, value in reference["optimizer"]["state"].items():
        assert torch.equal(ours["optimizer"]["state"][key]["exp_avg"], value["exp_avg"])
    with pytest.raises(CpganError, match="other settings"):
        _train(data, models, epochs=4, batch_size=4, resume=True)
    del ours["optimizer"]
    torch.save(ours, models / CHECKPOINT_NAME)
    with pytest.raises(CpganError, match=r"captioner.*does not fit this run \('optimizer'\)"):
        _train(data, models, epochs=4, resume=True)


def test_a_setting_the_checkpoint_predates_counts_as_its_default(data, tmp_path):
    """A checkpoint written before ``attention.grad_clip`` existed resumes when the run keeps
    the default, and is refused when the run sets something else."""
    models = tmp_path / "models"
    default = replace(CONFIG, grad_clip=AttentionConfig().grad_clip)
    train = partial(train_captioner, data["regions"], models, data["train"], data["val"],
                    data["vocab"], max_words=MAX_WORDS, progress=False)
    train(default, epochs=1)
    state = torch.load(models / CHECKPOINT_NAME, weights_only=True)
    del state["settings"]["config"]["grad_clip"]
    torch.save(state, models / CHECKPOINT_NAME)
    with pytest.raises(CpganError, match="other settings"):
        train(CONFIG, epochs=2, resume=True)
    assert train(default, epochs=2, resume=True)["epochs"] == 2


def test_missing_val_shards_is_a_clear_error(data, tmp_path):
    regions = tmp_path / "regions"
    regions.mkdir()
    for path in data["regions"].glob("train2014-*.h5"):
        (regions / path.name).symlink_to(path)
    (regions / store.INDEX_NAME).symlink_to(data["regions"] / store.INDEX_NAME)
    with pytest.raises(CpganError, match="detect --split val2014"):
        train_captioner(regions, tmp_path / "m", data["train"], data["val"], data["vocab"],
                        CONFIG, MAX_WORDS, progress=False, epochs=1)


def _narrow_val_shards(regions: Path, width: int) -> None:
    """Rewrite ``regions``' val shards with features cut to ``width`` dimensions, as a detector
    with another backbone layer would have written them."""
    for path in sorted(regions.glob("val2014-*.h5")):
        with store.RegionShard(path) as shard:
            columns = {name: shard.read(name) for name in
                       ("image_id", "boxes", "scores", "labels", "num_regions", "features")}
        path.unlink()  # a symlink to the shared fixture: replaced, never written through
        columns["features"] = columns["features"][..., :width]
        store.write_shard(path, store.RegionRows(*columns.values()), {"provenance": "narrow"})


def test_splits_that_cannot_train_together_are_refused(data, tmp_path):
    regions = tmp_path / "regions"
    regions.mkdir()
    for path in data["regions"].iterdir():
        (regions / path.name).symlink_to(path)
    train = partial(train_captioner, models_dir=tmp_path / "m", vocab=data["vocab"],
                    config=CONFIG, max_words=MAX_WORDS, progress=False, epochs=1)
    with pytest.raises(CpganError, match="no train2014 image with regions and captions"):
        train(regions, train_split=data["train"], val_split=data["val"], limit=0)

    coco = tmp_path / "coco"
    shutil.copytree(data["train"].root, coco)
    instances = data["val"].instances_file
    record = json.loads(instances.read_text())
    record["categories"][0]["name"] = "oval"
    (coco / instances.relative_to(data["val"].root)).write_text(json.dumps(record))
    renamed = CocoSplit.open(coco, "val2014")
    with pytest.raises(CpganError, match="instances_val2014.json: categories differ from "
                                         "instances_train2014.json"):
        train(regions, train_split=data["train"], val_split=renamed)

    _narrow_val_shards(regions, DIM - 4)
    with pytest.raises(CpganError, match=f"val2014 features are {DIM - 4}-d, train2014 ones "
                                         f"{DIM}-d"):
        train(regions, train_split=data["train"], val_split=data["val"])
    assert not (tmp_path / "m").exists()  # refused before anything was written
