"""The V_o cache of DAMSM pretraining: the frozen detector run once per repeating view."""
import shutil

import pytest
import torch

from cpgan.config import load_config
from cpgan.model.image_encoder import ObjectAwareImageEncoder
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.toy import generate_toy_coco
from cpgan.trainer import damsm
from cpgan.trainer.data import TextImageDataset, batches, make_loader
from cpgan.trainer.region_cache import RegionCache, cache_bytes

from builders import random_detector, random_memory, toy_vocabulary

TINY = """
[encoder]
word_embed_dim = 8
text_dim = 8
backbone = "toy"
backbone_width = 4
batch_size = 6
"""


def decisive(detector):
    """An untrained detector whose scores are spread out: untrained, nearly all tie, and which
    of the tied boxes make the top 36 is then up to rounding."""
    heads = [m for m in detector.modules() if isinstance(m, torch.nn.Conv2d)
             and m.out_channels % 3 == 0 and m.bias is not None]
    assert heads
    with torch.no_grad():
        for conv in heads:
            conv.weight.mul_(30.0)
    return detector


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("region_cache")
    coco = generate_toy_coco(root / "coco", train_images=10, val_images=4, image_size=64,
                             seed=3, progress=False)
    vocab = toy_vocabulary(coco)
    (root / "tiny.toml").write_text(TINY)
    config = load_config("toy", root / "tiny.toml")
    detector = decisive(random_detector(seed=0))
    extractor = damsm.build_region_extractor(detector,
                                             damsm.region_settings(detector, config.detector))
    image = damsm.build_image_encoder(config.encoder, extractor)
    text = damsm.build_text_encoder(len(vocab), config.encoder, random_memory(len(vocab), 8))
    return {"root": root, "coco": coco, "vocab": vocab, "config": config, "image": image,
            "text": text}


def _dataset(setup, coco=None) -> TextImageDataset:
    return TextImageDataset(CocoSplit.open(coco or setup["coco"], "train2014"), setup["vocab"],
                            setup["config"].data.max_caption_words, [64], augment=True,
                            crop=False)


def _build(setup, dataset, flips=(False, True), **kw) -> RegionCache:
    return RegionCache.build(setup["image"].detect, dataset, flips, batch_size=4,
                             progress=False, **kw)


def _in_box_order(regions) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes and features of every image sorted by box: an untrained detector ties its scores,
    so the order of equal-scored boxes is up to rounding; V_o's order never matters (Eq. 10
    feeds attention over regions)."""
    keys = regions.boxes.round(decimals=2)
    boxes, features = [], []
    for key, box, feature in zip(keys, regions.boxes, regions.features):
        order = sorted(range(len(key)), key=lambda i: key[i].tolist())
        boxes.append(box[order]), features.append(feature[order])
    return torch.stack(boxes), torch.stack(features)


def test_cached_detections_are_the_detectors_on_the_same_views(setup):
    dataset = _dataset(setup)
    cache = _build(setup, dataset)
    assert cache.filled.all()
    flips = set()
    for epoch in range(2):
        for batch in batches(make_loader(dataset, 5, epoch=epoch)):
            cached = cache.lookup(batch.indices, batch.flipped)
            direct = setup["image"].detect(batch.images[-1])
            assert torch.equal(cached.num_regions, direct.num_regions)
            (cached_boxes, cached_features), (boxes, features) = map(_in_box_order,
                                                                     (cached, direct))
            assert torch.allclose(cached_boxes, boxes, atol=1e-3)
            assert torch.allclose(cached_features, features, atol=1e-5)
            mirrors = _in_box_order(cache.lookup(batch.indices, ~batch.flipped))[0]
            assert not torch.allclose(mirrors, boxes, atol=1e-3)  # the view matters
            flips.update(batch.flipped.tolist())
    assert flips == {False, True}  # both views were looked up


def test_the_damsm_loss_with_the_cache_equals_the_loss_without(setup):
    dataset = _dataset(setup)
    cache = _build(setup, dataset)
    batch = next(iter(batches(make_loader(dataset, 8, epoch=1))))
    assert 0 < int(batch.flipped.sum()) < len(batch)
    text, image, encoder = setup["text"], setup["image"], setup["config"].encoder
    text.eval(), image.eval()
    with torch.no_grad():
        with_cache = damsm._loss(text, image, batch, encoder, cache)
        without = damsm._loss(text, image, batch, encoder)
    for a, b in zip(with_cache, without):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_corrupt_image_is_recorded_and_has_no_entry(setup, tmp_path):
    coco = tmp_path / "coco"
    shutil.copytree(setup["coco"], coco)
    dataset = _dataset(setup, coco)
    victim = dataset.image_ids[2]
    dataset.split.image_path(victim).write_bytes(b"not an image")
    failures, failed_indices = {}, set()
    cache = _build(setup, dataset, failures=failures, failed_indices=failed_indices)
    assert list(failures) == [victim] and failed_indices == {2}
    assert cache.filled.sum(dim=1).tolist() == [2, 2, 0] + [2] * (len(dataset) - 3)
    with pytest.raises(KeyError, match=r"\[2\]"):
        cache.lookup(torch.tensor([1, 2]), torch.tensor([False, True]))
    assert cache.lookup(torch.tensor([1, 3]), None).features.shape[0] == 2


def test_only_the_evaluation_view_and_its_mirror_and_the_size_is_what_it_holds(setup):
    dataset = _dataset(setup)
    with pytest.raises(ValueError, match="flips"):
        _build(setup, dataset, flips=(True,))
    cache = _build(setup, dataset, flips=(False,))
    held = sum(t.numel() * t.element_size() for t in vars(cache).values())
    extractor = setup["image"].detector
    assert held == cache_bytes(len(dataset), 1, extractor.num_regions, extractor.feature_dim)


def test_damsm_pretraining_runs_the_detector_once_per_view(setup, monkeypatch, tmp_path):
    calls = []
    detect = ObjectAwareImageEncoder.detect

    def counting(self, images):
        calls.append(len(images))
        return detect(self, images)

    monkeypatch.setattr(ObjectAwareImageEncoder, "detect", counting)
    config = setup["config"]
    config.encoder.epochs = 3
    damsm.train_damsm(setup["coco"], tmp_path, config, setup["vocab"], random_memory(
        len(setup["vocab"]), 8), random_detector(seed=0), progress=False, threads=1)
    assert sum(calls) == 2 * 10 + 4  # train images and their mirrors, val images: once each
    config.encoder.random_crop = True  # views no longer repeat: the detector runs every step
    calls.clear()
    damsm.train_damsm(setup["coco"], tmp_path / "crop", config, setup["vocab"], random_memory(
        len(setup["vocab"]), 8), random_detector(seed=0), progress=False, threads=1)
    assert sum(calls) == 3 * 10 + 4  # every train image every epoch; val still once
    config.encoder.random_crop = False


def test_a_corrupt_val_image_is_evaluations_failure_not_a_skipped_train_image(setup, tmp_path):
    coco = tmp_path / "coco"
    shutil.copytree(setup["coco"], coco)
    val = CocoSplit.open(coco, "val2014")
    val.image_path(val.captioned_image_ids()[1]).write_bytes(b"not an image")
    config = setup["config"]
    config.encoder.epochs = 1
    run = damsm.train_damsm(coco, tmp_path / "models", config, setup["vocab"],
                            random_memory(len(setup["vocab"]), 8), random_detector(seed=0),
                            progress=False, threads=1)
    assert run.skipped_images == 0 and run.train_images == 10
    assert run.metrics["val_failed"] == 1.0 and run.metrics["val_images"] == 3.0
