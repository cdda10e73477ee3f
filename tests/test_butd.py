"""Tests of the Bottom-Up/Top-Down captioner: attention alignment, masking, learning, decoding."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cpgan.model.butd import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    CaptionerOutput,
    UpDownCaptioner,
    caption_loss,
    region_mask_from_counts,
    salient_regions,
)

VOCAB, FEAT, EMBED, HIDDEN, ATT = 12, 6, 5, 7, 4


def _model(seed: int = 0, dropout: float = 0.5) -> UpDownCaptioner:
    torch.manual_seed(seed)
    return UpDownCaptioner(VOCAB, FEAT, EMBED, HIDDEN, ATT, dropout=dropout).eval()


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three images with 4, 2 and 3 real regions out of 4; captions of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 4, FEAT, generator=gen)
    mask = region_mask_from_counts(torch.tensor([4, 2, 3]), 4)
    captions = torch.tensor(
        [
            [BOS_ID, 5, 6, 7, 8, EOS_ID],
            [BOS_ID, 9, EOS_ID, PAD_ID, PAD_ID, PAD_ID],
            [BOS_ID, 4, 10, 11, EOS_ID, PAD_ID],
        ]
    )
    return features, mask, captions


def test_region_mask_from_counts() -> None:
    mask = region_mask_from_counts(torch.tensor([2, 0, 3]), 3)
    assert mask.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    with pytest.raises(ValueError):
        region_mask_from_counts(torch.tensor([4]), 3)


def test_shapes_and_output_type() -> None:
    features, mask, captions = _batch()
    out = _model()(features, mask, captions)
    assert isinstance(out, CaptionerOutput)
    assert out.logits.shape == (3, 5, VOCAB)
    assert out.attention.shape == (3, 5, 4)


def test_attention_sums_to_one_over_real_regions_and_is_zero_on_padding() -> None:
    features, mask, captions = _batch()
    attention = _model()(features, mask, captions).attention
    padded = ~mask.unsqueeze(1).expand_as(attention)
    assert bool((attention[padded] == 0).all())
    assert bool((attention[~padded] > 0).all())
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 5))


def _manual_unroll(model: UpDownCaptioner, features, mask, captions):
    """The Up-Down equations written out independently of the module's own step code."""
    w_v = model.attention.feature_proj.weight
    w_h = model.attention.hidden_proj.weight
    w_a = model.attention.score.weight
    feats = features * mask.unsqueeze(-1)
    mean = feats.sum(1) / mask.sum(1, keepdim=True)
    zeros = torch.zeros(features.shape[0], HIDDEN)
    h_att, c_att, h_lang, c_lang = zeros, zeros, zeros, zeros
    logits, attention = [], []
    for t in range(captions.shape[1] - 1):
        x = torch.cat([h_lang, mean, model.embed.weight[captions[:, t]]], 1)
        h_att, c_att = model.att_lstm(x, (h_att, c_att))
        scores = torch.tanh(feats @ w_v.T + (h_att @ w_h.T)[:, None]) @ w_a.T
        a = torch.softmax(scores.squeeze(-1).masked_fill(~mask, -math.inf), -1)
        v_hat = (a.unsqueeze(-1) * feats).sum(1)
        h_lang, c_lang = model.lang_lstm(torch.cat([v_hat, h_att], 1), (h_lang, c_lang))
        logits.append(h_lang @ model.output.weight.T + model.output.bias)
        attention.append(a)
    return torch.stack(logits, 1), torch.stack(attention, 1)


def test_forward_matches_manual_unroll_of_the_equations() -> None:
    features, mask, captions = _batch()
    model = _model()
    out = model(features, mask, captions)
    logits, attention = _manual_unroll(model, features, mask, captions)
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.attention, attention)


@pytest.mark.parametrize("t", [0, 1, 2])
def test_attention_at_step_t_is_the_one_predicting_token_t_plus_1(t: int) -> None:
    """Changing target token t+1 (also the input of step t+1) leaves steps <= t untouched."""
    features, mask, captions = _batch()
    model = _model()
    base = model(features, mask, captions)
    changed = captions.clone()
    changed[0, t + 1] = 11 if captions[0, t + 1] != 11 else 10
    other = model(features, mask, changed)
    assert torch.equal(base.attention[:, : t + 1], other.attention[:, : t + 1])
    assert torch.equal(base.logits[:, : t + 1], other.logits[:, : t + 1])
    assert not torch.allclose(base.attention[0, t + 1], other.attention[0, t + 1])
    assert torch.equal(base.attention[1:], other.attention[1:])


def test_hand_set_attention_weights_give_exact_softmax() -> None:
    """W_h = 0 and scores 2ln2 * tanh(x_i) with tanh(x) = 0, 1/2, -1/2: weights 2/7, 4/7, 1/7."""
    model = _model()
    with torch.no_grad():
        model.attention.hidden_proj.weight.zero_()
        model.attention.feature_proj.weight.zero_()
        model.attention.feature_proj.weight[0, 0] = 1.0
        model.attention.score.weight.zero_()
        model.attention.score.weight[0, 0] = 2 * math.log(2)
    features = torch.randn(2, 4, FEAT)
    features[:, :3, 0] = torch.tensor([0.0, math.atanh(0.5), math.atanh(-0.5)])
    features[:, 3, 0] = 50.0  # padded: unmasked it would take almost all the weight
    mask = torch.tensor([[True, True, True, False]] * 2)
    captions = torch.tensor([[BOS_ID, 5, 6, EOS_ID]] * 2)
    attention = model(features, mask, captions).attention
    expected = torch.tensor([2 / 7, 4 / 7, 1 / 7, 0.0]).expand(2, 3, 4)
    torch.testing.assert_close(attention, expected, rtol=0, atol=1e-6)


def test_padded_region_features_do_not_influence_outputs() -> None:
    features, mask, captions = _batch()
    model = _model()
    base = model(features, mask, captions)
    garbage = features.clone()
    garbage[1, 2:] = 1e4 * torch.randn(2, FEAT)
    garbage[2, 3] = float("nan")
    other = model(garbage, mask, captions)
    assert torch.equal(base.logits, other.logits)
    assert torch.equal(base.attention, other.attention)
    real_changed = features.clone()
    real_changed[1, 1] += 1.0
    assert not torch.allclose(base.logits[1], model(real_changed, mask, captions).logits[1])


def test_eval_is_deterministic_and_training_uses_dropout() -> None:
    features, mask, captions = _batch()
    model = _model(dropout=0.5)
    a, b = model(features, mask, captions), model(features, mask, captions)
    assert torch.equal(a.logits, b.logits)
    model.train()
    torch.manual_seed(3)
    c = model(features, mask, captions)
    assert not torch.allclose(a.logits, c.logits)
    assert torch.equal(a.attention, c.attention)  # dropout acts only before the output layer


def test_image_without_regions_is_rejected() -> None:
    features, mask, captions = _batch()
    mask[1] = False
    with pytest.raises(ValueError, match="at least one real region"):
        _model()(features, mask, captions)


def test_caption_loss_is_cross_entropy_over_non_pad_targets() -> None:
    gen = torch.Generator().manual_seed(4)
    captions = torch.tensor([[BOS_ID, 5, EOS_ID, PAD_ID], [BOS_ID, 6, 7, EOS_ID]])
    logits = torch.randn(2, 3, VOCAB, generator=gen)
    out = CaptionerOutput(logits, torch.zeros(2, 3, 1))
    logp = F.log_softmax(logits, -1)
    picks = [logp[0, 0, 5], logp[0, 1, EOS_ID], logp[1, 0, 6], logp[1, 1, 7], logp[1, 2, EOS_ID]]
    expected = -torch.stack(picks).mean()
    torch.testing.assert_close(caption_loss(out, captions), expected)
    shifted = logits.clone()
    shifted[0, 2] += 100 * torch.randn(VOCAB, generator=gen)  # the step whose target is <pad>
    shifted_out = CaptionerOutput(shifted, out.attention)
    torch.testing.assert_close(caption_loss(shifted_out, captions), expected)


def test_greedy_decode_stops_at_eos_and_truncates_at_max_len() -> None:
    features, mask, _ = _batch()
    model = _model()
    with torch.no_grad():
        model.output.weight.zero_()
        model.output.bias.zero_()
        model.output.bias[EOS_ID] = 5.0
    tokens, attention = model.greedy_decode(features, mask, max_len=6)
    assert tokens.tolist() == [[EOS_ID]] * 3
    assert attention.shape == (3, 1, 4)
    with torch.no_grad():
        model.output.bias[8] = 10.0
    tokens, attention = model.greedy_decode(features, mask, max_len=6)
    assert tokens.tolist() == [[8] * 6] * 3
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 6))


def test_salient_regions_ignores_padding_and_breaks_ties_to_lowest_index() -> None:
    attention = torch.tensor(
        [
            [[0.2, 0.3, 0.1, 0.4], [0.4, 0.1, 0.4, 0.1]],
            [[0.25, 0.25, 0.25, 0.25], [0.0, 0.5, 0.5, 0.0]],
        ]
    )
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    index, weight = salient_regions(attention, mask)
    assert index.tolist() == [[1, 0], [1, 1]]
    torch.testing.assert_close(weight, torch.tensor([[0.3, 0.4], [0.25, 0.5]]))


# Synthetic set: each image has 4 real regions (+1 padded) holding one-hot class codes; one
# region is marked (an extra feature of 3) and the caption names the class of the marked region.
# Unmarked regions carry random classes (repeats allowed, the caption class included), so neither
# the mean feature nor a class-based attention tells the word: only attending to the marked
# region does. Attention is checked on held-out images, so memorising the training set fails.
NUM_CLASSES, MARK = 6, 3.0
THE, BIG, FIRST_CLASS = 4, 5, 6


def _synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features [n,5,7], region_mask, captions [n,5], index of the marked region [n])."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.randint(NUM_CLASSES, (n,), generator=gen)
    marked = torch.randint(4, (n,), generator=gen)
    distractors = torch.randint(NUM_CLASSES, (n, 4), generator=gen)
    region_classes = torch.where(torch.arange(4) == marked[:, None], classes[:, None], distractors)
    features = torch.zeros(n, 5, NUM_CLASSES + 1)
    features[:, :4, :NUM_CLASSES] = F.one_hot(region_classes, NUM_CLASSES).float()
    features[torch.arange(n), marked, NUM_CLASSES] = MARK
    features[:, 4] = 5 * torch.randn(n, NUM_CLASSES + 1, generator=gen)  # padded region
    mask = region_mask_from_counts(torch.full((n,), 4), 5)
    rows = []
    for c in classes.tolist():  # classes >= 3 add "big" before <eos>: captions of different lengths
        tail = [BIG, EOS_ID] if c >= 3 else [EOS_ID, PAD_ID]
        rows.append([BOS_ID, THE, FIRST_CLASS + c] + tail)
    return features, mask, torch.tensor(rows), marked


@pytest.fixture(scope="module")
def trained() -> tuple[UpDownCaptioner, list[float]]:
    features, mask, captions, _ = _synthetic(32, seed=100)
    torch.manual_seed(0)
    model = UpDownCaptioner(FIRST_CLASS + NUM_CLASSES, NUM_CLASSES + 1, 16, 32, 16, dropout=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(120):
        loss = caption_loss(model(features, mask, captions), captions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_training_reduces_loss(trained) -> None:
    _, losses = trained
    assert losses[-1] < 0.1 < losses[0]


def test_trained_attention_peaks_on_the_region_that_determines_the_word(trained) -> None:
    model, _ = trained
    features, mask, captions, marked = _synthetic(16, seed=200)
    out = model(features, mask, captions)
    index, weight = salient_regions(out.attention, mask)
    assert torch.equal(index[:, 1], marked)  # step 1 predicts captions[:, 2], the class word
    assert bool((weight[:, 1] > 0.5).all())


def test_trained_greedy_decode_reproduces_captions_and_pads_after_eos(trained) -> None:
    model, _ = trained
    features, mask, captions, _ = _synthetic(32, seed=100)
    model.train()
    tokens, attention = model.greedy_decode(features, mask, max_len=10)
    assert model.training  # mode restored
    model.eval()
    assert torch.equal(tokens, captions[:, 1:])  # rows ending early hold <pad> after <eos>
    assert bool((attention[captions[:, 1:] == PAD_ID] == 0).all())
    torch.testing.assert_close(attention[:, :2], model(features, mask, captions).attention[:, :2])
