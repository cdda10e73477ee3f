"""Real (image, caption) pairs for the encoders (DAMSM pretraining) and the GAN.

One item is one image of a split with one of its captions, as AttnGAN's ``TextDataset``:

* training (``augment=True``): a caption drawn at random per image *per epoch*, and AttnGAN's
  augmentation -- resize the shorter side to ``int(S * 76 / 64)``, a random ``S x S`` crop, a
  random horizontal flip (``S`` the largest output size); with ``crop=False`` only the flip,
  on the evaluation's view of the image (the toy preset's DAMSM pretraining: see
  ``configs/toy.toml``);
* evaluation (``augment=False``): a caption fixed per image by the seed (the same pairs in every
  epoch and every run, so validation numbers are comparable), and the deterministic
  counterpart of the augmentation: shorter side resized to ``S``, centre ``S x S`` crop (a
  plain resize for square images such as the toy set's).

A flip makes "the star is on the left of the heart" false of its image. AttnGAN flips anyway
(COCO's captions seldom say left or right); with ``mirror_captions=True`` a mirrored view's
captions have ``left`` and ``right`` swapped (:data:`MIRRORED_WORDS`), so that every training
pair stays true. A fifth of the toy captions place one object left or right of another.

Every random choice is a function of ``(seed, epoch, index)`` only, never of a global RNG, a
loader worker or the batch the item lands in: ``num_workers``, interruptions and resumes do not
change what an epoch sees.

Captions follow the project's length rule (:mod:`cpgan.pipeline.text`): the first
``max_words`` tokens, no ``<bos>``/``<eos>`` (the text encoder reads words only), padded with
``<pad>`` to ``max_words`` columns, with their lengths. A caption with no token at all cannot be
encoded and is never chosen; an image with no usable caption is left out of the dataset
(:attr:`TextImageDataset.uncaptioned`).

Images come out as float tensors ``[3, s, s]`` in [-1, 1] (the generator's range): one per size
in ``sizes`` (ascending), the smaller ones resized from the largest as AttnGAN's ``get_imgs``
does, so the GAN trainer gets its 64/128/256 pyramid from the same module.

Images that fail to decode are never fatal. The dataset returns the item with ``images=None``
and the reason; :func:`collate` sets it aside in :attr:`Batch.failed`; :func:`batches` records
it and never yields an empty batch; the training loop passes the recorded failures to
:func:`make_loader`, which leaves them out of every later epoch (so only the epoch that first
meets a bad image has a batch one item short). The count is reported at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cpgan.errors import CpganError, ItemError
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.text import PAD_ID, UNK_ID, Vocabulary

RESIZE_NUMERATOR, RESIZE_DENOMINATOR = 76, 64  # AttnGAN: Scale(int(imsize * 76 / 64))
FLIP_PROBABILITY = 0.5
TRAIN_STREAM, EVAL_STREAM = 0, 1  # keep the epochs' draws and the evaluation draws apart
OTHER_CAPTIONS_STREAM = 3         # the extra captions of DAMSM pretraining (2: trainer/gan.py)
NEGATIVES_STREAM = 4              # its swapped captions (trainer/negatives.py)
MIRRORED_WORDS = (("left", "right"),)  # words a horizontal flip turns into each other


def multi_resolution_sizes(base_size: int, stages: int) -> tuple[int, ...]:
    """``base_size * 2**i`` for each GAN stage (paper 64, 128, 256), ascending."""
    if base_size < 1 or stages < 1:
        raise ValueError(f"base size and stages must be positive, got {base_size}, {stages}")
    return tuple(base_size * 2 ** i for i in range(stages))


@dataclass(frozen=True)
class Sample:
    """One dataset item; ``images`` is None (with ``error``) when the image failed to decode."""

    index: int
    image_id: int
    caption_id: int
    images: tuple[Tensor, ...] | None  # [3, s, s] per size, ascending, in [-1, 1]
    caption: Tensor                    # [max_words] long, <pad> after ``length`` words
    length: int
    error: str | None = None
    flipped: bool = False              # the view is mirrored (training augmentation)


@dataclass
class Batch:
    """Collated decoded samples; ``failed`` maps the image ids set aside to their reasons."""

    indices: Tensor        # [B] dataset indices
    image_ids: Tensor      # [B]
    caption_ids: Tensor    # [B]
    images: list[Tensor]   # per size, ascending: [B, 3, s, s]
    captions: Tensor       # [B, max_words] long
    lengths: Tensor        # [B] long
    failed: dict[int, str] = field(default_factory=dict)
    failed_indices: list[int] = field(default_factory=list)
    flipped: Tensor | None = None  # [B] bool: which views are mirrored (None: none are)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def to(self, device: str | torch.device) -> "Batch":
        """Images and captions on ``device`` (ids and view flags stay where they are)."""
        return Batch(self.indices, self.image_ids, self.caption_ids,
                     [image.to(device, non_blocking=True) for image in self.images],
                     self.captions.to(device), self.lengths.to(device), self.failed,
                     self.failed_indices, self.flipped)


# --------------------------------------------------------------------------------------------
# Images


def to_unit_tensor(rgb: np.ndarray) -> Tensor:
    """uint8 RGB ``H x W x 3`` -> float ``[3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)


def resize(image: Tensor, height: int, width: int) -> Tensor:
    """Bilinear resize with antialiasing (PIL's ``BILINEAR``, which AttnGAN's ``Scale`` used):
    plain bilinear would alias when shrinking 256 px images to 64 px."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return F.interpolate(image.unsqueeze(0), size=(height, width), mode="bilinear",
                         align_corners=False, antialias=True).squeeze(0)


def resize_shorter_side(image: Tensor, side: int) -> Tensor:
    """Scale so the shorter side is ``side``, keeping the aspect ratio (torchvision's
    ``Resize(int)`` rule: the longer side is ``int(side * long / short)``)."""
    height, width = image.shape[-2:]
    if height <= width:
        return resize(image, side, max(side, int(side * width / height)))
    return resize(image, max(side, int(side * height / width)), side)


def augment_image(image: Tensor, size: int, rng: np.random.Generator,
                  crop: bool = True) -> tuple[Tensor, bool]:
    """AttnGAN's training augmentation: shorter side to ``int(size * 76 / 64)``, a random
    ``size x size`` crop, a horizontal flip with probability 1/2. ``crop=False``: the flip
    alone, of :func:`eval_image`'s view (so the view is ``mirror(eval_image(...), flipped)``).
    Returns the view and whether it was flipped."""
    if crop:
        scaled = resize_shorter_side(image, int(size * RESIZE_NUMERATOR / RESIZE_DENOMINATOR))
        height, width = scaled.shape[-2:]
        top = int(rng.integers(height - size + 1))
        left = int(rng.integers(width - size + 1))
        view = scaled[:, top:top + size, left:left + size]
    else:
        view = eval_image(image, size)
    flipped = bool(rng.random() < FLIP_PROBABILITY)
    return mirror(view, flipped), flipped


def mirror(image: Tensor, flipped: bool) -> Tensor:
    """The image flipped left-right when ``flipped``, else itself."""
    return image.flip(-1) if flipped else image


def eval_image(image: Tensor, size: int) -> Tensor:
    """The deterministic counterpart: shorter side to ``size``, centre crop."""
    scaled = resize_shorter_side(image, size)
    height, width = scaled.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return scaled[:, top:top + size, left:left + size]


def pyramid(image: Tensor, sizes: Sequence[int]) -> tuple[Tensor, ...]:
    """The image at every size (the largest is ``image`` itself), mapped to [-1, 1]."""
    return tuple(resize(image, s, s).mul(2.0).sub(1.0).clamp_(-1.0, 1.0) for s in sizes)


# --------------------------------------------------------------------------------------------
# Dataset


def mirror_table(vocab: Vocabulary) -> dict[int, int]:
    """Token id -> the id of its mirror image (:data:`MIRRORED_WORDS`), both ways, for the
    pairs whose two words are in ``vocab``."""
    table: dict[int, int] = {}
    for first, second in MIRRORED_WORDS:
        a, b = vocab.id(first), vocab.id(second)
        if a != UNK_ID and b != UNK_ID:
            table.update({a: b, b: a})
    return table


def pad_caption(ids: Sequence[int], max_words: int) -> Tensor:
    """``[max_words]`` long tensor: the ids, then ``<pad>``."""
    caption = torch.full((max_words,), PAD_ID, dtype=torch.long)
    caption[:len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    return caption


class TextImageDataset(Dataset):
    """(image, caption) pairs of one split; see the module docstring for every rule.

    ``image_ids`` restricts the dataset (default: every captioned image of the split, in id
    order; ``limit`` keeps the first N of them). ``sizes`` are the output sizes, ascending.
    ``crop=False`` leaves the random crop out of the training augmentation (flip only);
    ``mirror_captions=True`` swaps left and right in the captions of mirrored views.
    Set :attr:`epoch` before each epoch when ``augment`` (:func:`make_loader` does).
    """

    def __init__(
        self,
        split: CocoSplit,
        vocab: Vocabulary,
        max_words: int,
        sizes: Sequence[int],
        augment: bool,
        seed: int = 0,
        image_ids: Sequence[int] | None = None,
        limit: int | None = None,
        crop: bool = True,
        mirror_captions: bool = False,
    ) -> None:
        if max_words < 1:
            raise ValueError(f"max_words must be positive, got {max_words}")
        if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"sizes must be positive and strictly ascending, got {sizes}")
        self.split = split
        self.max_words = max_words
        self.sizes = tuple(int(s) for s in sizes)
        self.augment = augment
        self.crop = crop
        self.mirror = mirror_table(vocab) if mirror_captions else {}
        self.seed = seed
        self.epoch = 0
        candidates = split.captioned_image_ids() if image_ids is None else list(image_ids)
        self.image_ids: list[int] = []
        self.captions: list[list[tuple[int, list[int]]]] = []
        self.uncaptioned: list[int] = []
        for image_id in candidates[:limit]:
            encoded = [(cid, vocab.encode(text, max_words)) for cid, text in split.captions(image_id)]
            usable = [(cid, ids) for cid, ids in encoded if ids]
            if usable:
                self.image_ids.append(image_id)
                self.captions.append(usable)
            else:
                self.uncaptioned.append(image_id)
        self._index_of = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    def index_of(self, image_id: int) -> int:
        return self._index_of[image_id]

    def _rng(self, index: int) -> np.random.Generator:
        """Training: a new draw per epoch; evaluation: one fixed draw per image and seed."""
        key = ([self.seed, TRAIN_STREAM, self.epoch, index] if self.augment
               else [self.seed, EVAL_STREAM, index])
        return np.random.default_rng(key)

    def __getitem__(self, index: int) -> Sample:
        rng = self._rng(index)
        options = self.captions[index]
        caption_id, ids = options[int(rng.integers(len(options)))]
        largest = self.sizes[-1]
        if self.augment:
            return self._samples(index, caption_id, ids,
                                 lambda image: [augment_image(image, largest, rng, self.crop)])[0]
        return self._samples(index, caption_id, ids,
                             lambda image: [(eval_image(image, largest), False)])[0]

    def other_captions(self, index: int, caption_id: int, count: int,
                       flipped: bool = False) -> list[list[int]]:
        """``count`` more captions (token ids) of image ``index`` besides ``caption_id``: its
        other captions in an order drawn per ``(seed, epoch, index)`` like every training draw,
        repeated when it has fewer than ``count`` (its own caption when it has no other);
        mirrored as the caption of the view is (``flipped``)."""
        options = self.captions[index]
        others = [ids for cid, ids in options if cid != caption_id] or [ids for _, ids in options]
        rng = np.random.default_rng([self.seed, OTHER_CAPTIONS_STREAM, self.epoch, index])
        order = rng.permutation(len(others))
        return [self._oriented(others[order[k % len(others)]], flipped) for k in range(count)]

    def _oriented(self, ids: list[int], flipped: bool) -> list[int]:
        """The caption as true of the view: left and right swapped for a mirrored view when
        the dataset mirrors captions."""
        if not (flipped and self.mirror):
            return ids
        return [self.mirror.get(token, token) for token in ids]

    def fixed_views(self, index: int, flips: Sequence[bool]) -> list[Sample]:
        """Image ``index`` decoded once, as :func:`eval_image`'s view mirrored or not per entry
        of ``flips`` (with its first caption): every view that training without the random
        crop can produce, for :mod:`cpgan.trainer.region_cache`."""
        caption_id, ids = self.captions[index][0]
        largest = self.sizes[-1]
        return self._samples(index, caption_id, ids, lambda image: [
            (mirror(eval_image(image, largest), flipped), flipped) for flipped in flips])

    def _samples(self, index: int, caption_id: int, ids: list[int],
                 views: Callable[[Tensor], list[tuple[Tensor, bool]]]) -> list[Sample]:
        """Decode image ``index`` and make one sample per ``(view, flipped)`` of ``views``; one
        failed sample if it cannot be decoded."""
        image_id = self.image_ids[index]
        try:
            rgb = self.split.load_image(image_id)
        except ItemError as err:
            return [Sample(index, image_id, caption_id, None, pad_caption(ids, self.max_words),
                           len(ids), str(err))]
        return [Sample(index, image_id, caption_id, pyramid(view, self.sizes),
                       pad_caption(self._oriented(ids, flipped), self.max_words), len(ids),
                       flipped=flipped)
                for view, flipped in views(to_unit_tensor(rgb))]


def collate(samples: list[Sample]) -> Batch:
    """Stack the decoded samples; set the failed ones aside in ``failed``."""
    good = [s for s in samples if s.images is not None]
    failed = {s.image_id: s.error or "" for s in samples if s.images is None}
    failed_indices = [s.index for s in samples if s.images is None]

    def longs(values: Iterable[int]) -> Tensor:
        return torch.tensor(list(values), dtype=torch.long)

    width = len(samples[0].caption) if samples else 0
    images = ([torch.stack([s.images[i] for s in good]) for i in range(len(good[0].images))]
              if good else [])
    captions = torch.stack([s.caption for s in good]) if good else torch.zeros(0, width, dtype=torch.long)
    return Batch(longs(s.index for s in good), longs(s.image_id for s in good),
                 longs(s.caption_id for s in good), images, captions,
                 longs(s.length for s in good), failed, failed_indices,
                 torch.tensor([s.flipped for s in good], dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# Loading


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The shuffle of epoch ``epoch``: a function of (seed, epoch) only, so a resume repeats it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def _worker_init(_: int) -> None:
    """Loader workers decode one image at a time: one thread each, no oversubscription."""
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)


def make_loader(
    dataset: TextImageDataset,
    batch_size: int,
    epoch: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    exclude: Iterable[int] = (),
) -> DataLoader:
    """A loader over one epoch: shuffled by (seed, epoch) when ``shuffle``, else in order;
    dataset indices in ``exclude`` (images known to fail) are left out."""
    if batch_size < 1 or num_workers < 0:
        raise CpganError(f"batch size must be positive and workers non-negative, got "
                         f"{batch_size}, {num_workers}")
    dataset.epoch = epoch
    order = epoch_order(len(dataset), dataset.seed, epoch) if shuffle else range(len(dataset))
    skip = set(exclude)
    sampler = [i for i in order if i not in skip]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None)


def batches(loader: Iterable[Batch], failures: dict[int, str] | None = None,
            failed_indices: set[int] | None = None) -> Iterator[Batch]:
    """The loader's non-empty batches; every image that failed is recorded in ``failures``
    (image id -> reason) and its dataset index in ``failed_indices``."""
    for batch in loader:
        if failures is not None:
            failures.update(batch.failed)
        if failed_indices is not None:
            failed_indices.update(batch.failed_indices)
        if len(batch):
            yield batch
