"""DAMSM losses (supplementary Eq. 15-25) against hand computation, masking and reductions."""
from __future__ import annotations

import math

import pytest
import torch

from cpgan.model.losses import damsm_loss, damsm_scores, word_mask

G1, G2, G3 = 4.0, 5.0, 10.0

# Tiny case: B = 2 pairs, T = 2 words, R = 2 regions, d = 2. Columns are words / regions.
WORDS = [[[1.0, 0.0], [0.0, 1.0]],        # caption 0: w1 = (1, 0), w2 = (0, 1)
         [[1.0, -1.0], [1.0, 0.5]]]       # caption 1: w1 = (1, 1), w2 = (-1, 0.5)
REGIONS = [[[1.0, 0.0], [0.5, 1.0]],      # image 0: v1 = (1, 0.5), v2 = (0, 1)
           [[0.2, 1.0], [-1.0, 0.3]]]     # image 1: v1 = (0.2, -1), v2 = (1, 0.3)
SENTENCES = [[1.0, 0.2], [-0.3, 1.0]]
GLOBALS = [[0.9, 0.1], [0.5, 0.8]]


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _column(matrix: list[list[float]], j: int) -> list[float]:
    return [row[j] for row in matrix]


def _hand_word_score(c: int, i: int) -> float:
    """R(I_i, D_c) of Eq. 19, step by step in plain Python (Eq. 15-19)."""
    w, v = WORDS[c], REGIONS[i]
    words = [_column(w, t) for t in range(2)]
    regions = [_column(v, r) for r in range(2)]
    sim = [[sum(a * b for a, b in zip(words[t], regions[r])) for r in range(2)] for t in range(2)]
    sim_bar = [[math.exp(sim[t][r]) / sum(math.exp(sim[k][r]) for k in range(2))
                for r in range(2)] for t in range(2)]                               # Eq. 16
    total = 0.0
    for t in range(2):
        weights = [math.exp(G1 * sim_bar[t][r]) for r in range(2)]
        alpha = [x / sum(weights) for x in weights]                                 # Eq. 17
        context = [sum(alpha[r] * regions[r][k] for r in range(2)) for k in range(2)]  # Eq. 18
        total += math.exp(G2 * _cos(context, words[t]))
    return math.log(total) / G2                                                     # Eq. 19


def _neg_log_softmax(logits: list[float], index: int) -> float:
    return -(logits[index] - math.log(sum(math.exp(x) for x in logits)))


def _hand_losses() -> dict[str, float]:
    word = [[_hand_word_score(c, i) for c in range(2)] for i in range(2)]    # [image][caption]
    sent = [[_cos(GLOBALS[i], SENTENCES[c]) for c in range(2)] for i in range(2)]  # Eq. 22
    out = {}
    for name, scores in (("word", word), ("sentence", sent)):
        d_given_i = sum(_neg_log_softmax([G3 * scores[i][c] for c in range(2)], i)
                        for i in range(2)) / 2                                 # Eq. 20
        i_given_d = sum(_neg_log_softmax([G3 * scores[i][c] for i in range(2)], c)
                        for c in range(2)) / 2
        out[f"{name}_captions_given_images"] = d_given_i
        out[f"{name}_images_given_captions"] = i_given_d
        out[name] = d_given_i + i_given_d                                      # Eq. 21, 24
    out["total"] = out["word"] + out["sentence"]                               # Eq. 25
    out["word_scores"] = word
    return out


def _tensors() -> tuple[torch.Tensor, ...]:
    as_t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return as_t(WORDS), as_t(SENTENCES), as_t(REGIONS), as_t(GLOBALS)


def test_damsm_loss_equals_hand_computation() -> None:
    words, sentences, regions, globals_ = _tensors()
    total, parts = damsm_loss(words, torch.tensor([2, 2]), sentences, regions, globals_,
                              G1, G2, G3)
    expected = _hand_losses()
    assert total.item() == pytest.approx(expected["total"], rel=1e-10)
    for key in ("word", "sentence", "word_captions_given_images",
                "word_images_given_captions", "sentence_captions_given_images",
                "sentence_images_given_captions"):
        assert parts[key].item() == pytest.approx(expected[key], rel=1e-10), key
    assert torch.allclose(parts["word_scores"],
                          torch.tensor(expected["word_scores"], dtype=torch.float64))
    # The directions differ on this asymmetric case, so rows/columns are not swapped.
    assert expected["word_captions_given_images"] != pytest.approx(expected["word_images_given_captions"])


def test_sentence_loss_of_orthonormal_pairs_is_closed_form() -> None:
    """cos(f_i, s_j) = identity: each direction is -log(e^g3 / (e^g3 + 1)) = log(1 + e^-g3)."""
    eye = torch.eye(2, dtype=torch.float64)
    words = torch.randn(2, 2, 3, dtype=torch.float64)
    _, parts = damsm_loss(words, torch.tensor([3, 1]), eye, torch.randn(2, 2, 4).double(), eye,
                          G1, G2, G3)
    assert parts["sentence"].item() == pytest.approx(2 * math.log1p(math.exp(-G3)), rel=1e-12)


def test_sum_reduction_is_batch_times_mean() -> None:
    torch.manual_seed(0)
    args = (torch.randn(3, 4, 5), torch.tensor([5, 2, 3]), torch.randn(3, 4),
            torch.randn(3, 4, 6), torch.randn(3, 4), G1, G2, G3)
    mean, _ = damsm_loss(*args)
    total, _ = damsm_loss(*args, reduction="sum")
    assert total.item() == pytest.approx(3 * mean.item(), rel=1e-5)


def test_padded_word_changes_nothing() -> None:
    torch.manual_seed(1)
    words, lengths = torch.randn(3, 8, 4), torch.tensor([4, 2, 3])
    for b, n in enumerate(lengths.tolist()):
        words[b, :, n:] = 0.0
    args = (torch.randn(3, 8), torch.randn(3, 8, 10), torch.randn(3, 8))
    base, base_parts = damsm_loss(words, lengths, *args, G1, G2, G3)
    padded = torch.cat([words, 5.0 * torch.randn(3, 8, 1)], dim=2).requires_grad_(True)
    loss, parts = damsm_loss(padded, lengths, *args, G1, G2, G3)
    assert loss.item() == pytest.approx(base.item(), rel=1e-6)
    assert torch.allclose(parts["word_scores"], base_parts["word_scores"], atol=1e-6)
    mask = word_mask(lengths, 5)
    by_mask, _ = damsm_loss(padded, mask, *args, G1, G2, G3)
    assert by_mask.item() == pytest.approx(base.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(padded.grad).all()
    assert torch.all(padded.grad[~mask.unsqueeze(1).expand_as(padded)] == 0)
    assert padded.grad[0, :, 0].abs().sum() > 0


def test_masked_region_changes_nothing() -> None:
    torch.manual_seed(2)
    words, lengths = torch.randn(2, 6, 3), torch.tensor([3, 2])
    sentences, regions, globals_ = torch.randn(2, 6), torch.randn(2, 6, 5), torch.randn(2, 6)
    base, _ = damsm_loss(words, lengths, sentences, regions, globals_, G1, G2, G3)
    extra = torch.cat([regions, 3.0 * torch.randn(2, 6, 1)], dim=2)
    region_mask = torch.ones(2, 6, dtype=torch.bool)
    region_mask[:, 5] = False
    loss, _ = damsm_loss(words, lengths, sentences, extra, globals_, G1, G2, G3,
                         region_mask=region_mask)
    unmasked, _ = damsm_loss(words, lengths, sentences, extra, globals_, G1, G2, G3)
    assert loss.item() == pytest.approx(base.item(), rel=1e-6)
    assert unmasked.item() != pytest.approx(base.item(), rel=1e-6)


def test_same_class_negatives_are_removed() -> None:
    """AttnGAN's class masking: with one class for the whole batch no negative is left."""
    torch.manual_seed(3)
    args = (torch.randn(3, 4, 5), torch.tensor([5, 2, 3]), torch.randn(3, 4),
            torch.randn(3, 4, 6), torch.randn(3, 4), G1, G2, G3)
    loss, _ = damsm_loss(*args, class_ids=torch.tensor([7, 7, 7]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    distinct, _ = damsm_loss(*args, class_ids=torch.tensor([1, 2, 3]))
    plain, _ = damsm_loss(*args)
    assert distinct.item() == pytest.approx(plain.item(), rel=1e-6)


def test_scores_rank_aligned_pairs_first() -> None:
    """Captions whose words equal the image's regions score highest on their own image."""
    torch.manual_seed(4)
    regions = torch.nn.functional.normalize(torch.randn(4, 16, 3), dim=1) * 4
    scores = damsm_scores(regions.clone(), torch.tensor([3, 3, 3, 3]), torch.randn(4, 16),
                          regions, torch.randn(4, 16), G1, G2)
    assert torch.equal(scores.word.argmax(dim=1), torch.arange(4))


def test_bad_inputs_are_refused() -> None:
    words, s, v, f = torch.randn(2, 4, 3), torch.randn(2, 4), torch.randn(2, 4, 5), torch.randn(2, 4)
    with pytest.raises(ValueError, match="at least one real word"):
        damsm_loss(words, torch.tensor([3, 0]), s, v, f, G1, G2, G3)
    with pytest.raises(ValueError, match="does not match"):
        damsm_loss(words, torch.tensor([3, 1]), s, torch.randn(2, 5, 5), f, G1, G2, G3)
    with pytest.raises(ValueError, match="caption lengths"):
        damsm_loss(words, torch.tensor([3, 1, 2]), s, v, f, G1, G2, G3)


def _multi_caption_batch(images: int, per_image: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(5)
    captions = images * per_image
    return (torch.randn(captions, 4, 5), torch.randint(1, 6, (captions,)),
            torch.randn(captions, 4), torch.randn(images, 4, 6), torch.randn(images, 4))


def test_several_captions_per_image_match_repeated_images_with_own_captions_masked() -> None:
    """K captions per image: the loss over the K * B pairs, each image's other captions out of
    the denominators. Reference: every image repeated once per caption, with class masking."""
    words, lengths, sentences, regions, globals_ = _multi_caption_batch(3, 2)
    loss, parts = damsm_loss(words, lengths, sentences, regions, globals_, G1, G2, G3,
                             captions_per_image=2)
    repeated = (words, lengths, sentences, regions.repeat(2, 1, 1), globals_.repeat(2, 1))
    reference, _ = damsm_loss(*repeated, G1, G2, G3, class_ids=torch.arange(3).repeat(2))
    unmasked, _ = damsm_loss(*repeated, G1, G2, G3)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert unmasked.item() > reference.item() + 0.1  # a true caption counted as a negative
    assert parts["word_scores"].shape == (3, 6)


def test_captions_per_image_checks_the_layout() -> None:
    words, lengths, sentences, regions, globals_ = _multi_caption_batch(3, 2)
    with pytest.raises(ValueError, match="does not hold 2 caption"):
        damsm_loss(words[:5], lengths[:5], sentences[:5], regions, globals_, G1, G2, G3,
                   captions_per_image=2)
    with pytest.raises(ValueError, match="captions_per_image must be >= 1"):
        damsm_loss(words, lengths, sentences, regions, globals_, G1, G2, G3, captions_per_image=0)


def test_swapped_negatives_add_eq_23_with_each_image_s_own_false_captions() -> None:
    """One false caption per image: a third term, -log P(D_i | I_i) over the batch's captions
    and image i's own false caption; Eq. 21 and 24 unchanged."""
    words, sentences, regions, globals_ = _tensors()
    lengths = torch.tensor([2, 2])
    false = torch.tensor([[0.2, 1.0], [1.0, 0.1]], dtype=torch.float64)
    plain, plain_parts = damsm_loss(words, lengths, sentences, regions, globals_, G1, G2, G3)
    loss, parts = damsm_loss(words, lengths, sentences, regions, globals_, G1, G2, G3,
                             negative_sentences=false)
    sent = [[_cos(GLOBALS[i], SENTENCES[c]) for c in range(2)] for i in range(2)]
    hand = sum(_neg_log_softmax([G3 * s for s in sent[i]]
                                + [G3 * _cos(GLOBALS[i], false[i].tolist())], i)
               for i in range(2)) / 2
    assert parts["swapped"].item() == pytest.approx(hand, rel=1e-9)
    assert hand > plain_parts["sentence_captions_given_images"].item()
    assert plain_parts["swapped"].item() == 0.0
    for key in ("sentence", "word"):
        assert parts[key].item() == pytest.approx(plain_parts[key].item(), rel=1e-12)
    assert loss.item() == pytest.approx(plain.item() + hand, rel=1e-12)
    masked, parts = damsm_loss(words, lengths, sentences, regions, globals_, G1, G2, G3,
                               negative_sentences=false, negative_mask=torch.tensor([False, False]))
    assert parts["swapped"].item() == pytest.approx(
        plain_parts["sentence_captions_given_images"].item(), rel=1e-12)


def test_swapped_negatives_follow_the_caption_layout() -> None:
    """N false captions in rows n * B + i, repeated for every one of K captions per image."""
    words, lengths, sentences, regions, globals_ = _multi_caption_batch(3, 2)
    torch.manual_seed(6)
    false = torch.randn(6, 4)  # N = 2 for B = 3
    _, parts = damsm_loss(words, lengths, sentences, regions, globals_, G1, G2, G3,
                          captions_per_image=2, negative_sentences=false)
    logits = G3 * torch.nn.functional.cosine_similarity(
        globals_.unsqueeze(1), sentences.unsqueeze(0), dim=-1).repeat(2, 1)
    own = torch.arange(3).repeat(2)
    same = own.unsqueeze(0) == own.unsqueeze(1)
    same.fill_diagonal_(False)
    negatives = G3 * torch.nn.functional.cosine_similarity(
        globals_.unsqueeze(1), false.view(2, 3, 4).transpose(0, 1), dim=-1)  # [3, 2]
    rows = torch.cat([logits.masked_fill(same, float("-inf")), negatives.repeat(2, 1)], dim=1)
    reference = torch.nn.functional.cross_entropy(rows, torch.arange(6))
    assert parts["swapped"].item() == pytest.approx(reference.item(), rel=1e-5)
    with pytest.raises(ValueError, match="negative sentences must be"):
        damsm_loss(words, lengths, sentences, regions, globals_, G1, G2, G3,
                   captions_per_image=2, negative_sentences=false[:5])
    with pytest.raises(ValueError, match="negative mask must be"):
        damsm_loss(words, lengths, sentences, regions, globals_, G1, G2, G3, captions_per_image=2,
                   negative_sentences=false, negative_mask=torch.ones(3, dtype=torch.bool))
