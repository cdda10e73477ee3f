"""Typed configuration: dataclasses loaded from the TOML presets in ``configs/``.

A preset (``configs/toy.toml`` or ``configs/paper.toml``) gives every value; a user file passed
with ``--config`` overrides any subset of it; CLI flags override both. Unknown sections or keys
are an error naming the key, so a typo never silently falls back to a default. The resolved
config is written beside every output (see ``pipeline/artifacts.py``).
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpgan.errors import CpganError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("toy", "paper")


@dataclass
class DataConfig:
    """The dataset and its text: caption length is the AttnGAN WORDS_NUM (paper 18)."""

    max_caption_words: int = 18
    min_word_count: int = 1


@dataclass
class DetectorConfig:
    """YOLOv3 regions (§3.2.1): top-36 boxes, D-dim RoIAlign features from ``feature_layer``."""

    cfg: str = "configs/darknet/yolov3.cfg"
    input_size: int = 416
    num_regions: int = 36
    feature_layer: int = 74
    feature_dim: int = 1024
    score_threshold: float = 0.001
    nms_iou: float = 0.45
    shard_size: int = 1024
    train_epochs: int = 100
    train_batch_size: int = 16
    train_lr: float = 1e-3
    train_weight_decay: float = 5e-4
    train_warmup_steps: int = 1000
    train_workers: int = 4
    train_average_decay: float = 0.9999
    train_cls_weight: float = 1.0


DETECTOR_KEYS_TRAINING_IGNORES = ("num_regions", "feature_layer", "feature_dim", "shard_size",
                                  "train_workers")
"""``[detector]`` keys that neither the trained weights nor their val mAP depend on, so changing
one does not retrain the detector: what ``detect`` extracts and how it shards (changing those
reruns ``detect``), the feature layer's width (read from the layer; only the benchmarks read
the key) and the loader's worker count (every random choice of training is a function of
(seed, epoch, index))."""


@dataclass
class AttentionConfig:
    """Bottom-Up/Top-Down captioner sizes (Anderson et al.): hidden 1000, attention 512."""

    embed_dim: int = 1000
    hidden_dim: int = 1000
    attention_dim: int = 512
    dropout: float = 0.5
    epochs: int = 30
    batch_size: int = 100
    lr: float = 5e-4
    grad_clip: float = 0.1


@dataclass
class MemoryConfig:
    """Eq. 7: m_r from the top-K most relevant images of word r."""

    topk: int = 5


@dataclass
class EncoderConfig:
    """MATE and OAIE (Eq. 8-10) and DAMSM pretraining (Eq. 14-25)."""

    word_embed_dim: int = 300
    text_dim: int = 256
    image_size: int = 299
    gamma1: float = 4.0
    gamma2: float = 5.0
    gamma3: float = 10.0
    epochs: int = 120
    batch_size: int = 48
    lr: float = 2e-4
    lr_decay: float = 0.98        # per epoch, down to lr / 10 (AttnGAN's pretrain_DAMSM)
    backbone: str = "inception"   # "inception" (frozen, ImageNet weights), "classifier" (the
                                  # toy scoring classifier's trunk, fine-tuned) or "toy" (trained
                                  # from scratch)
    backbone_width: int = 32      # channels of the toy backbone's first stage; the classifier's
                                  # width for "classifier"
    sentence_pooling: str = "last"  # s from the Bi-LSTM: "last" (final states, AttnGAN) or "max"
    random_crop: bool = True      # AttnGAN's random 64/76 crop in pretraining (else flips only)
    mirror_captions: bool = False  # swap left and right in a flipped view's captions (False:
                                   # AttnGAN, whose flips leave them; trainer/data.py)
    grad_clip: float = 0.25       # AttnGAN's RNN_GRAD_CLIP on the text encoder
    text_dropout: float = 0.5     # on the LSTM inputs f_i, as AttnGAN's RNN_ENCODER
    average_decay: float = 0.0    # EMA of the encoders' weights, evaluated and published (0: none,
                                  # as AttnGAN; trainer/averaging.py)
    captions_per_image: int = 1   # captions of each image in a pretraining batch, all positives
                                  # (1: AttnGAN; model/losses.py)
    swapped_negatives: int = 0    # captions made false by one swapped word, per caption, as
                                  # extra sentence-level negatives (0: AttnGAN;
                                  # trainer/negatives.py)
    swapped_words: str = "all"    # which words those swaps replace: "all" (object and colour
                                  # words), "object" or "colour" (trainer/negatives.py)
    adversarial_epsilon: float = 0.0  # L-infinity radius (pixels in [-1, 1]) of the adversarial
                                  # views the image encoder trains on, so that TISCL's gradient
                                  # draws shapes (0: none, AttnGAN; trainer/adversarial.py)


@dataclass
class GanConfig:
    """Generator and discriminators (§3.1, §3.4, §4.1): 64 -> 128 -> 256 in three stages."""

    base_size: int = 64
    stages: int = 3
    gf_dim: int = 48
    df_dim: int = 96
    r_num: int = 3
    z_dim: int = 100
    condition_dim: int = 100
    fgcd_patches: int = 4
    d_norm: str = "batch"         # the discriminators' normalisation: "batch" (AttnGAN, the
                                  # paper) or "spectral" (no BN, spectral norm; ours)
    batch_size: int = 72
    epochs: int = 600
    lr_g: float = 2e-4            # generator's Adam; the paper uses 2e-4 for both networks
    lr_d: float = 2e-4            # every discriminator's Adam
    beta1: float = 0.5
    beta2: float = 0.999
    tiscl_lambda: float = 50.0
    tiscl_gamma3: float = 0.0     # TISCL's sentence-level temperature (gamma3 of Eq. 20-24 in
                                  # Eq. 6); 0: the encoders' own encoder.gamma3 (the paper)
    truncation: float = 2.0
    mirror_captions: bool = False  # as encoder.mirror_captions, for the GAN's training pairs
    condition_augmentation: bool = True  # c ~ N(mu(s), sigma(s)^2) with the KL term (AttnGAN,
                                         # the paper); False: c = mu(s), no KL term (ours)
    tiscl_stages: str = "last"    # TISCL on the last stage's image (Eq. 6, the paper) or
                                  # "all": the mean over every stage's, enlarged (ours)
    tiscl_channels_last: bool = False  # TISCL's frozen encoders read the images in
                                  # channels-last layout: a toy step 0.93 times as long on AMD
                                  # AVX-512 cores, the same sums in another order, but SOA-C
                                  # lower on 5 of 5 toy GAN seeds (RESULTS.md, session 36)


@dataclass
class Config:
    """The whole resolved configuration of one run."""

    preset: str = "paper"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    gan: GanConfig = field(default_factory=GanConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_defaults(*sections: str) -> dict[str, Any]:
    """The :class:`Config` defaults of ``sections`` (all of them when none is named), as JSON
    gives them back (tuples as lists), for :func:`fill_new_keys`."""
    defaults = json.loads(json.dumps(Config().to_dict()))
    return {k: v for k, v in defaults.items() if not sections or k in sections}


def dotted_keys(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as one level of dotted keys (``{"gan": {"lr_g": x}}`` ->
    ``{"gan.lr_g": x}``), the form of :func:`load_config`'s ``overrides``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def fill_new_keys(stored: Any, current: Any, defaults: Any) -> Any:
    """``stored`` (a recorded config or stage parameters) with every key that ``current`` has
    and ``stored`` predates taken from ``defaults``, at any depth of nested dicts.

    The one rule for settings recorded before a key existed: a new key's :class:`Config`
    default is the behaviour before it (``gan.d_norm = "batch"``, ``encoder.swapped_negatives
    = 0``), so a record without the key means the default. Comparing the filled record with
    the current settings then tells a real change (the key set to something else) from an
    upgrade of the code (the key at its default), and a finished stage, a resume or a
    checkpoint's config survive the upgrade. Keys that ``defaults`` does not know stay
    missing, so they still count as a difference."""
    if not (isinstance(stored, dict) and isinstance(current, dict) and isinstance(defaults, dict)):
        return stored
    filled = dict(stored)
    for key, value in current.items():
        if key not in defaults:
            continue
        filled[key] = (fill_new_keys(stored[key], value, defaults[key]) if key in stored
                       else defaults[key])
    return filled


RENAMED = {"gan.lr": "gan.lr_g and gan.lr_d"}
"""Keys of earlier versions, for the error a user file that still has one gets."""


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Check a TOML value against a dataclass field type (ints are accepted for floats)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool) and (
        not isinstance(value, kind) or (kind is int and isinstance(value, bool))
    ):
        raise CpganError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _apply(target: Any, values: dict[str, Any], source: str, prefix: str = "") -> None:
    """Overwrite the dataclass ``target`` in place with ``values``, refusing unknown keys."""
    hints = typing.get_type_hints(type(target))
    for key, value in values.items():
        where = f"{source}: {prefix}{key}"
        if key not in hints:
            renamed = RENAMED.get(f"{prefix}{key}")
            raise CpganError(f"{source}: unknown config key '{prefix}{key}'"
                             + (f" (now {renamed})" if renamed else ""))
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise CpganError(f"{where}: expected a [{prefix}{key}] table")
            _apply(current, value, source, f"{prefix}{key}.")
        else:
            setattr(target, key, _coerce(value, hints[key], where))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise CpganError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise CpganError(f"{path}: not valid TOML ({exc})") from None


def load_config(
    preset: str = "toy",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Resolve preset -> ``config_file`` -> ``overrides`` (dotted keys, e.g. ``memory.topk``)."""
    if preset not in PRESETS:
        raise CpganError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    config = Config()
    preset_path = CONFIG_DIR / f"{preset}.toml"
    _apply(config, _read_toml(preset_path), str(preset_path))
    config.preset = preset
    if config_file is not None:
        _apply(config, _read_toml(Path(config_file)), str(config_file))
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *sections, key = dotted.split(".")
        nested: dict[str, Any] = {key: value}
        for section in reversed(sections):
            nested = {section: nested}
        _apply(config, nested, "command line")
    return config
