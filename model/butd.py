"""Bottom-Up/Top-Down captioner (Anderson et al. 2018), the attention model of CPGAN §3.2.1.

CPGAN does not need captions from this model: it needs, for every word of every training
caption, how much the captioner looked at each detected region when it predicted that word.
Those attention weights give q_n = argmax_i a_{i,n} and a_{q_n,n} of Eq. 7, from which the
memory m_r of each word is built. The module therefore returns the attention as a first-class
output next to the logits, aligned so that ``attention[:, t]`` is the distribution used to
produce ``logits[:, t]``, i.e. the step that predicts token ``captions[:, t + 1]``.

Decoder (Anderson et al. §3.2), per step t with input word x_t:

* attention LSTM:  h_att(t) = LSTM_att([h_lang(t-1); v_mean; W_e x_t], h_att(t-1))
* attention:       a_t = softmax_i( w_a^T tanh(W_v v_i + W_h h_att(t)) ),  v_hat_t = sum_i a_i v_i
* language LSTM:   h_lang(t) = LSTM_lang([v_hat_t; h_att(t)], h_lang(t-1))
* output:          logits_t = W_p dropout(h_lang(t))

Images have a variable number of detected regions padded to a fixed R; padded regions are
excluded everywhere (mean feature, attention, attended feature), so their stored values,
whatever they are, cannot change any output.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3


class CaptionerOutput(NamedTuple):
    """Teacher-forced outputs; step t predicts ``captions[:, t + 1]`` using ``attention[:, t]``.

    Steps beyond a caption's length (input token <eos> or <pad>) are computed like any other;
    callers mask them with ``captions[:, 1:] != PAD_ID`` (``caption_loss`` does).
    """

    logits: Tensor  # [B, T-1, V]
    attention: Tensor  # [B, T-1, R], zero on padded regions, sums to one over real ones


class _Context(NamedTuple):
    """Per-image quantities that do not change across decoding steps."""

    features: Tensor  # [B, R, D], padded regions zeroed
    projected: Tensor  # [B, R, A], W_v v_i, computed once per image
    mean: Tensor  # [B, D], mean over real regions only
    mask: Tensor  # [B, R] bool, True for real regions


class _State(NamedTuple):
    """Hidden and cell states of the attention and language LSTMs."""

    h_att: Tensor
    c_att: Tensor
    h_lang: Tensor
    c_lang: Tensor


def region_mask_from_counts(num_regions: Tensor, max_regions: int) -> Tensor:
    """Bool mask [B, R] of real regions from per-image counts (detections are padded at the end).

    This matches the region shards, whose first ``num_regions`` boxes are real and the rest
    padding; counts outside [0, max_regions] are a caller bug and raise ``ValueError``.
    """
    if num_regions.dim() != 1:
        raise ValueError(f"num_regions must be 1-D, got shape {tuple(num_regions.shape)}")
    if bool(((num_regions < 0) | (num_regions > max_regions)).any()):
        raise ValueError(f"num_regions must lie in [0, {max_regions}]")
    positions = torch.arange(max_regions, device=num_regions.device)
    return positions.unsqueeze(0) < num_regions.unsqueeze(1).long()


def _check_regions(features: Tensor, region_mask: Tensor) -> None:
    """Reject shapes that would silently broadcast and images with no real region.

    An image without regions has no attention distribution at all (softmax over nothing), so
    it must be filtered out before it reaches the captioner rather than produce NaNs.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [B, R, D], got shape {tuple(features.shape)}")
    if region_mask.dtype != torch.bool or region_mask.shape != features.shape[:2]:
        raise ValueError(
            f"region_mask must be bool [B, R] = {tuple(features.shape[:2])}, "
            f"got {region_mask.dtype} {tuple(region_mask.shape)}"
        )
    if not bool(region_mask.any(dim=1).all()):
        raise ValueError("every image needs at least one real region (region_mask row all False)")


class AdditiveAttention(nn.Module):
    """a_t = softmax_i( w_a^T tanh(W_v v_i + W_h h_att(t)) ) over real regions (Anderson Eq. 3-4).

    No bias terms, exactly as the equation; padded regions get a score of -inf, hence a weight
    of exactly zero, and the softmax is taken over real regions only.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim, bias=False)  # W_v
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim, bias=False)  # W_h
        self.score = nn.Linear(attention_dim, 1, bias=False)  # w_a

    def forward(self, projected: Tensor, hidden: Tensor, mask: Tensor) -> Tensor:
        """Attention weights [B, R] from precomputed W_v v [B, R, A] and h_att [B, H]."""
        energy = torch.tanh(projected + self.hidden_proj(hidden).unsqueeze(1))
        scores = self.score(energy).squeeze(-1).masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)


class UpDownCaptioner(nn.Module):
    """Two-layer Up-Down captioning decoder over detected region features.

    Paper sizes: feature 1024 (YOLOv3 layer-74 RoIAlign), embed 1000, hidden 1000,
    attention 512. LSTM states start at zero for every caption, so the attention a caption
    receives depends only on the image and that caption's prefix. Dropout (before the output
    layer only) is active in training mode alone, so eval-mode teacher-forced attention, the
    quantity CPGAN stores, is deterministic.
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int,
        hidden_dim: int,
        attention_dim: int,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_dim = hidden_dim
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.att_lstm = nn.LSTMCell(hidden_dim + feature_dim + embed_dim, hidden_dim)
        self.attention = AdditiveAttention(feature_dim, hidden_dim, attention_dim)
        self.lang_lstm = nn.LSTMCell(feature_dim + hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def _context(self, features: Tensor, region_mask: Tensor) -> _Context:
        """Zero padded regions once so that no later sum can see their values (even NaN)."""
        _check_regions(features, region_mask)
        features = features.to(self.output.weight.dtype)
        features = features.masked_fill(~region_mask.unsqueeze(-1), 0.0)
        count = region_mask.sum(dim=1, keepdim=True).to(features.dtype)
        mean = features.sum(dim=1) / count
        return _Context(features, self.attention.feature_proj(features), mean, region_mask)

    def _initial_state(self, batch: int, like: Tensor) -> _State:
        """All-zero LSTM states: Anderson et al. do not condition the initial state on the image."""
        zeros = like.new_zeros(batch, self.hidden_dim)
        return _State(zeros, zeros, zeros, zeros)

    def _step(
        self, context: _Context, state: _State, words: Tensor
    ) -> tuple[_State, Tensor, Tensor]:
        """One step from input words [B]: (new state, logits [B, V], attention [B, R])."""
        att_input = torch.cat([state.h_lang, context.mean, self.embed(words)], dim=1)
        h_att, c_att = self.att_lstm(att_input, (state.h_att, state.c_att))
        weights = self.attention(context.projected, h_att, context.mask)
        attended = torch.bmm(weights.unsqueeze(1), context.features).squeeze(1)
        lang_input = torch.cat([attended, h_att], dim=1)
        h_lang, c_lang = self.lang_lstm(lang_input, (state.h_lang, state.c_lang))
        logits = self.output(self.dropout(h_lang))
        return _State(h_att, c_att, h_lang, c_lang), logits, weights

    def forward(self, features: Tensor, region_mask: Tensor, captions: Tensor) -> CaptionerOutput:
        """Teacher forcing: inputs ``captions[:, :-1]`` (<bos> first), targets ``captions[:, 1:]``.

        ``features`` [B, R, D], ``region_mask`` [B, R] bool (True = real region),
        ``captions`` [B, T] token ids padded with 0. Returns logits [B, T-1, V] and the
        attention [B, T-1, R] of the step that produced each logit row.
        """
        if captions.dim() != 2 or captions.shape[0] != features.shape[0] or captions.shape[1] < 2:
            raise ValueError(
                f"captions must be [B, T>=2] with B={features.shape[0]}, "
                f"got {tuple(captions.shape)}"
            )
        context = self._context(features, region_mask)
        state = self._initial_state(captions.shape[0], context.mean)
        all_logits, all_weights = [], []
        for t in range(captions.shape[1] - 1):
            state, logits, weights = self._step(context, state, captions[:, t])
            all_logits.append(logits)
            all_weights.append(weights)
        return CaptionerOutput(torch.stack(all_logits, dim=1), torch.stack(all_weights, dim=1))

    @torch.no_grad()
    def greedy_decode(
        self,
        features: Tensor,
        region_mask: Tensor,
        max_len: int,
        bos_id: int = BOS_ID,
        eos_id: int = EOS_ID,
    ) -> tuple[Tensor, Tensor]:
        """Greedy captions for inspection: (tokens [B, L], attention [B, L, R]) with L <= max_len.

        Tokens exclude <bos> and include the <eos> a caption ends with; after its <eos> a row
        holds <pad> and zero attention. Decoding stops once every row has ended. It always runs
        in eval mode (restoring the previous mode after), since sample captions printed during
        training must not depend on dropout.
        """
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        was_training = self.training
        self.eval()
        try:
            return self._greedy(features, region_mask, max_len, bos_id, eos_id)
        finally:
            self.train(was_training)

    def _greedy(
        self, features: Tensor, region_mask: Tensor, max_len: int, bos_id: int, eos_id: int
    ) -> tuple[Tensor, Tensor]:
        """The greedy loop proper; see ``greedy_decode``."""
        context = self._context(features, region_mask)
        batch = features.shape[0]
        state = self._initial_state(batch, context.mean)
        words = torch.full((batch,), bos_id, dtype=torch.long, device=features.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=features.device)
        tokens, attention = [], []
        for _ in range(max_len):
            state, logits, weights = self._step(context, state, words)
            words = logits.argmax(dim=-1).masked_fill(finished, PAD_ID)
            tokens.append(words)
            attention.append(weights.masked_fill(finished.unsqueeze(1), 0.0))
            finished = finished | (words == eos_id)
            if bool(finished.all()):
                break
        return torch.stack(tokens, dim=1), torch.stack(attention, dim=1)


def caption_loss(output: CaptionerOutput, captions: Tensor) -> Tensor:
    """Mean cross-entropy of the targets ``captions[:, 1:]`` over non-<pad> tokens.

    Padded steps carry no word, so they are ignored rather than taught to predict <pad>;
    <eos> is a real target, which is what teaches the captioner to stop.
    """
    targets = captions[:, 1:]
    if output.logits.shape[:2] != targets.shape:
        raise ValueError(
            f"logits {tuple(output.logits.shape)} do not match targets {tuple(targets.shape)}"
        )
    logits = output.logits.reshape(-1, output.logits.shape[-1])
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=PAD_ID)


def salient_regions(attention: Tensor, region_mask: Tensor) -> tuple[Tensor, Tensor]:
    """q_n = argmax over REAL regions of a_{i,n} and a_{q_n,n} (Eq. 7): (index, weight), [B, T].

    Ties go to the lowest region index, computed explicitly (not left to ``argmax``'s
    backend-dependent behaviour) so that the memory built from these indices is reproducible
    on any device. Region indices refer to the stored box order.
    """
    if attention.dim() != 3 or region_mask.shape != (attention.shape[0], attention.shape[2]):
        raise ValueError(
            f"attention [B, T, R] and region_mask [B, R] disagree: "
            f"{tuple(attention.shape)} vs {tuple(region_mask.shape)}"
        )
    if region_mask.dtype != torch.bool or not bool(region_mask.any(dim=1).all()):
        raise ValueError("region_mask must be bool with at least one real region per image")
    mask = region_mask.unsqueeze(1).expand_as(attention)
    masked = attention.masked_fill(~mask, float("-inf"))
    best = masked.max(dim=-1, keepdim=True).values
    positions = torch.arange(attention.shape[-1], device=attention.device).expand_as(attention)
    candidates = torch.where((masked == best) & mask, positions, attention.shape[-1])
    index = candidates.min(dim=-1).values
    weight = attention.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return index, weight
