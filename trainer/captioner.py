"""``cpgan-prep train-attention``: fit the Bottom-Up/Top-Down captioner of §3.2.1 on the regions.

CPGAN uses a *pretrained* Up-Down captioner only for its attention: the salience a_{i,n} of
each region for each word (Eq. 7). This module trains that captioner the usual way (Anderson et
al.): teacher-forced cross-entropy over the train split's captions, each caption encoded as
``<bos>`` + its first ``max_caption_words`` tokens + ``<eos>`` (the project-wide caption-length
rule of :mod:`cpgan.pipeline.text`), Adam with gradient-norm clipping.

Data streams from the HDF5 region shards: one shard's features are in memory at a time (a
COCO shard of 1024 images is ~75 MB of float16), shards are visited in a seeded random order
each epoch and the (image, caption) pairs of a shard are shuffled within it, so peak memory
does not grow with the dataset. Images whose detection failed (no row in their shard, a
non-``ok`` status in ``regions/index.parquet``) and images with zero regions (nothing to attend
to) are skipped and counted.

What the captioner sees of region i (:class:`RegionEncoding`) is the stored D-d feature v_i
followed by the detector's class posterior as a score-weighted one-hot over the dataset's C
categories, standardised per dimension with train-split statistics:
x_i = ([v_i ; s_i e_{c_i}] - mu) / sigma. Anderson et al.'s bottom-up features are a Faster
R-CNN's pooled features, trained through its classification head and therefore object-level;
YOLOv3's backbone map mean-pooled over a box is not the classifier's output, and at the toy
input size (a 4x4 stride-32 map) near-duplicate and junk boxes get almost the same vector, so
the attention cannot tell an object's confident box from a low-score box half on it. The class
posterior restores what the bottom-up attention relies on, and the standardisation gives its
C dimensions the same scale as the D feature dimensions (on the toy set: grounding 0.45 with
v_i alone, 0.51 with the raw posterior appended, 0.72 standardised, after 3 epochs on 1000
images). Memory construction (Eq. 7) still averages the stored features v only; x_i is the
captioner's input, nothing else.

A checkpoint after every epoch (``models/captioner.ckpt.pt``: model, optimiser, epoch, loss
history and the torch RNG state that drives dropout) lets ``resume=True`` continue exactly
where a killed run stopped: the epoch order is a function of (seed, epoch) only. The final
model is ``models/captioner.pt``, a plain dict of tensors and sizes loadable with
``torch.load(..., weights_only=True)`` (see :func:`load_captioner`).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow.compute as pc
import torch
from torch import Tensor
from tqdm import tqdm

from cpgan import layout
from cpgan.config import AttentionConfig, config_defaults, fill_new_keys
from cpgan.errors import CpganError
from cpgan.model.butd import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UpDownCaptioner,
    caption_loss,
    region_mask_from_counts,
)
from cpgan.pipeline import regions as store
from cpgan.pipeline.artifacts import atomic_write
from cpgan.pipeline.text import Vocabulary
from cpgan.torch_file import load_torch_file, refuse_nonfinite
from cpgan.trainer.resume import (
    finite_numbers,
    load_epoch_checkpoint,
    load_optimizer_state,
    refusing_unfit_checkpoint,
)

# in cpgan.layout: the up-to-date checks read these without torch
TRAIN_SPLIT = layout.CAPTIONER_TRAIN_SPLIT
VAL_SPLIT = layout.CAPTIONER_VAL_SPLIT
MODEL_NAME = layout.CAPTIONER_NAME
CHECKPOINT_NAME = "captioner.ckpt.pt"
SAMPLE_CAPTIONS = 3
_SIZE_KEYS = ("vocab_size", "feature_dim", "num_classes", "embed_dim", "hidden_dim",
              "attention_dim")
_MIN_STD = 1e-6


# --------------------------------------------------------------------------------------------
# Region shards and caption pairs (shared with pipeline/attend.py)


split_shards = layout.split_shards  # in cpgan.layout: read without torch


def failed_images(regions_dir: Path, split: str) -> list[int]:
    """Image ids of ``split`` whose detection failed (status != ok in ``regions/index.parquet``).

    Those images have no row in any shard; the index is where detect records why.
    """
    index = store.read_index(Path(regions_dir) / store.INDEX_NAME)
    rows = index.filter(pc.and_(pc.equal(index["split"], split),
                                pc.not_equal(index["status"], store.STATUS_OK)))
    return sorted(rows["image_id"].to_pylist())


def encode_caption(vocab: Vocabulary, text: str, max_words: int) -> list[int]:
    """``<bos>`` + the first ``max_words`` token ids + ``<eos>``: what the captioner reads."""
    return [BOS_ID, *vocab.encode(text, max_words), EOS_ID]


@dataclass
class CaptionPairs:
    """The (image, caption) pairs of one region shard, captions encoded and padded.

    ``rows`` index the shard's rows, so features are gathered without a lookup table.
    """

    rows: np.ndarray  # int64 [P]
    image_ids: np.ndarray  # int64 [P]
    caption_ids: np.ndarray  # int64 [P]
    tokens: np.ndarray  # int32 [P, max_words + 2], <pad>-padded
    skipped_empty: int  # images of the shard with zero regions (no pairs)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, index: np.ndarray) -> "CaptionPairs":
        return CaptionPairs(self.rows[index], self.image_ids[index], self.caption_ids[index],
                            self.tokens[index], self.skipped_empty)


def caption_pairs(image_ids: np.ndarray, num_regions: np.ndarray,
                  captions: Callable[[int], list[tuple[int, str]]], vocab: Vocabulary,
                  max_words: int) -> CaptionPairs:
    """Encode every caption of every image of a shard that has at least one region.

    ``captions(image_id)`` gives ``(caption_id, text)`` pairs (``CocoSplit.captions``).
    """
    rows, ids, cids, tokens, empty = [], [], [], [], 0
    for row, (image_id, count) in enumerate(zip(image_ids.tolist(), num_regions.tolist())):
        if count == 0:
            empty += 1
            continue
        for caption_id, text in captions(image_id):
            rows.append(row)
            ids.append(image_id)
            cids.append(caption_id)
            tokens.append(encode_caption(vocab, text, max_words))
    padded = np.full((len(tokens), max_words + 2), PAD_ID, dtype=np.int32)
    for i, row_tokens in enumerate(tokens):
        padded[i, :len(row_tokens)] = row_tokens
    return CaptionPairs(np.asarray(rows, dtype=np.int64), np.asarray(ids, dtype=np.int64),
                        np.asarray(cids, dtype=np.int64), padded, empty)


@dataclass
class Batch:
    """Tensors for one forward pass: features [B, R, D] f32, mask [B, R], captions [B, T]."""

    features: Tensor
    mask: Tensor
    captions: Tensor

    def to(self, device: str) -> "Batch":
        return Batch(self.features.to(device), self.mask.to(device), self.captions.to(device))


@dataclass(frozen=True)
class RegionEncoding:
    """How a shard row becomes the captioner's input: x = ([v ; s e_c] - mean) / std.

    ``mean``/``std`` (float32 [D + C]) are fitted on the real regions of the training images
    (:func:`fit_encoding`) and travel inside ``captioner.pt``.
    """

    num_classes: int
    mean: np.ndarray
    std: np.ndarray

    def __call__(self, features: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        raw = region_inputs(features, scores, labels, self.num_classes)
        if raw.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"regions give {raw.shape[-1]} inputs, the encoding expects "
                             f"{self.mean.shape[0]}")
        return (raw - self.mean) / self.std


def region_inputs(features: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                  num_classes: int) -> np.ndarray:
    """[v_i ; s_i e_{c_i}], float32 [n, R, D + C], from a shard's rows (see module doc).

    Padded slots (label -1) get a zero class part; a label outside [-1, C) is a caller error
    (``ValueError``), caught per shard by :func:`read_shard_arrays`.
    """
    if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
        raise ValueError(f"labels span {labels.min()}..{labels.max()}, "
                         f"expected -1..{num_classes - 1}")
    posterior = np.zeros(labels.shape + (num_classes,), dtype=np.float32)
    rows, slots = np.nonzero(labels >= 0)
    posterior[rows, slots, labels[rows, slots]] = scores[rows, slots]
    return np.concatenate([features.astype(np.float32), posterior], axis=-1)


def make_batch(features: np.ndarray, num_regions: np.ndarray, pairs: CaptionPairs) -> Batch:
    """Gather each pair's region inputs from a shard's arrays; trim captions to the longest.

    Trimming only drops columns that are <pad> in every row, which carry no loss and whose
    steps cannot influence earlier ones.
    """
    tokens = torch.from_numpy(pairs.tokens.astype(np.int64))
    length = int((tokens != PAD_ID).sum(dim=1).max())
    counts = torch.from_numpy(num_regions[pairs.rows].astype(np.int64))
    return Batch(torch.from_numpy(features[pairs.rows].astype(np.float32)),
                 region_mask_from_counts(counts, features.shape[1]), tokens[:, :length])


@dataclass
class ShardData:
    """A shard's path and its caption pairs, planned once before training."""

    path: Path
    pairs: CaptionPairs


def plan_split(regions_dir: Path, split: Any, vocab: Vocabulary, max_words: int,
               limit: int | None = None) -> tuple[list[ShardData], dict[str, int]]:
    """Caption pairs of every shard of ``split`` (a ``CocoSplit``); counts of what is skipped.

    ``limit`` keeps the first N images in shard order. Raises when the split has no shards.
    """
    paths = split_shards(regions_dir, split.split)
    if not paths:
        raise CpganError(f"{Path(regions_dir) / (split.split + '-00000.h5')}: no region shards "
                         f"for {split.split} (run 'cpgan-prep detect --split {split.split}')")
    shards, images, empty, feature_dim = [], 0, 0, None
    for path in paths:
        if limit is not None and images >= limit:
            break
        with store.RegionShard(path) as shard:
            ids, counts = shard.read("image_id"), shard.read("num_regions")
            if feature_dim is not None and shard.feature_dim != feature_dim:
                raise CpganError(f"{path}: features are {shard.feature_dim}-d, other shards "
                                 f"of {split.split} have {feature_dim}")
            feature_dim = shard.feature_dim
        if limit is not None:
            ids, counts = ids[:limit - images], counts[:limit - images]
        pairs = caption_pairs(ids, counts, split.captions, vocab, max_words)
        shards.append(ShardData(path, pairs))
        images += len(ids)
        empty += pairs.skipped_empty
    counts = {"images": images - empty, "pairs": sum(len(s.pairs) for s in shards),
              "skipped_empty": empty,
              "skipped_failed": len(failed_images(regions_dir, split.split)),
              "feature_dim": int(feature_dim or 0)}
    return shards, counts


def read_shard_arrays(path: Path, encode: Callable[..., np.ndarray],
                      rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``encode(features, scores, labels)`` and the region counts of a shard's ``rows`` (all).

    ``encode`` is a :class:`RegionEncoding` (or ``region_inputs`` with C bound); a shard whose
    labels or sizes do not fit it is a one-line error naming the shard.
    """
    with store.RegionShard(path) as shard:
        arrays = {name: shard.read(name, rows) for name in
                  ("features", "scores", "labels", "num_regions")}
    try:
        inputs = encode(arrays["features"], arrays["scores"], arrays["labels"])
    except ValueError as exc:
        raise CpganError(f"{path}: {exc} (regions from another detector or dataset?)") from None
    return inputs, arrays["num_regions"]


def fit_encoding(shards: Sequence[ShardData], num_classes: int) -> RegionEncoding:
    """Per-dimension mean and std of [v ; s e_c] over the real regions of the shards' images.

    One streaming pass in float64 and fixed shard order, so the statistics are exact and the
    same on every run; constant dimensions (a class never detected) keep a std of 1.
    """
    total, squares, count = None, None, 0
    for data in shards:
        if not len(data.pairs):
            continue
        raw, counts = read_shard_arrays(data.path, partial(region_inputs, num_classes=num_classes))
        rows = np.unique(data.pairs.rows)
        is_real = np.arange(raw.shape[1])[None, :] < counts[rows][:, None]
        real = raw[rows][is_real].astype(np.float64)
        total = real.sum(0) if total is None else total + real.sum(0)
        squares = (real ** 2).sum(0) if squares is None else squares + (real ** 2).sum(0)
        count += len(real)
    if not count:
        raise CpganError("no real region to fit the captioner's input statistics on")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    std = np.where(std > _MIN_STD, std, 1.0)
    return RegionEncoding(num_classes, mean.astype(np.float32), std.astype(np.float32))


def shard_batches(shards: Sequence[ShardData], batch_size: int, encoding: RegionEncoding,
                  generator: torch.Generator | None = None) -> Iterator[Batch]:
    """Batches over the shards, one shard's features in memory at a time.

    With a ``generator`` the shard order and the pair order within each shard are shuffled
    (the shuffle buffer is one shard); without one, everything is in stored order.
    """
    order = range(len(shards))
    if generator is not None:
        order = torch.randperm(len(shards), generator=generator).tolist()
    for index in order:
        data = shards[index]
        if not len(data.pairs):
            continue
        features, counts = read_shard_arrays(data.path, encoding)
        perm = (torch.randperm(len(data.pairs), generator=generator).numpy()
                if generator is not None else np.arange(len(data.pairs)))
        for start in range(0, len(perm), batch_size):
            yield make_batch(features, counts, data.pairs.take(perm[start:start + batch_size]))


# --------------------------------------------------------------------------------------------
# Model files


def build_captioner(vocab_size: int, feature_dim: int, num_classes: int,
                    config: AttentionConfig) -> UpDownCaptioner:
    """The Up-Down captioner over region inputs of D + C dimensions (see module doc)."""
    return UpDownCaptioner(vocab_size, feature_dim + num_classes, config.embed_dim,
                           config.hidden_dim, config.attention_dim, config.dropout)


def _model_record(model: UpDownCaptioner, feature_dim: int, encoding: RegionEncoding,
                  config: AttentionConfig, max_words: int) -> dict[str, Any]:
    return {"state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "vocab_size": model.vocab_size, "feature_dim": feature_dim,
            "num_classes": encoding.num_classes, "input_mean": torch.from_numpy(encoding.mean),
            "input_std": torch.from_numpy(encoding.std),
            "embed_dim": config.embed_dim, "hidden_dim": config.hidden_dim,
            "attention_dim": config.attention_dim, "dropout": config.dropout,
            "max_caption_words": max_words}


def save_captioner(path: Path, record: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        torch.save(record, tmp)


def load_captioner(path: str | Path, vocab_size: int | None = None, feature_dim: int | None = None,
                   ) -> tuple[UpDownCaptioner, RegionEncoding, dict[str, Any]]:
    """The captioner of ``models/captioner.pt`` in eval mode, its input encoding, its sizes.

    ``feature_dim`` is D of the region shards; the model reads D + ``num_classes`` inputs.

    Loaded with ``weights_only=True``; a file for another vocabulary or feature size than the
    caller's is refused rather than producing meaningless attention.
    """
    data = load_torch_file(path, "captioner file", "run 'cpgan-prep train-attention'")
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict) or \
            not all(type(data.get(k)) is int for k in _SIZE_KEYS):
        raise CpganError(f"{path}: expected a dict with state_dict and {', '.join(_SIZE_KEYS)}")
    for name, want in (("vocab_size", vocab_size), ("feature_dim", feature_dim)):
        if want is not None and data[name] != want:
            raise CpganError(f"{path}: captioner has {name} {data[name]}, the data has {want}")
    inputs = data["feature_dim"] + data["num_classes"]
    for name in ("input_mean", "input_std"):
        if not isinstance(data.get(name), torch.Tensor) or data[name].shape != (inputs,):
            raise CpganError(f"{path}: '{name}' must be a tensor of {inputs} values")
    refuse_nonfinite(path, {k: data[k] for k in ("input_mean", "input_std")}, "input statistics")
    if not bool((data["input_std"] > 0).all()):
        raise CpganError(f"{path}: 'input_std' must be positive (it divides every input)")
    refuse_nonfinite(path, data["state_dict"], "'state_dict'")
    encoding = RegionEncoding(data["num_classes"], data["input_mean"].float().numpy(),
                              data["input_std"].float().numpy())
    try:
        config = AttentionConfig(embed_dim=data["embed_dim"], hidden_dim=data["hidden_dim"],
                                 attention_dim=data["attention_dim"],
                                 dropout=float(data.get("dropout", 0.0)))
        model = build_captioner(data["vocab_size"], data["feature_dim"], data["num_classes"],
                                config)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CpganError(f"{path}: its stored settings do not build a captioner "
                         f"({str(exc).splitlines()[0]})") from None
    try:
        model.load_state_dict(data["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CpganError(f"{path}: weights do not fit the stored sizes "
                         f"({str(exc).splitlines()[0]})") from None
    info = {k: v for k, v in data.items() if k not in ("state_dict", "input_mean", "input_std")}
    return model.eval(), encoding, info


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly; saved after every epoch."""

    model: UpDownCaptioner
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    train_loss: list[float] | None = None
    val_loss: list[float] | None = None

    def to_checkpoint(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch, "train_loss": list(self.train_loss or []),
                "val_loss": list(self.val_loss or []), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "settings": settings}

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.epoch = int(state["epoch"])
        self.train_loss = finite_numbers(state["train_loss"], "'train_loss'")
        self.val_loss = finite_numbers(state["val_loss"], "'val_loss'")
        if not len(self.train_loss) == len(self.val_loss) == self.epoch:
            raise ValueError(f"'train_loss' and 'val_loss' must hold one loss per epoch "
                             f"({self.epoch})")
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def _with_new_keys(stored: Any, settings: dict[str, Any]) -> Any:
    """A checkpoint's ``settings`` with the ``attention`` keys it predates at their defaults
    (:func:`cpgan.config.fill_new_keys`), so an upgrade of the code does not strand a resume."""
    defaults = config_defaults("attention")["attention"]
    return fill_new_keys(stored, settings, {"config": defaults})


def _load_checkpoint(path: Path, settings: dict[str, Any], total_epochs: int) -> dict[str, Any]:
    return load_epoch_checkpoint(path, "captioner checkpoint", settings, total_epochs,
                                 lambda stored: _with_new_keys(stored, settings))


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffle of epoch ``epoch`` depends on (seed, epoch) only, so a resume repeats it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _train_epoch(state: TrainState, shards: Sequence[ShardData], encoding: RegionEncoding,
                 config: AttentionConfig, batch_size: int, generator: torch.Generator,
                 device: str, bar: tqdm) -> float:
    """One pass of teacher-forced cross-entropy; returns the token-weighted mean loss."""
    model = state.model.train()
    total, tokens, running = 0.0, 0, None
    for batch in shard_batches(shards, batch_size, encoding, generator):
        batch = batch.to(device)
        loss = caption_loss(model(batch.features, batch.mask, batch.captions), batch.captions)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        state.optimizer.step()
        value, count = loss.item(), int((batch.captions[:, 1:] != PAD_ID).sum())
        total, tokens = total + value * count, tokens + count
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.set_postfix(loss=f"{running:.3f}", refresh=False)
        bar.update(len(batch.captions))
    return total / max(tokens, 1)


@torch.no_grad()
def evaluate_loss(model: UpDownCaptioner, shards: Sequence[ShardData], encoding: RegionEncoding,
                  batch_size: int, device: str) -> float:
    """Token-weighted mean cross-entropy in eval mode (no dropout) over every pair."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in shard_batches(shards, batch_size, encoding):
        batch = batch.to(device)
        loss = caption_loss(model(batch.features, batch.mask, batch.captions), batch.captions)
        count = int((batch.captions[:, 1:] != PAD_ID).sum())
        total, tokens = total + float(loss) * count, tokens + count
    return total / tokens if tokens else math.nan


def sample_captions(model: UpDownCaptioner, shards: Sequence[ShardData], encoding: RegionEncoding,
                    vocab: Vocabulary, max_words: int, count: int,
                    device: str) -> list[dict[str, Any]]:
    """Greedy captions of the first ``count`` images (with regions) of ``shards``."""
    out: list[dict[str, Any]] = []
    for data in shards:
        if len(out) >= count or not len(data.pairs):
            continue
        features, counts = read_shard_arrays(data.path, encoding)
        _, first = np.unique(data.pairs.rows, return_index=True)
        pairs = data.pairs.take(np.sort(first)[:count - len(out)])
        batch = make_batch(features, counts, pairs).to(device)
        tokens, _ = model.greedy_decode(batch.features, batch.mask, max_words + 1)
        for image_id, reference, row in zip(pairs.image_ids.tolist(), pairs.tokens,
                                            tokens.tolist()):
            words = row[:row.index(EOS_ID)] if EOS_ID in row else row
            out.append({"image_id": image_id, "caption": " ".join(vocab.decode(words)),
                        "reference": " ".join(vocab.decode(reference[1:][reference[1:] > EOS_ID]))})
    return out


def train_captioner(
    regions_dir: Path,
    models_dir: Path,
    train_split: Any,
    val_split: Any,
    vocab: Vocabulary,
    config: AttentionConfig,
    max_words: int,
    *,
    seed: int = 0,
    epochs: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    resume: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the Up-Down captioner on ``train_split``'s regions; validate on ``val_split``'s.

    ``train_split``/``val_split`` are ``CocoSplit``s (their captions are read; the regions come
    from ``regions_dir``). ``epochs``/``batch_size`` override the config; ``limit`` keeps the
    first N train images. Writes ``models_dir/captioner.ckpt.pt`` after every epoch and
    ``models_dir/captioner.pt`` at the end. Returns a summary: losses per epoch, counts of
    pairs and skipped images, greedy sample captions of a few val images, seconds.
    """
    start = time.perf_counter()
    epochs = config.epochs if epochs is None else epochs
    batch_size = config.batch_size if batch_size is None else batch_size
    if epochs < 1 or batch_size < 1:
        raise CpganError(f"train-attention needs epochs >= 1 and batch size >= 1, "
                         f"got {epochs} and {batch_size}")
    (train, train_counts), (val, val_counts) = _plan_train_val(
        regions_dir, train_split, val_split, vocab, max_words, limit)
    feature_dim, num_classes = train_counts["feature_dim"], len(train_split.categories())
    encoding = fit_encoding(train, num_classes)
    torch.manual_seed(seed)
    model = build_captioner(len(vocab), feature_dim, num_classes, config).to(device)
    state = TrainState(model, torch.optim.Adam(model.parameters(), lr=config.lr), 0, [], [])
    # What a checkpoint must share with this run to be resumed (not the epoch count).
    settings = {"config": {k: v for k, v in asdict(config).items() if k != "epochs"},
                "batch_size": batch_size, "seed": seed,
                "max_words": max_words, "vocab_size": len(vocab), "feature_dim": feature_dim,
                "num_classes": num_classes, "train_pairs": train_counts["pairs"], "limit": limit}
    checkpoint = Path(models_dir) / CHECKPOINT_NAME
    if resume and checkpoint.exists():
        with refusing_unfit_checkpoint(checkpoint):
            state.restore(_load_checkpoint(checkpoint, settings, epochs))
    for epoch in range(state.epoch, epochs):
        with tqdm(total=train_counts["pairs"], desc=f"captioner {epoch + 1}/{epochs}",
                  unit="cap", disable=not progress) as bar:
            loss = _train_epoch(state, train, encoding, config, batch_size,
                                _epoch_generator(seed, epoch), device, bar)
            val_loss = evaluate_loss(state.model, val, encoding, batch_size, device)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_loss:.3f}")
        state.train_loss.append(loss)
        state.val_loss.append(val_loss)
        state.epoch = epoch + 1
        save_captioner(checkpoint, state.to_checkpoint(settings))
    save_captioner(Path(models_dir) / MODEL_NAME,
                   _model_record(state.model, feature_dim, encoding, config, max_words))
    samples = sample_captions(state.model, val, encoding, vocab, max_words, SAMPLE_CAPTIONS,
                              device)
    return {"epochs": epochs, "train_loss": state.train_loss, "val_loss": state.val_loss,
            **_count_summary(train_counts, val_counts),
            "samples": samples, "seconds": round(time.perf_counter() - start, 1)}


def _plan_train_val(regions_dir: Path, train_split: Any, val_split: Any, vocab: Vocabulary,
                    max_words: int, limit: int | None
                    ) -> tuple[tuple[list[ShardData], dict[str, int]], ...]:
    """Both splits' plans (:func:`plan_split`), refused unless train has pairs and val shares
    its feature width and categories: a captioner fitted on one detector's regions cannot be
    validated on another's."""
    train, train_counts = plan_split(regions_dir, train_split, vocab, max_words, limit)
    val, val_counts = plan_split(regions_dir, val_split, vocab, max_words)
    if not train_counts["pairs"]:
        raise CpganError(f"{regions_dir}: no {train_split.split} image with regions and captions")
    if val_counts["feature_dim"] != train_counts["feature_dim"]:
        raise CpganError(f"{regions_dir}: {val_split.split} features are "
                         f"{val_counts['feature_dim']}-d, {train_split.split} ones "
                         f"{train_counts['feature_dim']}-d (detected with another detector?)")
    if val_split.categories() != train_split.categories():
        raise CpganError(f"{val_split.instances_file}: categories differ from "
                         f"{train_split.instances_file.name}")
    return (train, train_counts), (val, val_counts)


def _count_summary(train: dict[str, int], val: dict[str, int]) -> dict[str, int]:
    """The image, pair and skip counts of both splits, as the summary names them."""
    return {"train_images": train["images"], "train_pairs": train["pairs"],
            "val_images": val["images"], "val_pairs": val["pairs"],
            "skipped_failed": train["skipped_failed"], "skipped_empty": train["skipped_empty"],
            "val_skipped_failed": val["skipped_failed"],
            "val_skipped_empty": val["skipped_empty"]}
