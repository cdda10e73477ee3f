"""``cpgan-eval``: IS, FID, R-precision and SOA of a trained CPGAN (paper §4), with a floor and
a ceiling beside every number.

The paper reports the Inception Score and R-precision; the field has since moved to FID and
Semantic Object Accuracy, so all four are computed, each for three sets of images made from the
same val (image, caption) pairs:

* ``generated`` -- the run's EMA generator, one image per pair, truncated noise;
* ``real`` -- the val images themselves (the ceiling);
* ``untrained`` -- a freshly initialised generator of the same config, given the same noise
  and captions (the floor: what the metrics say about images that owe nothing to training).

The pairs are exactly those of :class:`~cpgan.trainer.data.TextImageDataset` with
``augment=False`` and the run's seed, the ones the trainer validates on. Per set:

* Inception Score (:func:`~cpgan.model.metrics.inception_score`, 10 splits): the toy preset
  scores with the classifier fitted on real toy images (``cpgan-eval fit-classifier``),
  the paper preset with torchvision's ImageNet Inception-v3, as the CPGAN release did;
* FID against the real val images' features of the same network. For ``real`` itself, a
  seeded random half against the other half (FID of a set against itself is 0 and says
  nothing; half-size sets carry FID's small-sample bias, so this ceiling is slightly
  pessimistic). On COCO the features are the 2048-d pool3 of the pt_inception-2015-12-05
  network of published FIDs (:mod:`cpgan.model.fid_inception`) when ``--fid-weights`` is
  given, else torchvision Inception-v3's pool, whose FIDs are not comparable with published
  ones; the report's config says which network computed FID;
* R-precision of the image's global feature f from the run's frozen pretrained OAIE against
  the sentence vectors s of MATE (DM-GAN's 1 true vs 99 random captions, 10 folds, and the
  CPGAN release's in-batch variant), with fewer candidates when fewer images (recorded);
* SOA-C / SOA-I (Hinz et al.) with the project's detector (``models/detector.pt``) on the
  images whose caption names a detector class (toy: the shape words, synonyms and plurals).

``--stage K`` scores stage K's images instead of the last stage's (0: the first, 16 px for
the toy preset), to tell which stage fails: the generated and untrained images are enlarged to
the final size (bilinear) for the 64-px scorers, and the real ones are shrunk to the stage's
size as the trainer's real pyramid is (antialiased bilinear) and enlarged back, so the real
block is the ceiling at that resolution and FID compares like with like.

Everything streams: per batch, the images are scored and only their class probabilities, pool
features, f and detected classes are kept, so memory grows with the number of images by a
few kilobytes each, never by the images themselves.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from cpgan.config import Config
from cpgan.errors import CpganError
from cpgan.layout import MEMORY_NAME, VOCAB_NAME
from cpgan.model.darknet import Darknet
from cpgan.model.generator import Generator, GeneratorOutput
from cpgan.model.image_encoder import ObjectAwareImageEncoder
from cpgan.model.metrics import (
    CANDIDATES,
    FOLDS,
    IS_SPLITS,
    SOA_OBJECTNESS,
    detected_categories,
    fid,
    inception_score,
    r_precision,
    r_precision_in_batch,
    soa_class_recall,
    soa_no_object,
    soa_scores,
    soa_unnamed,
)
from cpgan.model.text_encoder import MemoryAttendedTextEncoder
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.report import AttentionExample, Showcase
from cpgan.pipeline.text import Vocabulary
from cpgan.trainer.data import multi_resolution_sizes
from cpgan.trainer.sampling import (
    EncodedText,
    GanCheckpoint,
    encode_captions,
    enlarge,
    final_size,
    generate,
    load_generator,
    load_vocab,
    resolve,
    to_uint8,
    untrained_generator,
)

SPLIT = "val2014"
BLOCKS = ("generated", "real", "untrained")
MIN_IMAGES = 4
"""The real set's FID needs two halves of at least two images each."""
SHOWCASE = 8
ATTENTION_EXAMPLES = 3


# --------------------------------------------------------------------------------------------
# The frozen networks


@dataclass
class Scoring:
    """The IS/FID network and what the report says about it; ``fid_network``, when set,
    gives the FID features in place of ``network``'s (the paper preset's pt_inception)."""

    network: nn.Module
    kind: str
    weights: Path
    fid_features: str
    fid_network: nn.Module | None = None

    def to(self, device: str) -> "Scoring":
        fid_network = None if self.fid_network is None else self.fid_network.to(device)
        return replace(self, network=self.network.to(device), fid_network=fid_network)

    @torch.no_grad()
    def score(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Softmax for IS and features for FID (float32, CPU) of images in [-1, 1]."""
        from cpgan.trainer.classifier import score_images, to_unit_range

        probs, pool = score_images(self.network, images, len(images), str(images.device))
        if self.fid_network is not None:
            unit = to_unit_range(images) if images.dtype == torch.uint8 else images.float()
            pool = self.fid_network.eval()(unit).float().cpu()
        return probs, pool


def load_scoring(preset: str, classifier_weights: Path, inception_weights: Path | None,
                 image_size: int, fid_weights: Path | None = None) -> Scoring:
    """Toy preset: the fitted toy classifier; paper preset: torchvision's Inception-v3 for IS
    (as the CPGAN release) and, given ``fid_weights``, pt_inception-2015-12-05 for FID."""
    from cpgan.model.fid_inception import FID_INCEPTION_NAME, load_fid_inception
    from cpgan.trainer.classifier import load_scoring_network

    if preset == "toy" and fid_weights is not None:
        raise CpganError(f"{fid_weights}: --fid-weights is for the paper preset (COCO); the toy "
                         "preset scores FID with its fitted classifier's features")
    if preset == "toy":
        if not Path(classifier_weights).is_file():
            raise CpganError(f"{classifier_weights}: toy scoring classifier not found (make it "
                             "with 'cpgan-eval fit-classifier', or pass --scoring-weights)")
        network = load_scoring_network("classifier", classifier_weights, image_size)
        return Scoring(network, "classifier", Path(classifier_weights),
                       f"toy classifier pooled features ({network.feature_dim}-d)")
    if inception_weights is None:
        raise CpganError("the paper preset scores IS and FID with torchvision's Inception-v3: "
                         "pass --inception-weights FILE (inception_v3_google-0cc3c7bd.pth)")
    network = load_scoring_network("inception", inception_weights)
    if fid_weights is None:
        return Scoring(network, "inception", Path(inception_weights),
                       f"torchvision Inception-v3 pool3 (2048-d), not the {FID_INCEPTION_NAME} "
                       "network of published FIDs: not comparable with published numbers")
    return Scoring(network, "inception", Path(inception_weights),
                   f"{FID_INCEPTION_NAME} pool3 (2048-d, pytorch-fid's FID Inception, the "
                   f"network of published FIDs) from {fid_weights}",
                   load_fid_inception(fid_weights))


def load_soa_detector(cfg: Path, weights: Path, split: CocoSplit) -> tuple[Darknet, list[int]]:
    """The detector for SOA and the dataset category id of each of its classes.

    ``models/detector.pt`` records its category ids; a Darknet ``.weights`` file does not, and
    its classes are then the split's categories in id order (the COCO-trained YOLOv3's 80).
    """
    from cpgan.pipeline.detect import load_detector_record

    detector, record = load_detector_record(cfg, weights)
    known = split.categories()
    if Path(weights).suffix == ".pt":
        ids = record.get("category_ids")
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise CpganError(f"{weights}: no 'category_ids' list (write it with "
                             "'cpgan-prep train-detector')")
    else:
        ids = sorted(known)
    if len(ids) != detector.num_classes:
        raise CpganError(f"{weights}: {len(ids)} category ids for a detector of "
                         f"{detector.num_classes} classes ({split.instances_file})")
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise CpganError(f"{weights}: category id {unknown[0]} is not a category of "
                         f"{split.instances_file}")
    return detector, ids


@dataclass
class EvalFiles:
    """Every input file of an evaluation (its provenance record lists them)."""

    artifacts: Path
    classifier_weights: Path
    inception_weights: Path | None
    detector_weights: Path
    detector_cfg: Path
    fid_weights: Path | None = None
    rprecision_encoders: Path | None = None
    """DAMSM encoders that score R-precision instead of the run's own (ablations)."""
    soa_detector_weights: Path | None = None
    """A detector for SOA other than the one whose features the encoders read (the same cfg):
    one the generator never trained through, so that its SOA cannot come from pleasing the
    detector of TISCL alone."""

    def inputs(self, checkpoint: GanCheckpoint, split: CocoSplit, scoring: Scoring) -> list[Path]:
        from cpgan.trainer.damsm import variant_files

        paths = [checkpoint.path, resolve(self.artifacts, checkpoint.encoders),
                 self.artifacts / VOCAB_NAME, self.detector_weights, self.detector_cfg,
                 scoring.weights, split.captions_file, split.instances_file]
        if checkpoint.memory:
            paths.append(resolve(self.artifacts, checkpoint.memory))
        if self.inception_weights is not None:
            paths.append(self.inception_weights)
        if self.fid_weights is not None:
            paths.append(self.fid_weights)
        if self.rprecision_encoders is not None:
            paths += [self.rprecision_encoders, self.artifacts / MEMORY_NAME]
        if self.soa_detector_weights is not None:
            paths.append(self.soa_detector_weights)
        # every pretrained encoder variant: the report tabulates their val figures
        paths += [path for path, _, _ in variant_files(self.artifacts / "models")]
        return sorted(set(paths))


@dataclass
class EvalModels:
    """Everything an evaluation runs, frozen and in eval mode."""

    checkpoint: GanCheckpoint
    vocab: Vocabulary
    generator: Generator
    untrained: Generator
    text_encoder: MemoryAttendedTextEncoder
    image_encoder: ObjectAwareImageEncoder
    scoring: Scoring
    detector: Darknet
    category_ids: list[int]
    detector_weights: Path
    untrained_seed: int
    rprecision_text: MemoryAttendedTextEncoder | None = None
    rprecision_image: ObjectAwareImageEncoder | None = None
    rprecision_encoders: str = ""
    """R-precision's scorer when it is not the run's own encoders: every variant of an
    ablation is then measured by the same ruler (its own encoders would each grade their own
    generator's images, so the numbers could not be set side by side)."""

    @property
    def scorer_image(self) -> ObjectAwareImageEncoder:
        return self.rprecision_image or self.image_encoder


def load_eval_models(checkpoint: GanCheckpoint, files: EvalFiles, split: CocoSplit, seed: int,
                     device: str = "cpu") -> EvalModels:
    """The EMA and untrained generators, the run's frozen encoders, the scoring network and
    the SOA detector, checked against each other."""
    from cpgan.model.darknet import for_cpu_inference
    from cpgan.trainer.damsm import load_pretrained_encoders

    config = checkpoint.config
    vocab = load_vocab(files.artifacts, checkpoint)
    scoring = load_scoring(config.preset, files.classifier_weights, files.inception_weights,
                           final_size(config), files.fid_weights)
    detector, category_ids = load_soa_detector(files.detector_cfg, files.detector_weights, split)
    encoders = resolve(files.artifacts, checkpoint.encoders)
    memory = resolve(files.artifacts, checkpoint.memory) if checkpoint.memory else None
    text, image = load_pretrained_encoders(encoders, vocab, config, memory, detector,
                                           files.inception_weights, device)
    switches = checkpoint.switches
    if (text.uses_memory, image.use_objects) != (switches["use_memory"], switches["use_objects"]):
        raise CpganError(f"{encoders}: encoders with memory={text.uses_memory}, "
                         f"objects={image.use_objects} do not match the run's switches "
                         f"{switches} ({checkpoint.path})")
    if files.soa_detector_weights is None:
        soa_weights, soa_detector = files.detector_weights, copy.deepcopy(detector)
    else:
        soa_weights = files.soa_detector_weights
        soa_detector, category_ids = load_soa_detector(files.detector_cfg, soa_weights, split)
    models = EvalModels(checkpoint, vocab, load_generator(checkpoint).to(device),
                        untrained_generator(config, seed).to(device), text, image,
                        scoring.to(device), for_cpu_inference(soa_detector).to(device),
                        category_ids, soa_weights, seed,
                        rprecision_encoders=str(checkpoint.encoders))
    if files.rprecision_encoders is not None:
        models.rprecision_text, models.rprecision_image = load_pretrained_encoders(
            files.rprecision_encoders, vocab, config, files.artifacts / MEMORY_NAME, detector,
            files.inception_weights, device)
        models.rprecision_encoders = str(files.rprecision_encoders)
    return models


# --------------------------------------------------------------------------------------------
# Scoring images as they stream past


def global_features(encoder: ObjectAwareImageEncoder, images: Tensor) -> Tensor:
    """OAIE's global feature f (Eq. 10's global map of the backbone's pooled feature), the
    R-precision image side, without running the detector that only V_o needs."""
    return encoder.project_global(encoder.backbone(images).pooled)


@dataclass
class ScoredImages:
    """What is kept of one set of images: softmax, pool features, f, detected classes."""

    probs: list[Tensor] = field(default_factory=list)
    pool: list[Tensor] = field(default_factory=list)
    global_f: list[Tensor] = field(default_factory=list)
    detected: list[set[int]] = field(default_factory=list)

    @torch.no_grad()
    def add(self, models: EvalModels, images: Tensor) -> None:
        probs, pool = models.scoring.score(images)
        self.probs.append(probs)
        self.pool.append(pool)
        self.global_f.append(global_features(models.scorer_image, images).float().cpu())
        self.detected += detected_categories(models.detector, images, models.category_ids)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return torch.cat(self.probs), torch.cat(self.pool), torch.cat(self.global_f)


@dataclass
class _Collector:
    """The first few pairs' images, captions and attention maps, for the report's pictures."""

    limit: int
    attention_limit: int
    captions: list[str] = field(default_factory=list)
    images: dict[str, list[np.ndarray]] = field(
        default_factory=lambda: {block: [] for block in BLOCKS})
    attention: list[AttentionExample] = field(default_factory=list)

    def add(self, texts: list[str], words: list[list[str]], images: dict[str, Tensor],
            attention: list[Tensor]) -> None:
        take = min(self.limit - len(self.captions), len(texts))
        if take <= 0:
            return
        for block, batch in images.items():
            self.images[block] += list(to_uint8(batch[:take]))
        for k in range(take if attention else 0):  # a one-stage G has no F^att maps
            if len(self.attention) < self.attention_limit:
                count = len(words[k])
                self.attention.append(AttentionExample(
                    texts[k], words[k], to_uint8(images["generated"][k:k + 1])[0],
                    [maps[k, :count].float().cpu().numpy() for maps in attention]))
        self.captions += texts[:take]

    def showcase(self) -> Showcase:
        stacked = {block: np.stack(self.images[block]) for block in BLOCKS}
        return Showcase(self.captions, stacked["generated"], stacked["real"],
                        stacked["untrained"], self.attention)


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class EvalOptions:
    """How many pairs, in what batches, with which seed (noise, distractors, halves)."""

    num_images: int | None = None
    batch_size: int = 50
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    progress: bool = True
    showcase: int = SHOWCASE
    attention_examples: int = ATTENTION_EXAMPLES
    stage: int | None = None  # score this stage's images (None: the last stage's)


@dataclass
class Evaluation:
    """The report's blocks and the pictures' material."""

    report: dict[str, Any]
    showcase: Showcase
    memory_candidates: list[str]


@dataclass
class _Stream:
    """Everything accumulated over the val pairs."""

    scored: dict[str, ScoredImages] = field(
        default_factory=lambda: {block: ScoredImages() for block in BLOCKS})
    sentences: list[Tensor] = field(default_factory=list)
    expected: list[set[int]] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)


def _caption_texts(split: CocoSplit, image_ids: Tensor, caption_ids: Tensor) -> list[str]:
    texts = []
    for image_id, caption_id in zip(image_ids.tolist(), caption_ids.tolist()):
        texts.append(dict(split.captions(image_id))[caption_id])
    return texts


def _words(vocab: Vocabulary, captions: Tensor, lengths: Tensor) -> list[list[str]]:
    return [vocab.decode(row[:n].tolist()) for row, n in zip(captions.cpu(), lengths.tolist())]


def _stream(models: EvalModels, split: CocoSplit, options: EvalOptions,
            words_to_categories: dict[str, int]) -> tuple[_Stream, _Collector, int]:
    """One pass over the val pairs: generate, score all three sets, keep the features."""
    from cpgan.model.metrics import caption_categories
    from cpgan.trainer.data import TextImageDataset, batches, make_loader

    config = models.checkpoint.config
    dataset = TextImageDataset(split, models.vocab, config.data.max_caption_words,
                               [final_size(config)], augment=False, seed=config.seed,
                               limit=options.num_images)
    if len(dataset) < MIN_IMAGES:
        raise CpganError(f"{split.captions_file}: {len(dataset)} captioned images; evaluation "
                         f"needs at least {MIN_IMAGES}")
    stream = _Stream()
    collector = _Collector(options.showcase, options.attention_examples)
    loader = make_loader(dataset, options.batch_size, shuffle=False, num_workers=options.workers)
    truncation = config.gan.truncation
    with tqdm(total=len(dataset), desc="eval", unit="img", disable=not options.progress) as bar:
        for batch in batches(loader, stream.failures):
            batch = batch.to(options.device)
            text: EncodedText = encode_captions(models.text_encoder, batch.captions, batch.lengths)
            indices = batch.indices.tolist()
            out = generate(models.generator, text, options.seed, indices, truncation)
            untrained = generate(models.untrained, text, options.seed, indices, truncation)
            images = scored_images(out, untrained, batch.images[-1], options.stage)
            for block, batch_images in images.items():
                stream.scored[block].add(models, batch_images)
            texts = _caption_texts(split, batch.image_ids, batch.caption_ids)
            stream.sentences.append(_scored_sentences(models, text, batch).float().cpu())
            stream.expected += [caption_categories(t, words_to_categories) for t in texts]
            collector.add(texts, _words(models.vocab, batch.captions, batch.lengths), images,
                          out.attention)
            bar.update(len(batch) + len(batch.failed))
    return stream, collector, len(dataset)


def scored_images(out: GeneratorOutput, untrained: GeneratorOutput, real: Tensor,
                  stage: int | None) -> dict[str, Tensor]:
    """The images each block scores: the last stage's, or stage ``stage``'s, with every block
    seen at that stage's resolution and shown at the final size (the module docstring)."""
    if stage is None:
        return {"generated": out.images[-1], "real": real, "untrained": untrained.images[-1]}
    final, size = real.shape[-1], out.images[stage].shape[-1]
    shrunk = real if size == final else F.interpolate(
        real, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return {"generated": enlarge(out.images[stage], final), "real": enlarge(shrunk, final),
            "untrained": enlarge(untrained.images[stage], final)}


def check_stage(stage: int | None, stages: int, checkpoint: Path) -> None:
    """Refuse a stage the run's generator does not have."""
    if stage is not None and not 0 <= stage < stages:
        raise CpganError(f"{checkpoint}: --stage {stage}, but the generator has stages 0 to "
                         f"{stages - 1}")


def _scored_sentences(models: EvalModels, text: EncodedText, batch: Any) -> Tensor:
    """The sentence vectors R-precision ranks: the conditioning ones, unless another scorer."""
    if models.rprecision_text is None:
        return text.sentence
    return encode_captions(models.rprecision_text, batch.captions, batch.lengths).sentence


@dataclass(frozen=True)
class Protocol:
    """Sizes every block is scored with (fewer candidates and folds when fewer images)."""

    images: int
    seed: int

    @property
    def is_splits(self) -> int:
        return min(IS_SPLITS, self.images)

    @property
    def candidates(self) -> int:
        return min(CANDIDATES, self.images)

    @property
    def folds(self) -> int:
        return min(FOLDS, self.images)

    def describe(self) -> dict[str, Any]:
        return {"is_splits": self.is_splits,
                "r_precision": {"candidates": self.candidates, "folds": self.folds,
                                "in_batch_batch": self.candidates,
                                "full_protocol": self.candidates == CANDIDATES}}


def real_halves(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of ``range(count)`` drawn with ``seed``, for the real set's FID."""
    order = np.random.default_rng([seed, count]).permutation(count)
    return np.sort(order[:count // 2]), np.sort(order[count // 2:])


def _mean_std(value: tuple[float, float]) -> dict[str, float]:
    return {"mean": float(value[0]), "std": float(value[1])}


def _soa(detected: list[set[int]], expected: list[set[int]],
         names: dict[int, str]) -> dict[str, Any]:
    named = sum(1 for e in expected if e)
    if not named:
        return {"soa_c": None, "soa_i": None, "soa_no_object": None, "soa_unnamed": None,
                "soa_images": 0, "soa_per_class": {}}
    soa_c, soa_i = soa_scores(detected, expected)
    recall = soa_class_recall(detected, expected)
    return {"soa_c": soa_c, "soa_i": soa_i, "soa_no_object": soa_no_object(detected, expected),
            "soa_unnamed": soa_unnamed(detected, expected), "soa_images": named,
            "soa_per_class": {names.get(c, str(c)): hits / total
                              for c, (hits, total) in recall.items()}}


def block_metrics(scored: ScoredImages, fid_value: float, sentences: Tensor,
                  expected: list[set[int]], protocol: Protocol,
                  names: dict[int, str]) -> dict[str, Any]:
    """IS, FID (given), both R-precisions and SOA of one set of images."""
    probs, _, global_f = scored.tensors()
    return {
        "images": int(probs.shape[0]),
        "inception_score": _mean_std(inception_score(probs, protocol.is_splits)),
        "fid": float(fid_value),
        "r_precision": _mean_std(r_precision(global_f, sentences, protocol.candidates,
                                             protocol.folds, protocol.seed)),
        "r_precision_in_batch": _mean_std(r_precision_in_batch(global_f, sentences,
                                                               protocol.candidates,
                                                               protocol.seed)),
        **_soa(scored.detected, expected, names),
    }


def _metrics(stream: _Stream, protocol: Protocol, names: dict[int, str]) -> dict[str, Any]:
    sentences = torch.cat(stream.sentences)
    real_pool = stream.scored["real"].tensors()[1]
    half_a, half_b = real_halves(real_pool.shape[0], protocol.seed)
    fids = {"generated": fid(stream.scored["generated"].tensors()[1], real_pool),
            "untrained": fid(stream.scored["untrained"].tensors()[1], real_pool),
            "real": fid(real_pool[torch.from_numpy(half_a)], real_pool[torch.from_numpy(half_b)])}
    blocks = {block: block_metrics(stream.scored[block], fids[block], sentences, stream.expected,
                                   protocol, names) for block in BLOCKS}
    blocks["real"]["fid_halves"] = [len(half_a), len(half_b)]
    return blocks


def evaluate(models: EvalModels, split: CocoSplit, options: EvalOptions) -> Evaluation:
    """Generate for the val pairs, score the three sets, return the report's blocks."""
    from cpgan.pipeline.categories import category_words

    start = time.perf_counter()
    check_stage(options.stage, models.checkpoint.config.gan.stages, models.checkpoint.path)
    words = category_words(split)
    stream, collector, requested = _stream(models, split, options, words)
    count = len(stream.expected)
    if count < MIN_IMAGES:
        raise CpganError(f"{split.folder}: only {count} val images could be decoded; "
                         f"evaluation needs at least {MIN_IMAGES}")
    protocol = Protocol(count, options.seed)
    report = _metrics(stream, protocol, split.categories())
    report["config"] = _config_block(models, split, options, protocol, requested, stream,
                                     time.perf_counter() - start)
    return Evaluation(report, collector.showcase(),
                      memory_candidates(collector.captions, words, models.vocab))


def memory_candidates(captions: Sequence[str], category_words: dict[str, int],
                      vocab: Vocabulary) -> list[str]:
    """Words of the example captions worth showing the memory of: those naming a detector
    class first, then the rest from the rarest in the train captions (function words such as
    "a" and "the" are the most frequent, so they come last)."""
    from cpgan.pipeline.text import tokenize

    tokens = list(dict.fromkeys(t for caption in captions for t in tokenize(caption)))
    named = [t for t in tokens if t in category_words]
    counts = {token: count for token, count in zip(vocab.tokens, vocab.counts)}
    others = sorted((t for t in tokens if t not in category_words and t in counts),
                    key=lambda t: (counts[t], t))
    return named + others


def _config_block(models: EvalModels, split: CocoSplit, options: EvalOptions,
                  protocol: Protocol, requested: int, stream: _Stream,
                  seconds: float) -> dict[str, Any]:
    checkpoint = models.checkpoint
    return {
        "checkpoint": {"path": str(checkpoint.path), **checkpoint.summary()},
        "split": split.split, "num_images": protocol.images, "requested_images": requested,
        "failed_images": len(stream.failures), "seed": options.seed,
        "caption_seed": checkpoint.config.seed, "batch_size": options.batch_size,
        "device": options.device, "image_size": final_size(checkpoint.config),
        "stage": _stage_block(checkpoint.config, options.stage),
        "truncation": checkpoint.config.gan.truncation,
        "generator": "generator_ema, eval mode, conditioning augmentation sampled",
        "untrained_seed": models.untrained_seed,
        "scoring_network": {"kind": models.scoring.kind, "weights": str(models.scoring.weights)},
        "fid_network": models.scoring.fid_features,
        "fid_real": "a seeded random half of the real images against the other half",
        "r_precision_encoders": models.rprecision_encoders,
        "soa_detector": {"weights": str(models.detector_weights),
                         "classes": len(models.category_ids), "objectness": SOA_OBJECTNESS},
        **protocol.describe(), "preset": checkpoint.config.preset,
        "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
    }


def _stage_block(config: Config, stage: int | None) -> dict[str, int]:
    """Which stage's images were scored, and at what size they were drawn."""
    sizes = multi_resolution_sizes(config.gan.base_size, config.gan.stages)
    index = len(sizes) - 1 if stage is None else stage
    return {"index": index, "size": sizes[index]}


def summary_line(report: dict[str, Any]) -> str:
    """'generated IS 3.21 ± 0.10, FID 41.2, R-prec 0.412, SOA-C 0.55 | real ... | untrained
    ... | encoders damsm R-prec 0.456, damsm-no-memory R-prec 0.494'"""
    parts = []
    for block in BLOCKS:
        b = report[block]
        soa = "n/a" if b["soa_c"] is None else f"{b['soa_c']:.3f}"
        parts.append(f"{block} IS {b['inception_score']['mean']:.2f}, FID {b['fid']:.1f}, "
                     f"R-prec {b['r_precision']['mean']:.3f}, SOA-C {soa}")
    encoders = [f"{Path(row['model']).stem} R-prec {row['r_precision']['mean']:.3f}"
                for row in report.get("encoders", []) if "error" not in row]
    if encoders:
        parts.append("encoders " + ", ".join(encoders))
    return " | ".join(parts)

