"""The (image, caption) data module shared by DAMSM pretraining and the GAN trainer."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.text import PAD_ID, build_vocabulary
from cpgan.pipeline.toy import generate_toy_coco
from cpgan.trainer.data import (
    TextImageDataset,
    augment_image,
    batches,
    collate,
    eval_image,
    make_loader,
    multi_resolution_sizes,
    pyramid,
    to_unit_tensor,
)

TRAIN, VAL = 10, 6


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "coco"
    return generate_toy_coco(root, train_images=TRAIN, val_images=VAL, image_size=64, seed=5,
                             progress=False)


@pytest.fixture(scope="module")
def split(toy: Path) -> CocoSplit:
    return CocoSplit.open(toy, "train2014")


@pytest.fixture(scope="module")
def vocab(split: CocoSplit):
    return build_vocabulary(t for i in split.image_ids() for _, t in split.captions(i))


def _dataset(split, vocab, augment=True, seed=0, sizes=(32,), max_words=18, **kw):
    return TextImageDataset(split, vocab, max_words, sizes, augment=augment, seed=seed, **kw)


def test_training_items_have_every_size_in_range_and_vary_by_epoch(split, vocab):
    dataset = _dataset(split, vocab, sizes=multi_resolution_sizes(8, 3))
    first = dataset[3]
    assert [tuple(img.shape) for img in first.images] == [(3, 8, 8), (3, 16, 16), (3, 32, 32)]
    for image in first.images:
        assert image.dtype == torch.float32 and image.min() >= -1 and image.max() <= 1
        assert image.std() > 0.05  # a real picture, not a constant
    assert torch.equal(dataset[3].images[2], first.images[2])  # same (seed, epoch, index)
    changed = 0
    for epoch in range(1, 6):
        dataset.epoch = epoch
        changed += not torch.equal(dataset[3].images[2], first.images[2])
    assert changed >= 4  # new crop/flip draws each epoch


def test_augmentation_follows_attngan_on_a_non_square_image():
    rgb = np.random.default_rng(0).integers(0, 256, size=(40, 80, 3), dtype=np.uint8)
    image = to_unit_tensor(rgb)
    crops = [augment_image(image, 32, np.random.default_rng(seed))[0] for seed in range(20)]
    assert all(tuple(c.shape) == (3, 32, 32) for c in crops)
    assert len({c.sum().item() for c in crops}) > 10  # random crops and flips
    centre = eval_image(image, 32)
    assert tuple(centre.shape) == (3, 32, 32) and torch.equal(centre, eval_image(image, 32))
    # the shorter side becomes 32 (80 -> 64 wide), so the centre crop starts 16 columns in
    expected = torch.nn.functional.interpolate(image[None], size=(32, 64), mode="bilinear",
                                               align_corners=False, antialias=True)[0]
    assert torch.allclose(centre, expected[:, :, 16:48])


def test_without_the_crop_augmentation_is_the_evaluation_view_or_its_mirror():
    rgb = np.random.default_rng(1).integers(0, 256, size=(40, 80, 3), dtype=np.uint8)
    image = to_unit_tensor(rgb)
    centre = eval_image(image, 32)
    views = [augment_image(image, 32, np.random.default_rng(seed), crop=False)
             for seed in range(20)]
    flipped = [torch.equal(v, centre.flip(-1)) for v, _ in views]
    assert all(f or torch.equal(v, centre) for (v, _), f in zip(views, flipped))
    assert [f for _, f in views] == flipped  # the flag says which
    assert 0 < sum(flipped) < len(views)


def test_fixed_views_are_exactly_the_views_training_without_crop_produces(split, vocab):
    dataset = _dataset(split, vocab, sizes=(16, 32), crop=False)
    seen = set()
    for epoch in range(6):
        dataset.epoch = epoch
        for index in range(3):
            item = dataset[index]
            (fixed,) = dataset.fixed_views(index, (item.flipped,))
            assert fixed.flipped == item.flipped
            assert all(torch.equal(a, b) for a, b in zip(item.images, fixed.images))
            seen.add(item.flipped)
    assert seen == {False, True}
    plain, mirrored = dataset.fixed_views(0, (False, True))
    assert torch.equal(plain.images[1].flip(-1), mirrored.images[1])
    assert not torch.equal(plain.images[1], mirrored.images[1])
    batch = collate([plain, mirrored])
    assert batch.flipped.tolist() == [False, True] and batch.indices.tolist() == [0, 0]


def test_pixel_range_maps_black_to_minus_one_and_white_to_one():
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[:, 8:] = 255
    (image,) = pyramid(to_unit_tensor(rgb), [16])
    assert image[:, :, :8].eq(-1).all() and image[:, :, 8:].eq(1).all()


def test_captions_are_truncated_padded_and_without_specials(split, vocab):
    dataset = _dataset(split, vocab, augment=False, max_words=4)
    for index in range(len(dataset)):
        item = dataset[index]
        text = dict(split.captions(item.image_id))[item.caption_id]
        ids = vocab.encode(text, 4)
        assert item.length == len(ids) == 4  # toy captions have 6-16 words
        assert item.caption.tolist() == ids
    long = _dataset(split, vocab, augment=False, max_words=20)
    item = long[0]
    text = dict(split.captions(item.image_id))[item.caption_id]
    words = vocab.encode(text, 20)
    assert item.caption[:item.length].tolist() == words and item.length == len(words) < 20
    assert item.caption[item.length:].eq(PAD_ID).all() and item.caption.shape == (20,)
    batch = collate([long[i] for i in range(3)])
    assert batch.captions.shape == (3, 20) and batch.lengths.tolist() == [long[i].length
                                                                         for i in range(3)]


def test_evaluation_captions_are_fixed_by_the_seed(split, vocab):
    def choices(dataset):
        return [dataset[i].caption_id for i in range(len(dataset))]

    fixed = _dataset(split, vocab, augment=False, seed=1)
    first = choices(fixed)
    fixed.epoch = 7
    assert choices(fixed) == first
    assert choices(_dataset(split, vocab, augment=False, seed=1)) == first
    assert choices(_dataset(split, vocab, augment=False, seed=2)) != first
    assert torch.equal(fixed[0].images[0], _dataset(split, vocab, augment=False, seed=9)[0].images[0])
    training = _dataset(split, vocab, augment=True, seed=1)
    by_epoch = []
    for epoch in range(3):
        training.epoch = epoch
        by_epoch.append(choices(training))
    assert by_epoch[0] != by_epoch[1] or by_epoch[1] != by_epoch[2]


def test_a_bad_image_is_skipped_counted_and_left_out_later(toy: Path, vocab, tmp_path: Path):
    copy = tmp_path / "coco"
    shutil.copytree(toy, copy)
    split = CocoSplit.open(copy, "train2014")
    victim = split.captioned_image_ids()[4]
    path = split.image_path(victim)
    path.write_bytes(path.read_bytes()[:100])
    dataset = _dataset(split, vocab)
    failures, failed_indices, seen, sizes = {}, set(), [], []
    for batch in batches(make_loader(dataset, 1, epoch=0), failures, failed_indices):
        seen += batch.image_ids.tolist()
        sizes.append(len(batch))
    assert list(failures) == [victim] and "truncated" in failures[victim]
    assert failed_indices == {dataset.index_of(victim)}
    assert sorted(seen) == sorted(set(dataset.image_ids) - {victim})
    assert min(sizes) == 1  # the batch that held only the bad image was not yielded
    loader = make_loader(dataset, 4, epoch=1, exclude=failed_indices)
    assert dataset.index_of(victim) not in list(loader.sampler)
    later = {}
    assert sum(len(b) for b in batches(loader, later)) == len(dataset) - 1 and not later


def test_epoch_order_and_items_do_not_depend_on_workers(split, vocab):
    dataset = _dataset(split, vocab, limit=6)
    assert len(dataset) == 6

    def run(workers):
        out = []
        for batch in batches(make_loader(dataset, 4, epoch=2, num_workers=workers)):
            out.append((batch.image_ids.clone(), batch.captions.clone(), batch.images[0].clone()))
        return out

    serial, parallel = run(0), run(2)
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = list(make_loader(dataset, 6, epoch=3).sampler)
    assert sorted(other) == list(range(6)) and other != list(make_loader(dataset, 6, epoch=2).sampler)


def test_other_captions_are_the_image_s_others_drawn_per_epoch(split, vocab):
    dataset = _dataset(split, vocab, augment=True, seed=1)
    index = next(i for i in range(len(dataset)) if len(dataset.captions[i]) >= 3)
    own_id, own = dataset.captions[index][0]
    others = [ids for cid, ids in dataset.captions[index] if cid != own_id]
    draws = []
    for epoch in range(4):
        dataset.epoch = epoch
        drawn = dataset.other_captions(index, own_id, len(others))
        assert sorted(drawn) == sorted(others)  # each other caption once, never its own
        assert dataset.other_captions(index, own_id, len(others)) == drawn  # a pure function
        draws.append(drawn)
    assert any(d != draws[0] for d in draws[1:])  # the order is drawn per epoch
    more = dataset.other_captions(index, own_id, len(others) + 2)
    assert more[:len(others)] == draws[-1] and more[len(others):] == draws[-1][:2]
    lone = _dataset(split, vocab, augment=True, seed=1)
    lone.captions[index] = [(own_id, own)]
    assert lone.other_captions(index, own_id, 2) == [own, own]


def test_mirrored_views_have_left_and_right_swapped_in_their_captions(split, vocab):
    left, right = vocab.id("left"), vocab.id("right")
    dataset = _dataset(split, vocab, crop=False, mirror_captions=True)
    plain = _dataset(split, vocab, crop=False)
    swapped_seen = 0
    for epoch in range(8):
        dataset.epoch = plain.epoch = epoch
        for index in range(len(dataset)):
            item, same_draw = dataset[index], plain[index]
            assert item.flipped == same_draw.flipped and item.caption_id == same_draw.caption_id
            words = same_draw.caption.tolist()  # as written, the view's flip ignored
            if item.flipped:
                words = [{left: right, right: left}.get(w, w) for w in words]
                swapped_seen += words != same_draw.caption.tolist()
            assert item.caption.tolist() == words and item.length == same_draw.length
    assert swapped_seen > 0  # the toy captions do say left and right
    index = next(i for i, options in enumerate(dataset.captions)
                 if any(left in ids for _, ids in options[1:]))
    own_id = dataset.captions[index][0][0]
    as_written = dataset.other_captions(index, own_id, 4)
    mirrored = dataset.other_captions(index, own_id, 4, flipped=True)
    assert as_written == plain.other_captions(index, own_id, 4)
    assert mirrored == [[{left: right, right: left}.get(w, w) for w in ids] for ids in as_written]
    assert mirrored != as_written
