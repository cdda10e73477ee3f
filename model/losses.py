"""DAMSM matching losses (AttnGAN's Deep Attentional Multimodal Similarity Model), CPGAN
supplementary §6.3, Eq. 14-25; TISCL (Eq. 6) is this loss on (OAIE(generated), MATE(text)).

Word level. For caption c and image i: Sim = W^T V (Eq. 15) between the caption's words and
the image's sub-regions; a softmax over the *words* of each region (Eq. 16), then a softmax
over the regions for each word with sharpness gamma1 (Eq. 17) -- the same double normalisation
as AttnGAN's ``func_attention`` -- gives the region context c_t of word t (Eq. 18). The pair
scores R(I, D) = (1/gamma2) log sum_t exp(gamma2 cos(c_t, w_t)) (Eq. 19).

Sentence level. R-hat(I, D) = cos(f, s) (Eq. 22).

Both score matrices enter a softmax over the batch with factor gamma3 in both directions,
P(D_i | I_i) over captions and P(I_i | D_i) over images (Eq. 20, 23); the losses are their
negative log-likelihoods (Eq. 21, 24) and the total is L^w + L^s (Eq. 25).

Choices, where the paper and AttnGAN's code differ:

* Eq. 19 keeps the paper's power 1/gamma2. AttnGAN's code omits it (log sum exp only), which
  amounts to using gamma3 * gamma2 in place of gamma3 for the word-level logits.
* Reduction: the paper sums over the batch (Eq. 21, 24); AttnGAN's ``CrossEntropyLoss``
  averages. ``reduction="mean"`` (default) follows AttnGAN, whose TISCL weight lambda the
  paper keeps (50 on COCO); ``"sum"`` gives the paper's literal sums.
* Padded words are excluded everywhere: from the Eq. 16 softmax (they get no attention mass)
  and from the Eq. 19 sum. Padded regions (``region_mask`` False, e.g. empty detector slots)
  are excluded from the Eq. 17 softmax.
* ``class_ids`` (AttnGAN, for CUB) removes non-matching pairs of the same class from the
  softmax denominators; COCO has no classes and passes None.
* ``captions_per_image`` K > 1 (ours, for pretraining): every image comes with K of its
  captions, all positives. The loss is Eq. 20-25 over the K * B (image, caption) pairs, with an
  image's other captions left out of each denominator the way ``class_ids`` leaves out a
  class, so no true caption is ever a negative. The word-level scores are computed once per
  distinct (image, caption) pair, [B, K * B], not for the K * B repeated images.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

COSINE_EPS = 1e-8  # AttnGAN's cosine_similarity eps


class DamsmScores(NamedTuple):
    """Image-caption score matrices, rows images and columns captions (before gamma3)."""

    word: Tensor      # [B_img, B_cap], R(I_i, D_j) of Eq. 19
    sentence: Tensor  # [B_img, B_cap], R-hat(I_i, D_j) of Eq. 22


def word_mask(lengths_or_mask: Tensor, num_words: int) -> Tensor:
    """``[B, T]`` bool mask of real words from caption lengths ``[B]`` or a ``[B, T]`` mask."""
    if lengths_or_mask.dim() == 1:
        positions = torch.arange(num_words, device=lengths_or_mask.device)
        mask = positions.unsqueeze(0) < lengths_or_mask.unsqueeze(1)
    elif lengths_or_mask.dim() == 2 and lengths_or_mask.shape[1] == num_words:
        mask = lengths_or_mask.bool()
    else:
        raise ValueError(f"expected lengths [B] or a [B, {num_words}] mask, "
                         f"got {tuple(lengths_or_mask.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every caption needs at least one real word")
    return mask


def cosine(x: Tensor, y: Tensor, dim: int = -1) -> Tensor:
    """Cosine similarity with AttnGAN's guard: x.y / max(|x| |y|, eps)."""
    return (x * y).sum(dim) / (x.norm(dim=dim) * y.norm(dim=dim)).clamp(min=COSINE_EPS)


def region_context(
    words: Tensor, mask: Tensor, regions: Tensor, gamma1: float,
    region_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Eq. 15-18 for every (caption c, image i) pair of the batch.

    ``words`` W ``[B, d, T]``, ``regions`` V ``[B, d, R]``. Returns the region contexts
    ``[B_cap, B_img, T, d]`` and the attention alpha ``[B_cap, B_img, T, R]``.
    """
    sim = torch.einsum("cdt,idr->citr", words, regions)                       # Eq. 15
    sim = sim.masked_fill(~mask[:, None, :, None], float("-inf"))
    sim_bar = torch.softmax(sim, dim=2)                                       # Eq. 16
    logits = gamma1 * sim_bar
    if region_mask is not None:
        logits = logits.masked_fill(~region_mask[None, :, None, :], float("-inf"))
    alpha = torch.softmax(logits, dim=3)                                      # Eq. 17
    return torch.einsum("citr,idr->citd", alpha, regions), alpha              # Eq. 18


def word_scores(
    words: Tensor, mask: Tensor, regions: Tensor, gamma1: float, gamma2: float,
    region_mask: Tensor | None = None,
) -> Tensor:
    """R(I_i, D_j) of Eq. 19 as ``[B_img, B_cap]``, padded words left out of the sum."""
    context, _ = region_context(words, mask, regions, gamma1, region_mask)
    relevance = cosine(context, words.transpose(1, 2).unsqueeze(1))           # [c, i, T]
    relevance = (gamma2 * relevance).masked_fill(~mask[:, None, :], float("-inf"))
    return (torch.logsumexp(relevance, dim=2) / gamma2).transpose(0, 1)       # Eq. 19


def sentence_scores(sentence: Tensor, global_feature: Tensor) -> Tensor:
    """R-hat(I_i, D_j) = cos(f_i, s_j) of Eq. 22 as ``[B_img, B_cap]``."""
    return cosine(global_feature.unsqueeze(1), sentence.unsqueeze(0))


def damsm_scores(
    words: Tensor, lengths_or_mask: Tensor, sentence: Tensor, regions: Tensor,
    global_feature: Tensor, gamma1: float, gamma2: float, region_mask: Tensor | None = None,
    captions_per_image: int = 1,
) -> DamsmScores:
    """Both image-caption score matrices of a batch (also the inputs of R-precision):
    ``[B_img, K * B_img]`` for K captions per image."""
    _check_shapes(words, sentence, regions, global_feature, region_mask, captions_per_image)
    mask = word_mask(lengths_or_mask.to(words.device), words.shape[2])
    if mask.shape[0] != words.shape[0]:
        raise ValueError(f"{mask.shape[0]} caption lengths for a batch of {words.shape[0]}")
    return DamsmScores(word_scores(words, mask, regions, gamma1, gamma2, region_mask),
                       sentence_scores(sentence, global_feature))


def matching_loss(
    scores: Tensor, gamma3: float, class_ids: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean", negatives: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """-log P(D_i | I_i) and -log P(I_i | D_i) (Eq. 20-21, 23-24) from ``[B_img, B_cap]``.

    ``negatives`` ``[B_img, N]``: scores of captions that only image i is scored against
    (-inf: none), added to the denominator of P(D_i | I_i) alone, as they describe no image."""
    logits = gamma3 * scores
    if class_ids is not None:
        same = class_ids.unsqueeze(0) == class_ids.unsqueeze(1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(scores.shape[0], device=scores.device)
    given_images = logits if negatives is None else torch.cat([logits, gamma3 * negatives], 1)
    captions_given_images = F.cross_entropy(given_images, labels, reduction=reduction)
    images_given_captions = F.cross_entropy(logits.t(), labels, reduction=reduction)
    return captions_given_images, images_given_captions


def damsm_loss(
    words: Tensor,
    lengths_or_mask: Tensor,
    sentence: Tensor,
    regions: Tensor,
    global_feature: Tensor,
    gamma1: float,
    gamma2: float,
    gamma3: float,
    class_ids: Tensor | None = None,
    region_mask: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    captions_per_image: int = 1,
    negative_sentences: Tensor | None = None,
    negative_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_DAMSM = L^w + L^s (Eq. 25) on a batch of matching (image, caption) pairs.

    ``words`` W ``[B, d, T]`` with ``lengths_or_mask`` (lengths ``[B]`` or a ``[B, T]`` mask),
    ``sentence`` s ``[B, d]``, ``regions`` V ``[B, d, R]``, ``global_feature`` f ``[B, d]``.
    With ``captions_per_image`` K the caption tensors hold K * B rows, row ``k * B + i`` the
    k-th caption of image i (see the module docstring), and ``class_ids`` stays one per image.
    ``parts`` holds the word and sentence losses, each direction, and the score matrices
    (``[B, K * B]``).

    ``negative_sentences`` s' ``[N * B, d]`` (row ``n * B + i``: a caption made false of image
    i, :mod:`cpgan.trainer.negatives`) with ``negative_mask`` ``[N * B]`` (False: no such
    caption) add a third term, ``parts["swapped"]``: Eq. 23's -log P(D_i | I_i) again, with
    image i's own false captions in its denominator beside the batch's. Hard negatives that
    differ from a true caption by one word; not in AttnGAN or the paper. (Put into Eq. 23's
    own denominator instead, they gave val R-precision 0.885 / 0.884 / 0.895 for seeds 0-2 on
    toy, the recipe without them 0.893 / 0.881 / 0.900: RESULTS.md, session 11.)
    """
    scores = damsm_scores(words, lengths_or_mask, sentence, regions, global_feature,
                          gamma1, gamma2, region_mask, captions_per_image)
    negatives = None
    if negative_sentences is not None:
        negatives = _negative_scores(global_feature, negative_sentences, negative_mask)
        negatives = negatives.repeat(captions_per_image, 1)
    if captions_per_image > 1:
        images = regions.shape[0]
        if class_ids is None:
            class_ids = torch.arange(images, device=regions.device)
        class_ids = class_ids.repeat(captions_per_image)
    word_d, word_i = matching_loss(scores.word.repeat(captions_per_image, 1), gamma3,
                                   class_ids, reduction)
    sentence_rows = scores.sentence.repeat(captions_per_image, 1)
    sent_d, sent_i = matching_loss(sentence_rows, gamma3, class_ids, reduction)
    word_loss, sentence_loss = word_d + word_i, sent_d + sent_i              # Eq. 21, 24
    swapped_loss = sentence_loss.new_zeros(())
    if negatives is not None:
        swapped_loss, _ = matching_loss(sentence_rows, gamma3, class_ids, reduction, negatives)
    parts = {
        "word": word_loss, "sentence": sentence_loss, "swapped": swapped_loss,
        "word_captions_given_images": word_d, "word_images_given_captions": word_i,
        "sentence_captions_given_images": sent_d, "sentence_images_given_captions": sent_i,
        "word_scores": scores.word, "sentence_scores": scores.sentence,
    }
    return word_loss + sentence_loss + swapped_loss, parts


def _negative_scores(global_feature: Tensor, sentences: Tensor, mask: Tensor | None) -> Tensor:
    """cos(f_i, s'_{n, i}) as ``[B, N]``, -inf where ``mask`` says there is no caption."""
    images = global_feature.shape[0]
    if sentences.dim() != 2 or sentences.shape[0] % images or \
            sentences.shape[1] != global_feature.shape[1]:
        raise ValueError(f"negative sentences must be [N * {images}, {global_feature.shape[1]}], "
                         f"got {tuple(sentences.shape)}")
    count = sentences.shape[0] // images
    scores = cosine(global_feature.unsqueeze(1), sentences.view(count, images, -1).transpose(0, 1))
    if mask is None:
        return scores
    if mask.shape != (sentences.shape[0],):
        raise ValueError(f"negative mask must be [{sentences.shape[0]}], got {tuple(mask.shape)}")
    return scores.masked_fill(~mask.view(count, images).t(), float("-inf"))


def _check_shapes(words: Tensor, sentence: Tensor, regions: Tensor, global_feature: Tensor,
                  region_mask: Tensor | None, captions_per_image: int = 1) -> None:
    if words.dim() != 3 or regions.dim() != 3 or sentence.dim() != 2 or global_feature.dim() != 2:
        raise ValueError("expected W [B, d, T], s [B, d], V [B, d, R], f [B, d]; got "
                         f"{tuple(words.shape)}, {tuple(sentence.shape)}, "
                         f"{tuple(regions.shape)}, {tuple(global_feature.shape)}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    captions, dim = words.shape[:2]
    batch = regions.shape[0]
    if captions != captions_per_image * batch:
        raise ValueError(f"W {tuple(words.shape)} does not hold {captions_per_image} "
                         f"caption(s) for each of the {batch} images of V {tuple(regions.shape)}")
    if sentence.shape != (captions, dim):
        raise ValueError(f"s {tuple(sentence.shape)} does not match W {tuple(words.shape)}")
    for name, tensor in (("V", regions), ("f", global_feature)):
        if tensor.shape[:2] != (batch, dim):
            raise ValueError(f"{name} {tuple(tensor.shape)} does not match W {tuple(words.shape)}")
    if region_mask is None:
        return
    if region_mask.shape != (batch, regions.shape[2]):
        raise ValueError(f"region_mask {tuple(region_mask.shape)} does not match V "
                         f"{tuple(regions.shape)}")
    if not bool(region_mask.any(dim=1).all()):
        raise ValueError("every image needs at least one real region")
