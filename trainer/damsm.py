"""DAMSM pretraining of the text encoder (MATE, Eq. 8-9) and image encoder (OAIE, Eq. 10).

Before the GAN trains, CPGAN pretrains its two encoders on real (image, caption) pairs of the
train split with the DAMSM loss of supplementary §6.3 (Eq. 14-25) so that TISCL (Eq. 6) can
later judge generated images; the recipe is AttnGAN's ``pretrain_DAMSM.py``:

* each step: a batch of real images with one caption each (:mod:`cpgan.trainer.data`, AttnGAN's
  augmentation; ``encoder.random_crop = false`` keeps only its flip), W and s from MATE, V
  and f from OAIE, L = L^w + L^s (Eq. 25), both directions. With ``encoder.captions_per_image``
  K > 1 (the toy preset; AttnGAN has 1) each image brings K - 1 more of its own captions
  (:func:`with_other_captions`), all positives, none a negative of its own image
  (``damsm_loss(captions_per_image=K)``): the text side sees K times the captions per step for
  the same image work. With ``encoder.swapped_negatives`` N > 0 (the toy preset: 1, colour
  words only; AttnGAN and the paper preset: 0) each image's first caption also brings N copies
  with one object or colour word swapped (:mod:`cpgan.trainer.negatives`), negatives of that
  image alone in the sentence-level loss. With ``encoder.adversarial_epsilon`` > 0 (the toy
  preset; AttnGAN and the paper preset: 0) the images are first moved within that L-infinity
  radius to raise the step's loss (:mod:`cpgan.trainer.adversarial`), so that the encoders'
  gradient, which TISCL hands the generator, follows shapes rather than pixel noise;
* Adam with betas (0.5, 0.999) on every trainable parameter (MATE, the projections M_o, M_e and
  the global map, and the toy preset's backbone, which starts from the fitted scoring
  classifier; Inception and the detector stay frozen), the
  gradient norm of the text encoder clipped to ``grad_clip`` (AttnGAN's RNN_GRAD_CLIP 0.25);
* AttnGAN's learning-rate decay: x``encoder.lr_decay`` per epoch (AttnGAN 0.98) until a tenth
  of the initial rate;
* with ``encoder.average_decay`` > 0 (the toy preset; AttnGAN has none), an exponential moving
  average of both encoders' weights (:mod:`cpgan.trainer.averaging`), updated after every
  step: the encoders evaluated after each epoch and published are the average.

After every epoch: the validation DAMSM loss on fixed (image, caption) pairs of the val split
and R-precision with the image's global feature f against sentence vectors s (DM-GAN's 1 true vs
99 random captions, 10 folds, and the CPGAN release's in-batch variant), and a checkpoint
(``models/<name>.ckpt.pt``: both encoders, optimiser, epoch, the torch RNG, the metrics
history and the images that failed to decode), written atomically, so ``resume=True``
continues exactly: every data draw is a function of (seed, epoch, index) and the RNG that
drives dropout is restored.

The result, ``models/<name>.pt``, is a dict loadable with ``torch.load(weights_only=True)``:
``{"format", "text_encoder", "image_encoder", "config", "metrics"}``. The text encoder's state
leaves out its frozen memory buffer and the image encoder's leaves out the frozen detector and
Inception (they come from memory.h5 and their own weight files); ``config`` records the sizes,
the switches and digests of those frozen parts, and :func:`load_pretrained_encoders` refuses a
file whose parts do not match. ``<name>`` is ``damsm``, with ``-no-memory`` / ``-no-oaie``
appended for the ablations (plain AttnGAN text encoder / no object features V_o), so an
ablation never overwrites the main encoders.

V_o cache. Where the training views repeat (no random crop) the frozen detector runs once
per view before the first epoch instead of once per step, and once per val image
(:mod:`cpgan.trainer.region_cache`). The detections equal the per-step ones up to rounding,
which training then amplifies like any change of summation order: on the demo's inputs the
stage took 158 s against 198 s without the cache and ended at val R-precision 0.895 against
0.894 (``bench/region_cache.py``, one run).

Region features. OAIE's V_o uses the detector with the preset's feature layer, region count,
score threshold and NMS IoU. RoIAlign samples each box on ``ceil(map side / 2)`` bins of 2 x 2
points (:func:`roi_bins`): 7 bins for YOLOv3's 13 x 13 map at 416 px, the project's default,
and 2 for the toy detector's 4 x 4 map, where 7 bins would sample each cell a dozen times over
for a 0.2 % different mean at eight times the cost.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from cpgan import layout
from cpgan.config import Config, DetectorConfig, EncoderConfig, config_defaults, fill_new_keys
from cpgan.errors import CpganError
from cpgan.model.darknet import Darknet
from cpgan.model.image_encoder import (
    ClassifierBackbone,
    InceptionBackbone,
    ObjectAwareImageEncoder,
    ToyBackbone,
    load_inception_weights,
)
from cpgan.model.losses import damsm_loss
from cpgan.model.metrics import CANDIDATES, FOLDS, r_precision, r_precision_in_batch
from cpgan.model.text_encoder import SENTENCE_POOLING, MemoryAttendedTextEncoder
from cpgan.model.yolo import RegionOutput, YoloRegionExtractor
from cpgan.pipeline.artifacts import atomic_write
from cpgan.pipeline.categories import swappable_words
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.text import Vocabulary
from cpgan.torch_file import load_torch_file, refuse_nonfinite
from cpgan.trainer.adversarial import fgsm_views
from cpgan.trainer.averaging import WeightAverage
from cpgan.trainer.data import Batch, TextImageDataset, batches, make_loader, pad_caption
from cpgan.trainer.negatives import WordSwaps, swapped_captions, words_of_kind
from cpgan.trainer.region_cache import RegionCache, cache_bytes
from cpgan.trainer.resume import (
    count_entry,
    failed_images,
    finite_numbers,
    is_finite_number,
    load_epoch_checkpoint,
    load_optimizer_state,
    refusing_unfit_checkpoint,
    rng_state,
    set_rng_state,
)

TRAIN_SPLIT = "train2014"
VAL_SPLIT = "val2014"
MODEL_STEM = layout.DAMSM_STEM  # in cpgan.layout: read without torch
FORMAT = 1
ADAM_BETAS = (0.5, 0.999)       # AttnGAN's DAMSM optimiser
LR_FLOOR = 0.1                  # AttnGAN: lr *= decay per epoch while lr > ENCODER_LR / 10
AVERAGE_RAMP_EPOCHS = 0.5       # the weight average's decay ramps up over about half an epoch
ROI_SAMPLES_PER_BIN = 2         # region_features' sampling_ratio
REGION_CACHE_LIMIT = 2 * 1024**3  # bytes a V_o cache may take (toy: 300 MB for train)
BACKBONES = ("classifier", "toy", "inception")
_SIZE_KEYS = ("vocab_size", "word_embed_dim", "text_dim", "image_size", "backbone",
              "backbone_width", "use_memory", "use_objects")
_REGION_KEYS = ("feature_layer", "num_regions", "score_threshold", "nms_iou", "roi_bins")


# --------------------------------------------------------------------------------------------
# Names: the model files' are in cpgan.layout (the up-to-date checks read them without torch),
# the training checkpoint's is this module's

model_name = layout.damsm_name
model_path = layout.damsm_path
provenance_path = layout.damsm_record
VARIANTS = layout.DAMSM_VARIANTS
variant_files = layout.damsm_variant_files


def checkpoint_path(models_dir: Path, use_memory: bool = True, use_objects: bool = True) -> Path:
    return Path(models_dir) / f"{model_name(use_memory, use_objects)}.ckpt.pt"


# --------------------------------------------------------------------------------------------
# Building the encoders


def tensor_digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 over named tensors (names, dtypes, shapes, bytes): identifies a frozen part."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    return tensor_digest(sorted(module.state_dict().items()))


def roi_bins(input_size: int, stride: int) -> int:
    """RoIAlign bins per side so that the 2 x 2 samples of each bin cover the feature map about
    once per cell: ``ceil((input / stride) / 2)``, 7 for YOLOv3 at 416 px."""
    return max(1, math.ceil(input_size / stride / ROI_SAMPLES_PER_BIN))


def build_region_extractor(darknet: Darknet, detector: DetectorConfig | dict[str, Any],
                           ) -> YoloRegionExtractor:
    """The frozen V_o extractor of §3.3 from a loaded detector and the preset's settings."""
    settings = detector if isinstance(detector, dict) else region_settings(darknet, detector)
    try:
        extractor = YoloRegionExtractor(
            darknet, settings["feature_layer"], settings["num_regions"],
            settings["score_threshold"], settings["nms_iou"], output_size=settings["roi_bins"])
    except ValueError as exc:
        raise CpganError(f"{darknet.source}: {exc}") from None
    return extractor.eval().requires_grad_(False)


def region_settings(darknet: Darknet, detector: DetectorConfig) -> dict[str, Any]:
    """What decides V_o besides the detector weights, as recorded in the encoder file."""
    info = darknet.layer_info
    if not 0 <= detector.feature_layer < len(info) or info[detector.feature_layer].kind == "yolo":
        raise CpganError(f"{darknet.source}: layer {detector.feature_layer} is not a feature "
                         f"layer (detector.feature_layer in the config)")
    stride = info[detector.feature_layer].stride
    return {"feature_layer": detector.feature_layer, "num_regions": detector.num_regions,
            "score_threshold": detector.score_threshold, "nms_iou": detector.nms_iou,
            "roi_bins": roi_bins(darknet.input_size, stride),
            "feature_dim": info[detector.feature_layer].channels}


def build_text_encoder(vocab_size: int, config: EncoderConfig,
                       memory: Tensor | None) -> MemoryAttendedTextEncoder:
    """MATE at the preset's sizes; ``memory=None`` is the plain AttnGAN encoder."""
    try:
        return MemoryAttendedTextEncoder(vocab_size, config.word_embed_dim, config.text_dim,
                                         memory=memory, dropout=config.text_dropout,
                                         sentence=config.sentence_pooling)
    except ValueError as exc:
        raise CpganError(f"text encoder: {exc}") from None


def build_image_encoder(config: EncoderConfig, extractor: YoloRegionExtractor | None,
                        inception_weights: Path | None = None,
                        classifier_weights: Path | None = None) -> ObjectAwareImageEncoder:
    """OAIE with the preset's backbone; ``extractor=None`` drops V_o (``--no-oaie``).

    The classifier backbone starts from ``classifier_weights`` (``models/classifier.pt``) when
    given; without it the trunk is left as initialised, for loading a trained encoder file.
    """
    if config.backbone == "classifier":
        try:
            backbone = ClassifierBackbone(config.backbone_width, config.image_size)
        except ValueError as exc:
            raise CpganError(f"encoder.image_size / backbone_width: {exc}") from None
        if classifier_weights is not None:
            _start_from_classifier(backbone, classifier_weights)
    elif config.backbone == "toy":
        try:
            backbone = ToyBackbone(config.image_size, config.backbone_width)
        except ValueError as exc:
            raise CpganError(f"encoder.image_size / backbone_width: {exc}") from None
    elif config.backbone == "inception":
        if inception_weights is None:
            raise CpganError("the Inception-v3 backbone needs its ImageNet weights: pass "
                             "--inception-weights FILE (torchvision's inception_v3_google-"
                             "0cc3c7bd.pth)")
        backbone = InceptionBackbone()
        load_inception_weights(backbone.net, inception_weights)
    else:
        raise CpganError(f"encoder.backbone is {config.backbone!r}; choose from "
                         f"{', '.join(BACKBONES)}")
    return ObjectAwareImageEncoder(backbone, config.text_dim, extractor,
                                   use_objects=extractor is not None)


def _start_from_classifier(backbone: ClassifierBackbone, path: Path) -> None:
    from cpgan.trainer.classifier import load_classifier

    classifier = load_classifier(path, image_size=backbone.image_size)
    try:
        backbone.start_from(classifier)
    except ValueError as exc:
        raise CpganError(f"{path}: {exc} (encoder.backbone_width)") from None


def encoder_record(vocab_size: int, config: EncoderConfig, text: MemoryAttendedTextEncoder,
                   image: ObjectAwareImageEncoder, regions: dict[str, Any] | None) -> dict[str, Any]:
    """The ``config`` entry of the encoder file: sizes, switches, digests of frozen parts."""
    return {
        "vocab_size": vocab_size, "word_embed_dim": config.word_embed_dim,
        "text_dim": config.text_dim, "image_size": config.image_size,
        "backbone": config.backbone, "backbone_width": config.backbone_width,
        "sentence_pooling": text.sentence, "use_memory": text.uses_memory,
        "use_objects": image.use_objects,
        "memory_shape": list(text.memory.shape) if text.uses_memory else None,
        "memory_sha256": tensor_digest([("memory", text.memory)]) if text.uses_memory else None,
        "detector_sha256": module_digest(image.detector.darknet) if image.detector else None,
        "regions": regions,
        "backbone_sha256": module_digest(image.backbone) if image.backbone.frozen else None,
        "gamma": [config.gamma1, config.gamma2, config.gamma3],
    }


def text_state(text: MemoryAttendedTextEncoder) -> dict[str, Tensor]:
    """MATE's state without the frozen memory (it lives in memory.h5)."""
    return {k: v.detach().to("cpu").clone() for k, v in text.state_dict().items() if k != "memory"}


def encoder_states(text: MemoryAttendedTextEncoder,
                   image: ObjectAwareImageEncoder) -> dict[str, dict[str, Tensor]]:
    """Both encoders' learned states (CPU copies), as checkpoints and ``models/damsm*.pt``
    store them: no memory, no frozen detector or Inception."""
    return {"text_encoder": text_state(text),
            "image_encoder": {k: v.detach().to("cpu").clone()
                              for k, v in image.learned_state_dict().items()}}


def load_text_state(text: MemoryAttendedTextEncoder, state: dict[str, Tensor]) -> None:
    full = dict(state)
    if text.uses_memory:
        full["memory"] = text.memory
    text.load_state_dict(full)


# --------------------------------------------------------------------------------------------
# Loading pretrained encoders (the GAN's TISCL)


def read_encoder_file(path: Path) -> dict[str, Any]:
    """A DAMSM encoder file's dict, its format, sizes and two state dicts checked."""
    data = load_torch_file(path, "DAMSM encoder file", "run 'cpgan-train --stage damsm'")
    if not isinstance(data, dict) or type(data.get("format")) is not int or \
            data["format"] != FORMAT:
        raise CpganError(f"{path}: not a DAMSM encoder file (format {FORMAT} expected)")
    record = data.get("config")
    if not isinstance(record, dict) or any(k not in record for k in _SIZE_KEYS):
        raise CpganError(f"{path}: its 'config' lacks the encoder sizes")
    for key in _SIZE_KEYS:
        value = record[key]
        if key == "backbone":
            fits = isinstance(value, str) and value in BACKBONES
        elif key.startswith("use_"):
            fits = type(value) is bool
        else:
            fits = type(value) is int and value > 0
        if not fits:
            raise CpganError(f"{path}: its 'config' has an invalid {key} ({value!r})")
    regions = record.get("regions")
    if (regions is not None and not isinstance(regions, dict)) or \
            (record["use_objects"] and any(k not in (regions or {}) for k in _REGION_KEYS)):
        raise CpganError(f"{path}: its 'config' has no usable region settings ({regions!r})")
    for part in ("text_encoder", "image_encoder"):
        state = data.get(part)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CpganError(f"{path}: '{part}' is not a state dict of tensors")
        refuse_nonfinite(path, state, f"'{part}'")
    return data


def _check_against_config(path: Path, record: dict[str, Any], config: Config) -> None:
    """A file trained with other sizes than ``config`` asks for is refused, naming the first."""
    encoder = config.encoder
    wanted = {"word_embed_dim": encoder.word_embed_dim, "text_dim": encoder.text_dim,
              "image_size": encoder.image_size, "backbone": encoder.backbone,
              "sentence_pooling": encoder.sentence_pooling}
    if encoder.backbone != "inception":
        wanted["backbone_width"] = encoder.backbone_width
    for key, value in wanted.items():
        recorded = _recorded(record, key)
        if recorded != value:
            raise CpganError(f"{path}: encoders were trained with encoder.{key} = "
                             f"{recorded!r}, the config has {value!r} (retrain with "
                             f"'cpgan-train --stage damsm' or use the matching preset)")
    regions = record.get("regions")
    if regions is not None:
        for key in ("feature_layer", "num_regions"):
            if regions.get(key) != getattr(config.detector, key):
                raise CpganError(f"{path}: encoders were trained with detector.{key} = "
                                 f"{regions.get(key)!r}, the config has "
                                 f"{getattr(config.detector, key)!r}")


def _recorded(record: dict[str, Any], key: str) -> Any:
    """A recorded encoder setting; files from before ``sentence_pooling`` existed used "last"."""
    return record.get(key, "last") if key == "sentence_pooling" else record[key]


def recorded_memory(path: Path, record: dict[str, Any], vocab: Vocabulary,
                    memory_path: str | Path | None) -> Tensor | None:
    """The memory bank the encoders of ``path`` were trained with, or None without memory.

    ``memory_path`` is required when the encoders use memory; its words are checked against
    ``vocab`` and its values against the digest the encoder file recorded.
    """
    from cpgan.pipeline.memory import load_memory

    if not record["use_memory"]:
        return None
    if memory_path is None:
        raise CpganError(f"{path}: these encoders use the memory bank; pass its memory.h5")
    memory = load_memory(memory_path, vocab).memory
    if tensor_digest([("memory", memory)]) != record.get("memory_sha256"):
        raise CpganError(f"{path}: encoders were trained with another memory bank than "
                         f"{memory_path}")
    return memory


def load_pretrained_encoders(
    path: str | Path,
    vocab: Vocabulary,
    config: Config | None = None,
    memory_path: str | Path | None = None,
    detector: Darknet | None = None,
    inception_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[MemoryAttendedTextEncoder, ObjectAwareImageEncoder]:
    """The pretrained (MATE, OAIE) of ``models/damsm*.pt``, frozen and in eval mode.

    The file is read with ``weights_only=True`` (a pickled object is refused, never run) and
    checked against everything it was trained with: the vocabulary size, ``config``'s sizes
    when given, the memory bank (``memory_path``, required when the encoders use memory; its
    words are checked against ``vocab`` and its values against the recorded digest), the
    detector (required with objects, digest checked) and the Inception weights (paper
    backbone). Any mismatch is a one-line :class:`CpganError` naming the file.
    """
    path = Path(path)
    data = read_encoder_file(path)
    record = data["config"]
    if config is not None:
        _check_against_config(path, record, config)
    if record["vocab_size"] != len(vocab):
        raise CpganError(f"{path}: encoders were trained for {record['vocab_size']} words, the "
                         f"vocabulary has {len(vocab)}")
    memory = recorded_memory(path, record, vocab, memory_path)
    extractor = None
    if record["use_objects"]:
        if detector is None:
            raise CpganError(f"{path}: these encoders use object features; a detector is needed")
        if module_digest(detector) != record.get("detector_sha256"):
            raise CpganError(f"{path}: encoders were trained with another detector "
                             f"({detector.source} has other weights)")
        extractor = build_region_extractor(detector, record["regions"])
    pooling = _recorded(record, "sentence_pooling")
    if pooling not in SENTENCE_POOLING:
        raise CpganError(f"{path}: unknown sentence pooling {pooling!r}")
    sizes = EncoderConfig(word_embed_dim=record["word_embed_dim"], text_dim=record["text_dim"],
                          image_size=record["image_size"], backbone=record["backbone"],
                          backbone_width=record["backbone_width"], sentence_pooling=pooling)
    try:  # a recorded size the models refuse; Inception's errors name its weights file
        text = build_text_encoder(record["vocab_size"], sizes, memory)
        image = None if sizes.backbone == "inception" else build_image_encoder(sizes, extractor)
    except CpganError as exc:
        raise CpganError(f"{path}: {exc}") from None
    if image is None:
        image = build_image_encoder(sizes, extractor,
                                    Path(inception_weights) if inception_weights else None)
    if image.backbone.frozen and module_digest(image.backbone) != record.get("backbone_sha256"):
        raise CpganError(f"{path}: encoders were trained with other Inception-v3 weights "
                         f"than {inception_weights}")
    try:
        load_text_state(text, data["text_encoder"])
        image.load_learned_state_dict(data["image_encoder"])
    except (RuntimeError, ValueError) as exc:
        raise CpganError(f"{path}: weights do not fit the recorded sizes "
                         f"({str(exc).strip().splitlines()[0]})") from None
    return _frozen(text, device), _frozen(image, device)


def _frozen(module: torch.nn.Module, device: str | torch.device) -> Any:
    return module.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Training state


@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly; saved after every epoch."""

    text: MemoryAttendedTextEncoder
    image: ObjectAwareImageEncoder
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    failed_indices: set[int] = field(default_factory=set)
    average: WeightAverage | None = None  # of encoders(), when encoder.average_decay > 0

    def encoders(self) -> torch.nn.ModuleDict:
        """The trained pair as one module: what the weight average follows."""
        return torch.nn.ModuleDict({"text": self.text, "image": self.image})

    def learned_keys(self) -> set[str]:
        """The entries of :meth:`encoders`' state that training changes: no memory, no frozen
        detector or Inception (what :func:`encoder_states` stores)."""
        states = encoder_states(self.text, self.image)
        return ({f"text.{k}" for k in states["text_encoder"]}
                | {f"image.{k}" for k in states["image_encoder"]})

    def published(self) -> tuple[MemoryAttendedTextEncoder, ObjectAwareImageEncoder]:
        """The encoders to evaluate and publish: the weight average when there is one."""
        if self.average is None:
            return self.text, self.image
        return self.average.model["text"], self.average.model["image"]

    def to_checkpoint(self, settings: dict[str, Any]) -> dict[str, Any]:
        average = None
        if self.average is not None:
            text, image = self.published()
            average = {**encoder_states(text, image), "updates": self.average.updates}
        return {
            **encoder_states(self.text, self.image), "average": average,
            "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
            "history": [dict(h) for h in self.history], "rng": rng_state(),
            "failed_ids": list(self.failed), "failed_reasons": list(self.failed.values()),
            "failed_indices": sorted(self.failed_indices), "settings": settings,
        }

    def restore(self, state: dict[str, Any]) -> None:
        load_text_state(self.text, state["text_encoder"])
        self.image.load_learned_state_dict(state["image_encoder"])
        if (state["average"] is None) != (self.average is None):
            raise ValueError("weight averaging was switched on or off since it was written")
        if self.average is not None:
            text, image = self.published()
            load_text_state(text, state["average"]["text_encoder"])
            image.load_learned_state_dict(state["average"]["image_encoder"])
            self.average.updates = count_entry(state["average"], "updates")
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.epoch = int(state["epoch"])
        self.history = _history(state["history"], self.epoch)
        self.failed = failed_images(state)
        indices = state["failed_indices"]
        if not isinstance(indices, list) or not all(type(i) is int and i >= 0 for i in indices):
            raise ValueError("'failed_indices' must be a list of dataset positions")
        self.failed_indices = set(indices)
        set_rng_state(state["rng"])


def _history(rows: Any, epochs: int) -> list[dict[str, float]]:
    """A checkpoint's per-epoch metrics: one dict of finite numbers per finished epoch (the
    last one becomes the published record's metrics when the run is already done)."""
    if not isinstance(rows, list) or len(rows) != epochs or not all(
            isinstance(row, dict) and all(isinstance(k, str) for k in row) for row in rows):
        raise ValueError(f"'history' must hold one dict of metrics per epoch ({epochs})")
    return [dict(zip(row, finite_numbers(list(row.values()), "'history' metrics")))
            for row in rows]


def _load_checkpoint(path: Path, settings: dict[str, Any], total_epochs: int) -> dict[str, Any]:
    """The resume checkpoint, its settings read with the encoder keys it predates at their
    defaults."""
    return load_epoch_checkpoint(
        path, "DAMSM checkpoint", settings, total_epochs,
        lambda stored: fill_new_keys(stored, settings, config_defaults("encoder")))


def _save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


def epoch_lr(base_lr: float, epoch: int, decay: float = 0.98) -> float:
    """AttnGAN's schedule: x``decay`` (AttnGAN 0.98) per finished epoch, stopping once below a
    tenth; ``decay`` 1 keeps the rate constant."""
    if decay >= 1.0:
        return base_lr
    decays = math.ceil(math.log(LR_FLOOR) / math.log(decay))
    return base_lr * decay ** min(epoch, decays)


# --------------------------------------------------------------------------------------------
# One epoch, and evaluation


def with_other_captions(batch: Batch, dataset: TextImageDataset,
                        count: int) -> tuple[Tensor, Tensor]:
    """The batch's captions followed by ``count - 1`` more of each of its images
    (:meth:`TextImageDataset.other_captions`): ``[count * B, T]`` ids and ``[count * B]``
    lengths, row ``k * B + i`` the k-th caption of image i, the layout of
    ``damsm_loss(captions_per_image=count)``."""
    flipped = batch.flipped if batch.flipped is not None else [False] * len(batch)
    extra = [dataset.other_captions(int(index), int(caption_id), count - 1, bool(flip))
             for index, caption_id, flip in zip(batch.indices, batch.caption_ids, flipped)]
    rows, lengths = [batch.captions], [batch.lengths]
    for k in range(count - 1):
        ids = [captions[k] for captions in extra]
        rows.append(torch.stack([pad_caption(i, dataset.max_words) for i in ids]))
        lengths.append(torch.tensor([len(i) for i in ids]))
    device = batch.captions.device
    return torch.cat([r.to(device) for r in rows]), torch.cat([n.to(device) for n in lengths])


@dataclass
class _EncodedCaptions:
    """The text side of a DAMSM step: MATE's W and s for the batch's captions, the true ones
    (``per_image`` of each image, one block per caption) first, then the swapped false ones of
    ``false_mask``."""

    words: Tensor
    lengths: Tensor
    sentence: Tensor
    per_image: int
    false_mask: Tensor | None

    def detached(self) -> "_EncodedCaptions":
        return dataclasses.replace(self, words=self.words.detach(),
                                   sentence=self.sentence.detach())


def _encode_captions(text: MemoryAttendedTextEncoder, batch: Batch, config: EncoderConfig,
                     captions: TextImageDataset | None = None,
                     swaps: WordSwaps | None = None) -> _EncodedCaptions:
    """With ``captions`` (the training set) each image brings ``config.captions_per_image`` of
    its captions, all positives, and with ``swaps`` too, ``config.swapped_negatives`` false
    versions of its first caption."""
    per_image = config.captions_per_image if captions is not None else 1
    if per_image > 1:
        tokens, lengths = with_other_captions(batch, captions, per_image)
    else:
        tokens, lengths = batch.captions, batch.lengths
    negatives = config.swapped_negatives if captions is not None and swaps else 0
    false_mask = None
    if negatives:
        false, false_lengths, false_mask = swapped_captions(
            batch.captions, batch.lengths, batch.indices, swaps, negatives, captions.seed,
            captions.epoch)
        tokens, lengths = torch.cat([tokens, false]), torch.cat([lengths, false_lengths])
    words, sentence = text(tokens, lengths)
    return _EncodedCaptions(words, lengths, sentence, per_image, false_mask)


def _image_loss(image: ObjectAwareImageEncoder, images: Tensor,
                detections: RegionOutput | None, text: _EncodedCaptions,
                config: EncoderConfig) -> tuple[Tensor, Tensor]:
    """L^w + L^s (Eq. 25) of ``images`` against ``text``, and f."""
    rows = text.per_image * images.shape[0]
    has_false = text.false_mask is not None
    encoded = image(images, detections)
    loss, _ = damsm_loss(text.words[:rows], text.lengths[:rows], text.sentence[:rows],
                         encoded.regions, encoded.global_feature,
                         config.gamma1, config.gamma2, config.gamma3,
                         region_mask=encoded.region_mask, captions_per_image=text.per_image,
                         negative_sentences=text.sentence[rows:] if has_false else None,
                         negative_mask=text.false_mask)
    return loss, encoded.global_feature


def _loss(text: MemoryAttendedTextEncoder, image: ObjectAwareImageEncoder, batch: Batch,
          config: EncoderConfig, regions: RegionCache | None = None,
          captions: TextImageDataset | None = None,
          swaps: WordSwaps | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """L^w + L^s (Eq. 25) of a batch, with f and s for R-precision; V_o's detections come from
    ``regions`` when it holds the batch's views (:func:`_encode_captions` for ``captions``
    and ``swaps``). With ``config.adversarial_epsilon`` > 0 and ``captions`` (training) the
    images are replaced by their adversarial views (:mod:`cpgan.trainer.adversarial`); V_o
    stays the real image's, cached or not, so the views move only what the backbone sees."""
    encoded_text = _encode_captions(text, batch, config, captions, swaps)
    images = batch.images[-1]
    detections = (regions.lookup(batch.indices, batch.flipped, images.device)
                  if regions is not None else None)
    if captions is not None and config.adversarial_epsilon > 0:
        if detections is None and image.detector is not None:
            with torch.no_grad():
                detections = image.detect(images)
        attack_text = encoded_text.detached()
        images = fgsm_views(
            images, lambda views: _image_loss(image, views, detections, attack_text, config)[0],
            config.adversarial_epsilon)
    loss, global_feature = _image_loss(image, images, detections, encoded_text, config)
    return loss, global_feature, encoded_text.sentence[:len(batch)]


def _train_epoch(state: TrainState, loader: Iterable[Batch], config: EncoderConfig,
                 device: str, bar: tqdm, regions: RegionCache | None = None,
                 captions: TextImageDataset | None = None,
                 swaps: WordSwaps | None = None) -> float:
    """One pass; returns the mean training loss over the epoch's batches. ``captions`` is the
    training set, where the extra captions of ``config.captions_per_image`` come from, and
    ``swaps`` what makes the false ones of ``config.swapped_negatives``."""
    state.text.train()
    state.image.train()
    pair = state.encoders()
    total, steps, running = 0.0, 0, None
    for batch in batches(loader, state.failed, state.failed_indices):
        loss, _, _ = _loss(state.text, state.image, batch.to(device), config, regions, captions,
                           swaps)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.text.parameters(), config.grad_clip)
        state.optimizer.step()
        if state.average is not None:
            state.average.update(pair)
        value = loss.detach().item()
        total, steps = total + value, steps + 1
        running = value if running is None else 0.9 * running + 0.1 * value
        bar.set_postfix(loss=f"{running:.3f}", refresh=False)
        bar.update(len(batch))
    return total / max(steps, 1)


@torch.no_grad()
def evaluate(text: MemoryAttendedTextEncoder, image: ObjectAwareImageEncoder,
             dataset: TextImageDataset, config: EncoderConfig, batch_size: int, seed: int,
             device: str = "cpu", num_workers: int = 0,
             regions: RegionCache | None = None) -> dict[str, float]:
    """Val DAMSM loss (fixed pairs, fixed batches) and R-precision of f against s.

    R-precision ranks each image's own caption among ``min(100, N)`` candidates (DM-GAN,
    10 folds) and, for the CPGAN release's variant, among the captions of shuffled batches of
    the same size; both need at least that many decoded images.
    """
    text.eval()
    image.eval()
    losses, images, sentences, failed = [], [], [], {}
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    for batch in batches(loader, failed):
        loss, global_feature, sentence = _loss(text, image, batch.to(device), config, regions)
        losses.append((float(loss), len(batch)))
        images.append(global_feature.cpu())
        sentences.append(sentence.cpu())
    if not images:
        raise CpganError(f"{dataset.split.folder}: no validation image could be decoded")
    f, s = torch.cat(images), torch.cat(sentences)
    candidates = min(CANDIDATES, f.shape[0])
    if candidates < 2:
        raise CpganError(f"{dataset.split.folder}: R-precision needs at least 2 validation images")
    mean, std = r_precision(f, s, candidates=candidates, folds=min(FOLDS, f.shape[0]), seed=seed)
    in_batch, in_batch_std = r_precision_in_batch(f, s, batch=candidates, seed=seed)
    count = sum(n for _, n in losses)
    return {"val_loss": sum(v * n for v, n in losses) / count, "r_precision": mean,
            "r_precision_std": std, "r_precision_in_batch": in_batch,
            "r_precision_in_batch_std": in_batch_std, "candidates": float(candidates),
            "val_images": float(f.shape[0]), "val_failed": float(len(failed))}


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class DamsmRun:
    """What :func:`train_damsm` returns: the outputs and the figures for the summary line."""

    model: Path
    epochs: int
    train_images: int
    skipped_images: int
    seconds: float
    threads: int
    metrics: dict[str, float]
    history: list[dict[str, float]]

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"model": str(self.model)}


def train_damsm(
    coco_root: Path,
    models_dir: Path,
    config: Config,
    vocab: Vocabulary,
    memory: Tensor | None = None,
    detector: Darknet | None = None,
    inception_weights: Path | None = None,
    *,
    classifier_weights: Path | None = None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    limit: int | None = None,
    val_limit: int | None = None,
    num_workers: int = 0,
    threads: int | None = None,
) -> DamsmRun:
    """Pretrain MATE + OAIE on ``coco_root``'s train split; evaluate on val; save.

    ``memory`` (the bank's ``[V, D]`` tensor) switches MATE's memory on, ``detector`` (a loaded,
    frozen Darknet) switches on V_o; without them this is the ``--no-memory`` / ``--no-oaie``
    ablation, written under its own name. The classifier backbone (toy preset) starts from
    ``classifier_weights``, the fitted toy scoring classifier. Epochs, batch size and learning
    rate come from ``config.encoder``. ``limit`` / ``val_limit`` keep the first N captioned
    images of each split; ``threads`` pins the compute threads (default: the idle cores, see
    :func:`cpgan.trainer.detector.choose_threads`).
    """
    from cpgan.trainer.detector import choose_threads

    previous = torch.get_num_threads()
    torch.set_num_threads(choose_threads(threads))
    try:
        return _train(Path(coco_root), Path(models_dir), config, vocab, memory, detector,
                      inception_weights, classifier_weights, device, resume, progress, limit,
                      val_limit, num_workers)
    finally:
        torch.set_num_threads(previous)


def _datasets(coco_root: Path, config: Config, vocab: Vocabulary, limit: int | None,
              val_limit: int | None) -> tuple[TextImageDataset, TextImageDataset]:
    size, words = config.encoder.image_size, config.data.max_caption_words
    train = TextImageDataset(CocoSplit.open(coco_root, TRAIN_SPLIT), vocab, words, [size],
                             augment=True, seed=config.seed, limit=limit,
                             crop=config.encoder.random_crop,
                             mirror_captions=config.encoder.mirror_captions)
    val = TextImageDataset(CocoSplit.open(coco_root, VAL_SPLIT), vocab, words, [size],
                           augment=False, seed=config.seed, limit=val_limit)
    for dataset, split in ((train, TRAIN_SPLIT), (val, VAL_SPLIT)):
        if len(dataset) < 2:
            raise CpganError(f"{coco_root}: {split} has {len(dataset)} captioned images; "
                             "DAMSM needs at least 2")
    return train, val


def _settings(record: dict[str, Any], config: Config, limit: int | None,
              val_limit: int | None) -> dict[str, Any]:
    """What must not change between a checkpoint and its resume (epochs may grow)."""
    encoder = dataclasses.asdict(config.encoder)
    encoder.pop("epochs")
    return {"model": record, "encoder": encoder, "seed": config.seed, "limit": limit,
            "val_limit": val_limit, "max_caption_words": config.data.max_caption_words}


def _train(coco_root: Path, models_dir: Path, config: Config, vocab: Vocabulary,
           memory: Tensor | None, detector: Darknet | None, inception_weights: Path | None,
           classifier_weights: Path | None, device: str, resume: bool, progress: bool,
           limit: int | None, val_limit: int | None, num_workers: int) -> DamsmRun:
    start = time.perf_counter()
    encoder = config.encoder
    if encoder.epochs < 0 or encoder.batch_size < 1 or encoder.lr <= 0 or \
            not 0 < encoder.lr_decay <= 1 or not 0 <= encoder.average_decay < 1 or \
            encoder.captions_per_image < 1 or encoder.swapped_negatives < 0 or \
            not 0 <= encoder.adversarial_epsilon < 1:
        raise CpganError(f"DAMSM needs epochs >= 0, batch size >= 1, lr > 0, 0 < lr_decay <= 1, "
                         f"0 <= average_decay < 1, captions_per_image >= 1, "
                         f"swapped_negatives >= 0 and 0 <= adversarial_epsilon < 1, got "
                         f"{encoder.epochs}, {encoder.batch_size}, {encoder.lr}, "
                         f"{encoder.lr_decay}, {encoder.average_decay}, "
                         f"{encoder.captions_per_image}, {encoder.swapped_negatives}, "
                         f"{encoder.adversarial_epsilon}")
    words_of_kind({}, encoder.swapped_words)  # refuse an unknown kind before any work
    if encoder.backbone == "classifier" and classifier_weights is None:
        raise CpganError("the classifier backbone starts from the toy scoring classifier: run "
                         "'cpgan-eval fit-classifier' first (models/classifier.pt)")
    torch.manual_seed(config.seed)
    train_set, val_set = _datasets(coco_root, config, vocab, limit, val_limit)
    swaps = (WordSwaps(vocab, words_of_kind(swappable_words(train_set.split),
                                            encoder.swapped_words))
             if encoder.swapped_negatives else None)
    regions = region_settings(detector, config.detector) if detector is not None else None
    extractor = build_region_extractor(detector, regions) if detector is not None else None
    text = build_text_encoder(len(vocab), encoder, memory).to(device)
    image = build_image_encoder(encoder, extractor, inception_weights,
                                classifier_weights).to(device)
    record = encoder_record(len(vocab), encoder, text, image, regions)
    parameters = [p for p in [*text.parameters(), *image.parameters()] if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=encoder.lr, betas=ADAM_BETAS)
    state = TrainState(text, image, optimizer)
    if encoder.average_decay > 0:
        steps_per_epoch = math.ceil(len(train_set) / encoder.batch_size)
        state.average = WeightAverage(state.encoders(), encoder.average_decay,
                                      max(1.0, steps_per_epoch * AVERAGE_RAMP_EPOCHS),
                                      follow=state.learned_keys())
    settings = _settings(record, config, limit, val_limit)
    use_memory, use_objects = memory is not None, detector is not None
    checkpoint = checkpoint_path(models_dir, use_memory, use_objects)
    if resume and checkpoint.exists():
        with refusing_unfit_checkpoint(checkpoint):
            state.restore(_load_checkpoint(checkpoint, settings, encoder.epochs))

    name = model_name(use_memory, use_objects)
    train_regions = val_regions = None
    if use_objects and state.epoch < encoder.epochs:
        train_regions, val_regions = _region_caches(image, train_set, val_set, config, device,
                                                    state, progress)
    for epoch in range(state.epoch, encoder.epochs):
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(encoder.lr, epoch, encoder.lr_decay)
        loader = make_loader(train_set, encoder.batch_size, epoch=epoch, shuffle=True,
                             num_workers=num_workers, exclude=state.failed_indices)
        with tqdm(total=len(loader.sampler), desc=f"{name} {epoch + 1}/{encoder.epochs}",
                  unit="img", disable=not progress, leave=False) as bar:
            train_loss = _train_epoch(state, loader, encoder, device, bar, train_regions,
                                      train_set, swaps)
        metrics = evaluate(*state.published(), val_set, encoder, encoder.batch_size,
                           config.seed, device, num_workers, val_regions)
        state.history.append({"epoch": float(epoch + 1), "train_loss": train_loss, **metrics})
        state.epoch = epoch + 1
        _save(checkpoint, state.to_checkpoint(settings))
        if progress:
            tqdm.write(_epoch_line(name, epoch + 1, encoder.epochs, state.history[-1]))

    metrics = state.history[-1] if state.history else evaluate(
        *state.published(), val_set, encoder, encoder.batch_size, config.seed, device,
        num_workers)
    target = model_path(models_dir, use_memory, use_objects)
    _save(target, {"format": FORMAT, **encoder_states(*state.published()),
                   "config": record, "metrics": dict(metrics)})
    return DamsmRun(target, encoder.epochs, len(train_set) - len(state.failed),
                    len(state.failed), time.perf_counter() - start, torch.get_num_threads(),
                    dict(metrics), [dict(h) for h in state.history])


def _region_caches(image: ObjectAwareImageEncoder, train_set: TextImageDataset,
                   val_set: TextImageDataset, config: Config, device: str, state: TrainState,
                   progress: bool) -> tuple[RegionCache | None, RegionCache | None]:
    """V_o caches (:mod:`cpgan.trainer.region_cache`) for the train views, when they repeat
    (no random crop: the evaluation view and its mirror), and for the val views; each only if
    it fits in ``REGION_CACHE_LIMIT`` bytes. Val decode failures are left to evaluate()."""
    detector = image.detector
    assert detector is not None

    def build(dataset: TextImageDataset, flips: tuple[bool, ...], failures: dict[int, str],
              failed_indices: set[int]) -> RegionCache | None:
        size = cache_bytes(len(dataset), len(flips), detector.num_regions, detector.feature_dim)
        if size > REGION_CACHE_LIMIT:
            return None
        return RegionCache.build(image.detect, dataset, flips, config.encoder.batch_size, device,
                                 failures, failed_indices, progress,
                                 f"V_o of {dataset.split.split}")

    train = (None if config.encoder.random_crop
             else build(train_set, (False, True), state.failed, state.failed_indices))
    return train, build(val_set, (False,), {}, set())


def _epoch_line(name: str, epoch: int, epochs: int, row: dict[str, float]) -> str:
    return (f"{name} epoch {epoch}/{epochs}: train loss {row['train_loss']:.3f}, val loss "
            f"{row['val_loss']:.3f}, R-precision {row['r_precision']:.3f} "
            f"± {row['r_precision_std']:.3f} (in-batch {row['r_precision_in_batch']:.3f})")


describe_metrics = layout.describe_damsm_metrics  # in cpgan.layout: read without torch


def pretrained_summary(path: Path) -> dict[str, float] | None:
    """The metrics stored in an encoder file, or None when it cannot be read."""
    try:
        data = load_torch_file(path, "DAMSM encoder file")
    except CpganError:  # an unreadable file simply has no summary
        return None
    metrics = data.get("metrics") if isinstance(data, dict) else None
    return metrics if isinstance(metrics, dict) else None


_REPORTED = ("r_precision", "r_precision_std", "r_precision_in_batch", "r_precision_in_batch_std",
             "val_loss", "epoch")


def pretrained_variants(models_dir: Path) -> list[dict[str, Any]]:
    """The val figures of every DAMSM variant found in ``models_dir``, one row each, so the
    evaluation report can set the memory encoders beside the ``--no-memory`` ones (and the
    ``--no-oaie`` ablations when trained). Each row: the file, its switches, the final
    R-precision (mean and std over the folds), the in-batch variant, the val loss, the epochs,
    and the per-epoch R-precision from the model's provenance record when that record
    describes this very file (else None). A file that cannot be read is a row with ``error``.
    """
    rows = []
    for path, use_memory, use_objects in variant_files(models_dir):
        row: dict[str, Any] = {"model": f"{path.parent.name}/{path.name}",
                               "memory": use_memory, "objects": use_objects}
        metrics = pretrained_summary(path)
        if metrics is None or not all(is_finite_number(metrics.get(k)) for k in _REPORTED):
            rows.append({**row, "error": f"{path}: no readable val metrics"})
            continue
        rows.append({**row, "epochs": int(metrics["epoch"]),
                     "r_precision": {"mean": float(metrics["r_precision"]),
                                     "std": float(metrics["r_precision_std"])},
                     "r_precision_in_batch": {"mean": float(metrics["r_precision_in_batch"]),
                                              "std": float(metrics["r_precision_in_batch_std"])},
                     "val_loss": float(metrics["val_loss"]),
                     "history": recorded_history(path)})
    return rows


def recorded_history(model: Path) -> list[float] | None:
    """Per-epoch val R-precision from ``<model>.provenance.json``, or None when the record is
    missing, malformed or was written for another version of the file (its fingerprint of
    the model no longer matches)."""
    from cpgan.pipeline.artifacts import fingerprint

    try:
        record = json.loads(provenance_path(model).read_text("utf-8"))
        known = next(v for k, v in record["outputs"].items() if Path(k).name == model.name)
        history = record["summary"]["history"]
        if fingerprint(model, known)["sha256"] != known.get("sha256"):
            return None
        values = [row["r_precision"] for row in history]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return None
    return [float(v) for v in values] if all(is_finite_number(v) for v in values) else None

