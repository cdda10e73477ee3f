"""V_o of every view that DAMSM pretraining shows, computed once (OAIE, §3.3, Eq. 10).

In pretraining OAIE only sees real images. Its detector is frozen, picks its boxes without
gradient, and no gradient has to reach a real image, so a view's detections (boxes, labels,
RoIAlign features) are the same every time the view comes back; only the projection M_o of
Eq. 10 learns. When the training views repeat -- the toy preset trains without AttnGAN's
random crop (``encoder.random_crop = false``), so every view is the evaluation view of an
image or its mirror -- the detector runs once per view instead of once per step. Validation
views (the evaluation view) repeat in every epoch whatever the augmentation.

The cache is filled up front in a fixed order of fixed batches, not as views first come up:
the detector's floating-point result for an image may depend on which batch it runs in, and
a resumed run must use exactly the values of an uninterrupted one. Images that fail to decode
are recorded (as the training loop records them) and have no entry; the loader leaves them
out of every epoch.

Memory: per view, ``num_regions`` feature vectors with their boxes, scores and labels (38 KB
for the toy preset's 36 x 256; 4,000 train images with their mirrors take 300 MB).
:func:`cache_bytes` gives the figure so that the trainer can leave the cache off where it
would not fit (COCO at the paper's 1024-d features would need 24 GB).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from cpgan.model.yolo import RegionOutput
from cpgan.trainer.data import TextImageDataset, batches, collate

FLOAT_BYTES, LONG_BYTES, BOOL_BYTES = 4, 8, 1


def cache_bytes(images: int, views: int, num_regions: int, feature_dim: int) -> int:
    """Bytes a cache of ``images x views`` entries holds: per region a feature vector, a box,
    a score (float32) and a label (int64); per view a region count and a flag."""
    per_region = (feature_dim + 4 + 1) * FLOAT_BYTES + LONG_BYTES
    return images * views * (num_regions * per_region + LONG_BYTES + BOOL_BYTES)


@dataclass
class RegionCache:
    """Detections of view ``v`` of dataset item ``i`` at ``[i, v]``; view 1 is the mirror."""

    boxes: Tensor      # [N, V, K, 4]
    scores: Tensor     # [N, V, K]
    labels: Tensor     # [N, V, K] int64, -1 = padding
    counts: Tensor     # [N, V] int64
    features: Tensor   # [N, V, K, D]
    filled: Tensor     # [N, V] bool

    @classmethod
    @torch.no_grad()
    def build(cls, detect: Callable[[Tensor], RegionOutput], dataset: TextImageDataset,
              flips: Sequence[bool], batch_size: int, device: str | torch.device = "cpu",
              failures: dict[int, str] | None = None, failed_indices: set[int] | None = None,
              progress: bool = True, desc: str = "V_o cache") -> "RegionCache":
        """Run ``detect`` (the encoder's :meth:`ObjectAwareImageEncoder.detect`) on every
        item's views, ``flips`` giving which (``(False,)``: the evaluation view only;
        ``(False, True)``: and its mirror), ``batch_size`` images per call, in item order."""
        if tuple(flips) not in ((False,), (False, True)):
            raise ValueError(f"flips must be (False,) or (False, True), got {flips}")
        per_call = max(1, batch_size // len(flips))
        cache: RegionCache | None = None
        with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress,
                  leave=False) as bar:
            chunks = (collate([s for i in range(start, min(start + per_call, len(dataset)))
                               for s in dataset.fixed_views(i, flips)])
                      for start in range(0, len(dataset), per_call))
            for batch in batches(chunks, failures, failed_indices):
                found = detect(batch.images[-1].to(device))
                cache = cache or cls._empty(len(dataset), len(flips), found)
                cache._store(batch.indices, batch.flipped.long() if len(flips) > 1
                             else torch.zeros(len(batch), dtype=torch.long), found)
                bar.update(len(set(batch.indices.tolist())))
        if cache is None:
            raise ValueError(f"{dataset.split.folder}: no image could be decoded for V_o")
        return cache

    @classmethod
    def _empty(cls, items: int, views: int, like: RegionOutput) -> "RegionCache":
        regions, dim = like.features.shape[1:]
        return cls(torch.zeros(items, views, regions, 4), torch.zeros(items, views, regions),
                   torch.full((items, views, regions), -1, dtype=torch.long),
                   torch.zeros(items, views, dtype=torch.long),
                   torch.zeros(items, views, regions, dim),
                   torch.zeros(items, views, dtype=torch.bool))

    def _store(self, indices: Tensor, views: Tensor, found: RegionOutput) -> None:
        self.boxes[indices, views] = found.boxes.cpu()
        self.scores[indices, views] = found.scores.cpu()
        self.labels[indices, views] = found.labels.cpu()
        self.counts[indices, views] = found.num_regions.cpu()
        self.features[indices, views] = found.features.cpu()
        self.filled[indices, views] = True

    def lookup(self, indices: Tensor, flipped: Tensor | None,
               device: str | torch.device = "cpu") -> RegionOutput:
        """Detections of a batch's views (``flipped`` None: every view unmirrored)."""
        views = (torch.zeros_like(indices) if flipped is None or self.filled.shape[1] == 1
                 else flipped.long())
        if not bool(self.filled[indices, views].all()):
            missing = indices[~self.filled[indices, views]].tolist()
            raise KeyError(f"no cached detections for dataset items {missing[:5]}")
        return RegionOutput(*(t[indices, views].to(device) for t in (
            self.boxes, self.scores, self.labels, self.counts, self.features)))
