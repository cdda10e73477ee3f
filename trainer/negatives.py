"""Captions made false by one word: hard negatives for DAMSM pretraining.

R-precision ranks a true caption among 99 others, and on toy most misses are captions that
differ from the truth in one object or one colour (RESULTS.md). A batch of random captions
rarely holds such a near miss, so the sentence-level loss (Eq. 23) seldom asks the encoders to
tell one apart. With ``encoder.swapped_negatives`` N > 0, each training caption brings N copies
with one object or colour word replaced by another of a different category or colour ("a red
circle" -> "a red star", "a blue star"), scored against its own image only
(:func:`cpgan.model.losses.damsm_loss`'s ``negative_sentences``): NegCLIP's swapped captions
(Yuksekgonul et al., 2023) in AttnGAN's loss. Not in AttnGAN or the paper (both N = 0).

Which words may swap is :func:`cpgan.pipeline.categories.swappable_words`: a synonym ("box" for
"square") would leave the caption true, so it never replaces a word of its category, and
plurals only replace plurals. ``encoder.swapped_words`` narrows the swaps to one kind of word
(:data:`SWAP_KINDS`). Draws are seeded per (seed, epoch, image index), like every
other training draw, so a resumed run sees the same negatives.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from cpgan.errors import CpganError
from cpgan.pipeline.text import UNK_ID, Vocabulary
from cpgan.trainer.data import NEGATIVES_STREAM

SWAP_KINDS: dict[str, tuple[str, ...]] = {
    "all": ("object", "objects", "colour"),
    "object": ("object", "objects"),
    "colour": ("colour",),
}
"""``encoder.swapped_words`` -> the slots of :func:`cpgan.pipeline.categories.swappable_words`
whose words may be swapped."""


def words_of_kind(words: dict[str, tuple[str, str]], kind: str) -> dict[str, tuple[str, str]]:
    """The entries of ``words`` (word -> (slot, value)) whose slot ``kind`` swaps."""
    if kind not in SWAP_KINDS:
        raise CpganError(f"encoder.swapped_words must be one of {', '.join(SWAP_KINDS)}, "
                         f"got {kind!r}")
    return {word: entry for word, entry in words.items() if entry[0] in SWAP_KINDS[kind]}


class WordSwaps:
    """For each swappable token id, the token ids that would make a caption false in its place."""

    def __init__(self, vocab: Vocabulary, words: dict[str, tuple[str, str]]) -> None:
        slots = sorted((vocab.id(word), slot) for word, slot in words.items()
                       if vocab.id(word) != UNK_ID)
        self.replacements: dict[int, list[int]] = {}
        for token, (slot, value) in slots:
            others = [t for t, (s, v) in slots if s == slot and v != value]
            if others:
                self.replacements[token] = others

    def __bool__(self) -> bool:
        return bool(self.replacements)

    def swap(self, ids: Sequence[int], rng: np.random.Generator) -> list[int] | None:
        """``ids`` with one swappable word (uniformly chosen) replaced by a uniformly chosen
        replacement; None when the caption has no swappable word."""
        positions = [p for p, token in enumerate(ids) if token in self.replacements]
        if not positions:
            return None
        position = positions[int(rng.integers(len(positions)))]
        options = self.replacements[ids[position]]
        swapped = list(ids)
        swapped[position] = options[int(rng.integers(len(options)))]
        return swapped


def swapped_captions(captions: Tensor, lengths: Tensor, indices: Tensor, swaps: WordSwaps,
                     count: int, seed: int, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
    """``count`` false versions of each caption: ``[count * B, T]`` ids (row ``n * B + i`` of
    caption i, the layout of ``damsm_loss``'s ``negative_sentences``), their lengths and a
    ``[count * B]`` mask, False where caption i has no swappable word (its row then holds the
    caption itself, to be ignored). Each image's draws come from (seed, epoch, its index)."""
    rows, valid = [], []
    rngs = [np.random.default_rng([seed, NEGATIVES_STREAM, epoch, int(i)]) for i in indices]
    for _ in range(count):
        for caption, length, rng in zip(captions, lengths, rngs):
            ids = caption[:int(length)].tolist()
            swapped = swaps.swap(ids, rng)
            valid.append(swapped is not None)
            row = caption.clone()
            if swapped is not None:
                row[:len(swapped)] = torch.as_tensor(swapped, dtype=caption.dtype)
            rows.append(row)
    return (torch.stack(rows), lengths.repeat(count),
            torch.tensor(valid, dtype=torch.bool, device=captions.device))
