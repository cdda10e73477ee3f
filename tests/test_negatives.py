"""Captions made false by one swapped word (trainer/negatives.py)."""
import numpy as np
import pytest
import torch

from cpgan.errors import CpganError

from cpgan.pipeline.text import Vocabulary
from cpgan.trainer.data import pad_caption
from cpgan.trainer.negatives import WordSwaps, swapped_captions, words_of_kind

TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "a", "red", "blue", "green", "circle", "ball",
          "star", "circles", "stars", "two", "on", "grass")
SLOTS = {"red": ("colour", "red"), "blue": ("colour", "blue"), "green": ("colour", "green"),
         "circle": ("object", "1"), "ball": ("object", "1"), "star": ("object", "2"),
         "circles": ("objects", "1"), "balls": ("objects", "1"), "stars": ("objects", "2")}
VOCAB = Vocabulary(TOKENS, (1,) * len(TOKENS), 1)


def _ids(text: str) -> list[int]:
    return [VOCAB.id(word) for word in text.split()]


def _words(ids) -> str:
    return " ".join(VOCAB.tokens[i] for i in ids)


def test_a_swap_changes_one_word_to_another_value_of_its_slot():
    swaps = WordSwaps(VOCAB, SLOTS)  # "balls" is not in the vocabulary: left out
    assert swaps.replacements[VOCAB.id("circle")] == [VOCAB.id("star")]  # never its synonym
    assert swaps.replacements[VOCAB.id("circles")] == [VOCAB.id("stars")]  # plural for plural
    seen = set()
    rng = np.random.default_rng(0)
    caption = _ids("a red circle on grass")
    for _ in range(60):
        swapped = swaps.swap(caption, rng)
        changed = [p for p, (a, b) in enumerate(zip(caption, swapped)) if a != b]
        assert len(swapped) == len(caption) and len(changed) == 1
        seen.add(_words(swapped))
    assert seen == {"a blue circle on grass", "a green circle on grass", "a red star on grass"}
    assert swaps.swap(_ids("two on grass"), rng) is None


def test_swapped_captions_are_laid_out_per_false_copy_and_drawn_per_image_and_epoch():
    swaps = WordSwaps(VOCAB, SLOTS)
    texts = ["a red circle", "two stars on grass", "a on grass"]
    captions = torch.stack([pad_caption(_ids(t), 6) for t in texts])
    lengths = torch.tensor([3, 4, 3])
    indices = torch.tensor([7, 3, 5])
    false, false_lengths, valid = swapped_captions(captions, lengths, indices, swaps, 2, 0, 1)
    assert false.shape == (6, 6) and torch.equal(false_lengths, lengths.repeat(2))
    assert valid.tolist() == [True, True, False] * 2
    assert _words(false[1, :4].tolist()) == "two circles on grass"  # the only swap it has
    assert torch.equal(false[2], captions[2]) and false[:, 4:].eq(0).all()
    again = swapped_captions(captions[[1, 0]], lengths[[1, 0]], indices[[1, 0]], swaps, 2, 0, 1)[0]
    assert torch.equal(again[1], false[0]) and torch.equal(again[3], false[3])  # per image
    draws = {_words(swapped_captions(captions, lengths, indices, swaps, 1, 0, epoch)[0][0, :3]
                    .tolist()) for epoch in range(20)}
    assert len(draws) == 3  # a new draw each epoch, among the caption's three false versions


def test_swapped_words_narrow_the_swaps_to_one_kind_of_word():
    rng = np.random.default_rng(0)
    caption = _ids("a red circle on grass")
    colours = WordSwaps(VOCAB, words_of_kind(SLOTS, "colour"))
    objects = WordSwaps(VOCAB, words_of_kind(SLOTS, "object"))
    assert {_words(colours.swap(caption, rng)) for _ in range(40)} == {
        "a blue circle on grass", "a green circle on grass"}
    assert {_words(objects.swap(caption, rng)) for _ in range(40)} == {"a red star on grass"}
    assert objects.swap(_ids("two stars"), rng) == _ids("two circles")  # plurals are objects
    assert colours.swap(_ids("two stars"), rng) is None
    assert words_of_kind(SLOTS, "all") == SLOTS
    with pytest.raises(CpganError, match="swapped_words must be one of all, object, colour"):
        words_of_kind(SLOTS, "shape")
