"""Tests of detector training: data, learning, checkpoint/resume, outputs, evaluation."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import cpgan.trainer.detector as detector
from cpgan.config import DetectorConfig
from cpgan.errors import CpganError
from cpgan.model.darknet import Darknet, read_weights
from cpgan.model.yolo_loss import yolo_loss
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.toy import generate_toy_coco
from cpgan.trainer.detector import (
    DetectionDataset,
    collate,
    coco_map,
    init_output_biases,
    train_detector,
)

# A network small enough to train in a fraction of a second per epoch: 64 px input, two heads
# (stride 16 and 8), 8 classes as the toy dataset.
MINI_CFG = """
[net]
width=64
height=64
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=32
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=39
size=1
stride=1
pad=1
activation=linear

[yolo]
mask = 3,4,5
anchors = 8,8, 12,12, 16,16, 22,22, 30,30, 40,40
classes={classes}
num=6
ignore_thresh = .7

[route]
layers = -4

[convolutional]
filters=39
size=1
stride=1
pad=1
activation=linear

[yolo]
mask = 0,1,2
anchors = 8,8, 12,12, 16,16, 22,22, 30,30, 40,40
classes={classes}
num=6
ignore_thresh = .7
"""


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_toy_coco(tmp_path_factory.mktemp("toy") / "coco", train_images=16,
                             val_images=8, image_size=64, seed=3, progress=False)


@pytest.fixture(scope="module")
def mini_cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "mini.cfg"
    path.write_text(MINI_CFG.replace("{classes}", "8"))
    return path


@pytest.fixture()
def config(mini_cfg: Path) -> DetectorConfig:
    return DetectorConfig(cfg=str(mini_cfg), input_size=64, train_epochs=2, train_batch_size=8,
                          train_lr=5e-3, train_warmup_steps=2, train_workers=0,
                          train_average_decay=0.9)


def _train(root: Path, artifacts: Path, config: DetectorConfig, **kwargs) -> dict:
    return train_detector(root, artifacts, config, seed=7, progress=False, threads=1, **kwargs)


def _dataset(root: Path, augment: bool) -> DetectionDataset:
    split = CocoSplit.open(root, "train2014", require_instances=True)
    class_of = {cat: i for i, cat in enumerate(split.categories())}
    return DetectionDataset(split, split.image_ids(), 64, class_of, augment=augment, seed=0)


def test_samples_carry_letterboxed_boxes_and_flips_mirror_them(toy_root: Path) -> None:
    plain, augmented = _dataset(toy_root, False), _dataset(toy_root, True)
    flipped = [i for i in range(len(plain)) if augmented._flip(i)]
    kept = [i for i in range(len(plain)) if not augmented._flip(i)]
    assert flipped and kept
    i = flipped[0]
    a, b = plain[i], augmented[i]
    assert torch.equal(b.image, a.image.flip(-1))
    assert torch.equal(b.targets[:, 0], a.targets[:, 0])
    assert torch.allclose(b.targets[:, [1, 3]], 64 - a.targets[:, [3, 1]])
    split = plain.split
    ann = split.instances(split.image_ids()[i])[0]
    x, y, w, h = ann["bbox"]
    assert a.targets[0].tolist() == pytest.approx([ann["category_id"] - 1, x, y, x + w, y + h])
    assert torch.equal(augmented[kept[0]].image, plain[kept[0]].image)


def test_a_few_steps_lower_the_loss(toy_root: Path, config: DetectorConfig, mini_cfg: Path) -> None:
    torch.manual_seed(0)
    model = Darknet.from_cfg_file(mini_cfg)
    init_output_biases(model)
    batch = collate([_dataset(toy_root, False)[i] for i in range(16)])
    optimizer = detector._optimizer(model, config)
    losses = []
    for _ in range(25):
        heads, _ = model(batch.images)
        loss, _ = yolo_loss(heads, model.yolo_specs, batch.targets, 0.7)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_resume_continues_exactly(toy_root: Path, tmp_path: Path, config: DetectorConfig,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    straight = _train(toy_root, tmp_path / "straight", config)

    class Killed(Exception):
        pass

    save = detector._save_checkpoint

    def save_then_die(path: Path, state: dict) -> None:
        save(path, state)
        raise Killed  # the run is killed right after its first epoch's checkpoint

    monkeypatch.setattr(detector, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        _train(toy_root, tmp_path / "resumed", config)
    monkeypatch.setattr(detector, "_save_checkpoint", save)
    checkpoint = torch.load(tmp_path / "resumed" / "models" / "detector.ckpt.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    resumed = _train(toy_root, tmp_path / "resumed", config, resume=True)

    a = torch.load(tmp_path / "straight" / "models" / "detector.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "models" / "detector.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    last = torch.load(tmp_path / "straight" / "models" / "detector.ckpt.pt", weights_only=True)
    assert last["epoch"] == 2 and last["seen"] == 32
    assert (straight["map50"], straight["map"]) == (resumed["map50"], resumed["map"])
    # and the training really moved the weights away from the resumed checkpoint
    assert not torch.equal(checkpoint["model"]["layers.0.conv.weight"],
                           last["model"]["layers.0.conv.weight"])
    # a checkpoint of another run (here another learning rate) is refused, not spliced in
    with pytest.raises(CpganError, match="lr="):
        _train(toy_root, tmp_path / "straight", dataclasses.replace(config, train_lr=1e-3),
               resume=True)


def test_outputs_load_safely_and_weights_round_trip(toy_root: Path, tmp_path: Path,
                                                    config: DetectorConfig, mini_cfg: Path) -> None:
    summary = _train(toy_root, tmp_path, dataclasses.replace(config, train_epochs=1))
    assert summary["epochs"] == 1 and summary["train_images"] == 16
    assert summary["skipped_images"] == 0 and summary["val_images"] == 8
    assert 0.0 <= summary["map50"] <= 1.0 and 0.0 <= summary["map"] <= summary["map50"]
    saved = torch.load(tmp_path / "models" / "detector.pt", weights_only=True)
    assert saved["category_ids"] == list(range(1, 9)) and saved["input_size"] == 64
    assert saved["class_names"][:3] == ["circle", "square", "triangle"]
    from_pt = Darknet.from_cfg_file(mini_cfg)
    from_pt.load_state_dict(saved["state_dict"])
    from_weights = Darknet.from_cfg_file(mini_cfg)
    read_weights(from_weights, tmp_path / "models" / "detector.weights")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        heads_pt, _ = from_pt.eval()(x)
        heads_w, _ = from_weights.eval()(x)
    assert all(torch.equal(p, w) for p, w in zip(heads_pt, heads_w))


def test_undecodable_image_is_skipped_and_counted(toy_root: Path, tmp_path: Path,
                                                  config: DetectorConfig) -> None:
    root = tmp_path / "coco"
    import shutil

    shutil.copytree(toy_root, root)
    victim = sorted((root / "train2014").iterdir())[3]
    victim.write_bytes(b"\xff\xd8\xff not really a jpeg")
    summary = _train(root, tmp_path / "art", dataclasses.replace(config, train_epochs=1))
    assert summary["skipped_images"] == 1 and summary["train_images"] == 15


def test_class_count_must_match_the_dataset(toy_root: Path, tmp_path: Path,
                                            config: DetectorConfig) -> None:
    cfg = tmp_path / "four.cfg"
    cfg.write_text(MINI_CFG.replace("{classes}", "4").replace("filters=39", "filters=27"))
    with pytest.raises(CpganError, match="4 classes but the dataset has 8"):
        _train(toy_root, tmp_path / "art", dataclasses.replace(config, cfg=str(cfg)))


@pytest.mark.parametrize("defect, words", [
    (lambda d: d["categories"][0].update(name="oval"),
     "instances_val2014.json: categories differ from instances_train2014.json"),
    (lambda d: d.pop("categories"), 'instances_val2014.json: not a COCO annotation file'),
])
def test_a_bad_val_split_is_refused_before_training(toy_root: Path, tmp_path: Path,
                                                    config: DetectorConfig, defect, words) -> None:
    """mAP is scored on val after the last epoch; its file is checked before the first."""
    root = tmp_path / "coco"
    shutil.copytree(toy_root, root)
    instances = root / "annotations" / "instances_val2014.json"
    record = json.loads(instances.read_text())
    defect(record)
    instances.write_text(json.dumps(record))
    with pytest.raises(CpganError, match=words):
        _train(root, tmp_path / "art", config)
    assert not (tmp_path / "art" / "models").exists()  # no epoch was trained


@pytest.mark.parametrize("decay", [1.0, -0.5])
def test_a_weight_average_decay_outside_zero_one_is_refused(toy_root: Path, tmp_path: Path,
                                                            config: DetectorConfig,
                                                            decay: float) -> None:
    with pytest.raises(CpganError, match="train_average_decay must lie in"):
        _train(toy_root, tmp_path / "art", dataclasses.replace(config, train_average_decay=decay))


def test_coco_map_scores_ground_truth_as_perfect(toy_root: Path) -> None:
    split = CocoSplit.open(toy_root, "val2014", require_instances=True)
    ids = split.image_ids()
    truth = [{"image_id": i, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
             for i in ids for a in split.instances(i)]
    assert coco_map(split, ids, truth) == {"map50": 1.0, "map": 1.0}
    wrong_class = [{**r, "category_id": r["category_id"] % 8 + 1} for r in truth]
    assert coco_map(split, ids, wrong_class)["map50"] == 0.0
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2] * 0.3, *r["bbox"][1:]]} for r in truth]
    scores = coco_map(split, ids, shifted)
    assert scores["map50"] == 1.0 and scores["map"] == pytest.approx(0.1, abs=0.01)
    assert coco_map(split, ids, []) == {"map50": 0.0, "map": 0.0}


def test_cli_retrains_for_training_settings_not_for_extraction_ones(
        toy_root: Path, tmp_path: Path, mini_cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train-detector`` is up to date while only what ``detect`` reads changes (the region
    count, the feature layer, the shard size) and retrains when a training setting does."""
    from cpgan.cli.prep import main as prep_main

    calls: list[DetectorConfig] = []

    def fake_train(coco_root, artifacts, config, **_):
        calls.append(dataclasses.replace(config))
        for name in ("detector.pt", "detector.weights"):
            (artifacts / "models").mkdir(parents=True, exist_ok=True)
            (artifacts / "models" / name).write_bytes(f"{name} {len(calls)}".encode())
        return {"map50": 0.5, "map": 0.25, "epochs": config.train_epochs, "seconds": 0.0}

    monkeypatch.setattr(detector, "train_detector", fake_train)

    def run(settings: str) -> None:
        toml = tmp_path / "settings.toml"
        toml.write_text(f'[detector]\ncfg = "{mini_cfg}"\n{settings}\n')
        try:
            prep_main(["train-detector", "--artifacts", str(tmp_path / "artifacts"),
                       "--coco-root", str(toy_root), "--config", str(toml)])
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code

    run("feature_layer = 20")
    run("feature_layer = 16\nfeature_dim = 128\nnum_regions = 10\nshard_size = 7\n"
        "train_workers = 2")
    assert len(calls) == 1
    run("feature_layer = 16\ntrain_lr = 1e-2")
    assert len(calls) == 2 and calls[1].train_lr == 1e-2
    run("feature_layer = 16\ntrain_lr = 1e-2\ninput_size = 96")
    assert len(calls) == 3
