"""Memory-Attended Text Encoder (MATE), CPGAN §3.2.2, Eq. 8-9.

Each word i of a caption is described twice: by a learned embedding e_i, which places words
relative to each other, and by its visual memory m_i (Eq. 7, built offline from the detector's
regions and the captioner's attention), which says what the word looks like in the training
images. The memory is frozen; a small learned projection p (FC -> LeakyReLU -> FC) brings it
to the embedding's size so that neither half dominates the concatenation f_i = [e_i; p(m_i)]
(Eq. 8). A bidirectional LSTM over f_1..f_T gives the word features W and the sentence vector
s (Eq. 9), the text side of DAMSM/TISCL (Eq. 14-25) and the generator's conditioning.

Sentence vector. The paper writes s = w_T; AttnGAN's RNN_ENCODER uses the final hidden states
of both directions, concatenated. We use the final states of both directions, because w_T is
ill-defined for a batch of padded captions and lopsided even without padding:

* with padding, "the last word" is at each caption's own length, not at column T; reading
  column T returns the zero vector of a padded step for every caption shorter than the batch;
* even at the true last word, the backward half of w_T has read only that one word, so half of
  s would carry almost no sentence information. The backward direction's final state is the
  one that has read the whole caption (right to left), i.e. the backward half of w_1.

So s = [forward state after the last real word; backward state after the first word], which is
what ``nn.LSTM`` returns as ``h_n`` for a packed batch: exactly AttnGAN's choice, and
independent of how much padding follows the caption (``sentence="last"``, the paper preset).

``sentence="max"`` (the toy preset) takes instead the element-wise maximum of the word features
w_1..w_T over the real words, InferSent's max-pooled Bi-LSTM (Conneau et al., 2017). The final
states must carry every word through the whole recurrence; the maximum gives each word a
direct path to s. On the toy set this is what makes
a short pretraining possible: with the classifier-initialised image backbone, val R-precision
after 100 / 200 / 500 steps was 0.82 / 0.87 / 0.91 with ``"max"`` and 0.37 / 0.70 / 0.82 with
``"last"`` (``bench/damsm_recipe.py``). It is a departure from the paper, so the paper preset
keeps the final states.

``memory=None`` builds the plain AttnGAN text encoder (embedding -> Bi-LSTM), the
``--no-memory`` ablation: same outputs, no visual memory.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

PAD_ID = 0
LEAKY_SLOPE = 0.2
EMBED_INIT_RANGE = 0.1
SENTENCE_POOLING = ("last", "max")


def check_memory(memory: Tensor, vocab_size: int) -> None:
    """Refuse a memory bank that cannot be indexed by this vocabulary's word ids.

    The loader (``pipeline/memory.py``) compares the words themselves with vocab.json; this
    guards the shape and values, which a silently mismatched bank would get wrong.
    """
    if not isinstance(memory, Tensor) or memory.dim() != 2:
        shape = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
        raise ValueError(f"memory must be a 2-D [vocab, D] tensor, got {shape}")
    if not memory.is_floating_point():
        raise ValueError(f"memory must be a float tensor, got {memory.dtype}")
    if memory.shape[0] != vocab_size:
        raise ValueError(f"memory has {memory.shape[0]} rows for a vocabulary of {vocab_size} words")
    if memory.shape[1] < 1:
        raise ValueError("memory rows are empty (D = 0)")
    if not bool(torch.isfinite(memory).all()):
        raise ValueError("memory holds NaN or infinite values")


class MemoryProjection(nn.Module):
    """p(m) of Eq. 8: FC -> LeakyReLU -> FC, from the memory size D to the embedding size."""

    def __init__(self, memory_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(memory_dim, hidden_dim),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, memory_rows: Tensor) -> Tensor:
        return self.net(memory_rows)


class MemoryAttendedTextEncoder(nn.Module):
    """Captions ``[B, T]`` -> word features W ``[B, d, T]`` and sentence vector s ``[B, d]``.

    ``embed_dim`` is the size of e_i (paper 300) and of p(m_i); ``hidden_dim`` is d (paper
    256), split evenly between the two LSTM directions as in AttnGAN. ``memory`` ``[V, D]``
    is stored as a frozen buffer (saved in the state dict, so a checkpoint carries the memory
    it was trained with and ``load_state_dict`` refuses a bank of another shape); it is never
    a parameter. ``memory_hidden`` is the width of p's hidden layer (default ``embed_dim``).
    ``dropout`` is applied to f_i as AttnGAN applies it to its embeddings. ``sentence`` is how
    s is read from the Bi-LSTM: ``"last"`` (final states) or ``"max"`` (see the module notes).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_dim: int,
        memory: Tensor | None = None,
        memory_hidden: int | None = None,
        dropout: float = 0.5,
        sentence: str = "last",
    ) -> None:
        super().__init__()
        if sentence not in SENTENCE_POOLING:
            raise ValueError(f"sentence pooling must be one of {', '.join(SENTENCE_POOLING)}, "
                             f"got {sentence!r}")
        if hidden_dim < 2 or hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even (two LSTM directions), got {hidden_dim}")
        if vocab_size <= PAD_ID:
            raise ValueError(f"vocabulary of {vocab_size} words has no room for <pad>")
        self.vocab_size = vocab_size
        self.hidden_dim = hidden_dim
        self.sentence = sentence
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        nn.init.uniform_(self.embedding.weight, -EMBED_INIT_RANGE, EMBED_INIT_RANGE)
        with torch.no_grad():
            self.embedding.weight[PAD_ID].zero_()
        self.projection: MemoryProjection | None = None
        if memory is not None:
            check_memory(memory, vocab_size)
            self.register_buffer("memory", memory.detach().to(torch.float32).clone())
            self.projection = MemoryProjection(memory.shape[1], memory_hidden or embed_dim,
                                               embed_dim)
        else:
            self.register_buffer("memory", None)
        self.dropout = nn.Dropout(dropout)
        lstm_input = 2 * embed_dim if memory is not None else embed_dim
        self.lstm = nn.LSTM(lstm_input, hidden_dim // 2, batch_first=True, bidirectional=True)

    @property
    def uses_memory(self) -> bool:
        return self.projection is not None

    def word_inputs(self, captions: Tensor) -> Tensor:
        """f_i of Eq. 8 for every position: ``[B, T, embed]`` or ``[B, T, 2 * embed]``."""
        embedded = self.embedding(captions)
        if self.projection is None:
            return embedded
        return torch.cat([embedded, self.projection(self.memory[captions])], dim=-1)

    def forward(self, captions: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 9 on a padded batch: W is zero at padded steps, s ignores them entirely.

        The LSTM runs on a packed sequence, so padding tokens are never read: a caption gives
        the same W (at its real positions) and s however much padding follows it.
        """
        lengths = self._check_inputs(captions, lengths)
        inputs = self.dropout(self.word_inputs(captions))
        packed = pack_padded_sequence(inputs, lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        output, (h_n, _) = self.lstm(packed)
        words, _ = pad_packed_sequence(output, batch_first=True, total_length=captions.shape[1])
        if self.sentence == "max":
            padded = torch.arange(captions.shape[1], device=captions.device) >= \
                lengths.to(captions.device).unsqueeze(1)
            sentence = words.masked_fill(padded.unsqueeze(2), float("-inf")).amax(dim=1)
        else:
            sentence = h_n.transpose(0, 1).reshape(captions.shape[0], self.hidden_dim)
        return words.transpose(1, 2).contiguous(), sentence

    def _check_inputs(self, captions: Tensor, lengths: Tensor) -> Tensor:
        if captions.dim() != 2 or captions.dtype != torch.long:
            raise ValueError(f"captions must be a [B, T] long tensor, got "
                             f"{captions.dtype} {tuple(captions.shape)}")
        lengths = torch.as_tensor(lengths)
        if lengths.shape != captions.shape[:1]:
            raise ValueError(f"lengths {tuple(lengths.shape)} do not match {captions.shape[0]} captions")
        if bool((lengths < 1).any()) or bool((lengths > captions.shape[1]).any()):
            raise ValueError(f"caption lengths must lie in [1, {captions.shape[1]}], got "
                             f"{lengths.tolist()}")
        return lengths.long()
