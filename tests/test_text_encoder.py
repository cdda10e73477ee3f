"""MATE (Eq. 8-9): frozen memory buffer, padding independence, sentence vector, validation."""
from __future__ import annotations

import pytest
import torch

from cpgan.model.text_encoder import MemoryAttendedTextEncoder

VOCAB, EMBED, HIDDEN, MEM_DIM = 12, 6, 8, 5


def _encoder(memory: torch.Tensor | None = None, seed: int = 0,
             sentence: str = "last") -> MemoryAttendedTextEncoder:
    torch.manual_seed(seed)
    if memory is None:
        memory = torch.randn(VOCAB, MEM_DIM)
    return MemoryAttendedTextEncoder(VOCAB, EMBED, HIDDEN, memory, memory_hidden=7,
                                     sentence=sentence).eval()


def _padded(words: list[int], total: int, filler: int = 0) -> torch.Tensor:
    return torch.tensor([words + [filler] * (total - len(words))])


def test_memory_is_a_frozen_buffer_not_a_parameter() -> None:
    memory = torch.randn(VOCAB, MEM_DIM)
    encoder = _encoder(memory)
    assert torch.equal(encoder.memory, memory) and not encoder.memory.requires_grad
    assert all(p is not encoder.memory for p in encoder.parameters())
    assert sum(p.numel() for p in encoder.parameters() if p.shape == memory.shape) == 0
    assert "memory" in dict(encoder.named_buffers()) and "memory" in encoder.state_dict()
    assert "memory" not in dict(encoder.named_parameters())
    memory.add_(1.0)  # the encoder holds its own copy
    assert not torch.equal(encoder.memory, memory)


def test_outputs_shapes_and_zero_padding() -> None:
    encoder = _encoder()
    captions = torch.tensor([[4, 5, 6, 7], [8, 9, 0, 0], [10, 0, 0, 0]])
    words, sentence = encoder(captions, torch.tensor([4, 2, 1]))
    assert words.shape == (3, HIDDEN, 4) and sentence.shape == (3, HIDDEN)
    assert torch.all(words[1, :, 2:] == 0) and torch.all(words[2, :, 1:] == 0)
    assert torch.all(words[0].abs().sum(dim=0) > 0)


@pytest.mark.parametrize("sentence", ["last", "max"])
def test_padding_does_not_change_outputs(sentence: str) -> None:
    """The same caption in batches of different widths, with different filler tokens."""
    encoder = _encoder(sentence=sentence)
    caption = [4, 7, 3]
    short_w, short_s = encoder(_padded(caption, 3), torch.tensor([3]))
    long_w, long_s = encoder(_padded(caption, 9, filler=11), torch.tensor([3]))
    assert torch.allclose(short_s, long_s, atol=1e-6)
    assert torch.allclose(short_w, long_w[:, :, :3], atol=1e-6)
    assert torch.all(long_w[:, :, 3:] == 0)
    batched_w, batched_s = encoder(torch.cat([_padded(caption, 6), _padded([5] * 6, 6)]),
                                   torch.tensor([3, 6]))
    assert torch.allclose(short_s, batched_s[:1], atol=1e-6)
    assert torch.allclose(short_w, batched_w[:1, :, :3], atol=1e-6)


def test_sentence_is_final_state_of_both_directions() -> None:
    """s = [forward half of w_L; backward half of w_1], the states that read the whole caption."""
    encoder = _encoder()
    words, sentence = encoder(torch.tensor([[4, 5, 6, 0, 0]]), torch.tensor([3]))
    half = HIDDEN // 2
    assert torch.allclose(sentence[0, :half], words[0, :half, 2], atol=1e-6)
    assert torch.allclose(sentence[0, half:], words[0, half:, 0], atol=1e-6)
    assert not torch.allclose(sentence[0], words[0, :, 2], atol=1e-4)  # not w_T


def test_max_sentence_is_the_maximum_over_real_words_only() -> None:
    """s = max_t w_t over the caption's words: the zero W of padded steps never wins, even in
    channels where every real word is negative."""
    encoder = _encoder(sentence="max")
    words, sentence = encoder(torch.tensor([[4, 5, 6, 0, 0], [7, 8, 9, 10, 11]]),
                              torch.tensor([3, 5]))
    assert torch.equal(sentence[0], words[0, :, :3].amax(dim=1))
    assert torch.equal(sentence[1], words[1].amax(dim=1))
    assert bool((sentence[0] < 0).any())  # a padded zero would have replaced these
    with pytest.raises(ValueError, match="sentence pooling"):
        MemoryAttendedTextEncoder(VOCAB, EMBED, HIDDEN, sentence="mean")


def test_memory_rows_influence_the_words_that_use_them() -> None:
    memory = torch.randn(VOCAB, MEM_DIM)
    captions, lengths = torch.tensor([[4, 5, 6]]), torch.tensor([3])
    base_w, base_s = _encoder(memory)(captions, lengths)
    changed = memory.clone()
    changed[5] += 3.0
    words, sentence = _encoder(changed)(captions, lengths)
    assert not torch.allclose(words, base_w, atol=1e-4)
    assert not torch.allclose(sentence, base_s, atol=1e-4)
    unused = memory.clone()
    unused[9] += 3.0
    words, sentence = _encoder(unused)(captions, lengths)
    assert torch.allclose(words, base_w) and torch.allclose(sentence, base_s)


def test_gradients_train_projection_not_memory() -> None:
    encoder = _encoder().train()
    words, sentence = encoder(torch.tensor([[4, 5, 6]]), torch.tensor([3]))
    (words.sum() + sentence.sum()).backward()
    assert encoder.memory.grad is None
    assert encoder.projection is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in encoder.projection.parameters())


def test_no_memory_is_plain_attngan_encoder() -> None:
    torch.manual_seed(0)
    encoder = MemoryAttendedTextEncoder(VOCAB, EMBED, HIDDEN, memory=None).eval()
    assert encoder.memory is None and encoder.projection is None and not encoder.uses_memory
    assert encoder.lstm.input_size == EMBED
    assert "memory" not in encoder.state_dict()
    with_memory = _encoder()
    assert with_memory.lstm.input_size == 2 * EMBED and with_memory.uses_memory
    words, sentence = encoder(torch.tensor([[4, 5, 0]]), torch.tensor([2]))
    assert words.shape == (1, HIDDEN, 3) and sentence.shape == (1, HIDDEN)


@pytest.mark.parametrize("memory, message", [
    (torch.randn(VOCAB + 1, MEM_DIM), "rows for a vocabulary"),
    (torch.randn(VOCAB), "2-D"),
    (torch.ones(VOCAB, MEM_DIM, dtype=torch.int64), "float"),
    (torch.full((VOCAB, MEM_DIM), float("nan")), "NaN"),
])
def test_mismatched_memory_is_refused(memory: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemoryAttendedTextEncoder(VOCAB, EMBED, HIDDEN, memory)


def test_bad_lengths_and_sizes_are_refused() -> None:
    encoder = _encoder()
    with pytest.raises(ValueError, match="lengths"):
        encoder(torch.tensor([[4, 5, 0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="lengths"):
        encoder(torch.tensor([[4, 5, 0]]), torch.tensor([4]))
    with pytest.raises(ValueError, match="even"):
        MemoryAttendedTextEncoder(VOCAB, EMBED, 7)
