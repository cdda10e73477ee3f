"""Sampling from a trained CPGAN: the reading side of the GAN run contract.

A GAN run leaves ``<artifacts>/runs/<name>/checkpoint.pt`` (see the run contract in DESIGN and
:mod:`cpgan.trainer.gan`, which writes it). Evaluation (``cpgan-eval``) and ``cpgan-sample``
need from it the EMA generator, the frozen text encoder it was trained with, the vocabulary
and the resolved config; this module reads and checks all of that, and generates.

Everything read is validated before it is trusted: the checkpoint is loaded with
``weights_only=True`` and must carry every contract key with the right kind of value; a
missing key, another ``kind``, a file that needs unpickling or weights that do not fit the
recorded config are one-line :class:`CpganError` naming the file. Keys beyond the contract are
ignored, so a trainer that records more does not break evaluation.

Determinism. Each generated image is a function of the seed and of its *item index* only:
item i draws its noise z (truncated Gaussian, |z| < ``gan.truncation``, BigGAN's trick that
CPGAN uses, §4.1) and its conditioning-augmentation epsilon from a ``torch.Generator`` seeded by
``(seed, i)``. So the images do not depend on the batch size or on which other captions are
generated in the same call, and evaluation gives the trained and the untrained generator the
same noise for the same (image, caption) pair. The generator runs in eval mode (batch-norm
running statistics), as AttnGAN's sampling does; conditioning augmentation still samples c,
as in AttnGAN and the CPGAN release, so scores are comparable with theirs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from cpgan import layout
from cpgan.config import (Config, config_defaults, dotted_keys, fill_new_keys,
                          load_config)
from cpgan.errors import CpganError, one_line
from cpgan.model.generator import ConditioningAugmentation, Generator, GeneratorOutput, truncated_normal
from cpgan.model.text_encoder import MemoryAttendedTextEncoder
from cpgan.pipeline.text import PAD_ID, UNK_ID, Vocabulary, tokenize
from cpgan.torch_file import load_torch_file, refuse_nonfinite
from cpgan.trainer.data import multi_resolution_sizes

FORMAT = 1
KIND = "cpgan-gan"
# in cpgan.layout: the up-to-date checks read these without torch
RUNS_DIR = layout.RUNS_DIR
CHECKPOINT_NAME = layout.CHECKPOINT_NAME
DEFAULT_RUN = layout.RUN_STEM
VOCAB_NAME = layout.VOCAB_NAME
SWITCHES = ("use_memory", "use_objects", "use_fgcd")
STATE_KEYS = ("generator", "generator_ema", "discriminators")
CHECKPOINT_KEYS = ("format", "kind", "config", "switches", "encoders", "memory", "vocab_size",
                   *STATE_KEYS, "optimizer_g", "optimizer_d", "step", "epoch", "finished", "rng")
_CONFIG_SECTIONS = ("data", "detector", "attention", "memory", "encoder", "gan")


# --------------------------------------------------------------------------------------------
# The checkpoint


default_checkpoint = layout.default_checkpoint  # in cpgan.layout: read without torch


@dataclass(frozen=True)
class GanCheckpoint:
    """The parts of a contract checkpoint that sampling and evaluation use."""

    path: Path
    config: Config
    switches: dict[str, bool]
    encoders: str
    memory: str | None
    vocab_size: int
    generator_ema: dict[str, Tensor]
    step: int
    epoch: int
    finished: bool

    @property
    def run_name(self) -> str:
        """``cpgan``, ``cpgan-no-memory``, ...: the run folder's name."""
        return self.path.parent.name

    def summary(self) -> dict[str, Any]:
        """What a report records about the checkpoint it evaluated."""
        return {"run": self.run_name, "step": self.step, "epoch": self.epoch,
                "finished": self.finished, "switches": dict(self.switches),
                "encoders": self.encoders, "memory": self.memory}


def config_from_dict(values: Any, where: Path) -> Config:
    """Rebuild the typed :class:`Config` from ``Config.to_dict()`` output, every key checked
    (an unknown key or a wrong type is an error naming ``where``). A key the stored config
    predates is its :class:`Config` default, as for a resume
    (:func:`cpgan.config.fill_new_keys`), not the preset's value."""
    if not isinstance(values, dict) or not isinstance(values.get("preset"), str) or \
            any(not isinstance(values.get(s), dict) for s in _CONFIG_SECTIONS):
        raise CpganError(f"{where}: 'config' is not a resolved config (preset and the "
                         f"{', '.join(_CONFIG_SECTIONS)} sections)")
    rest = {k: v for k, v in values.items() if k != "preset"}
    gan = rest["gan"]
    if "lr" in gan and "lr_g" not in gan and "lr_d" not in gan:
        # written before the generator and discriminators had separate learning rates
        rest["gan"] = {**{k: v for k, v in gan.items() if k != "lr"},
                       "lr_g": gan["lr"], "lr_d": gan["lr"]}
    defaults = {k: v for k, v in config_defaults().items() if k != "preset"}
    rest = fill_new_keys(rest, defaults, defaults)
    try:
        return load_config(values["preset"], overrides=dotted_keys(rest))
    except CpganError as exc:
        raise CpganError(f"{where}: its config is not usable ({one_line(exc)})") from None


def _is_state(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and \
        all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())


def _shown(value: Any) -> str:
    """``value`` for a one-line message: its repr when a plain scalar, else its type."""
    if value is None or isinstance(value, (str, int, float)):
        return repr(value)
    return f"a {type(value).__name__}"


def _check_fields(path: Path, data: dict[str, Any]) -> None:
    """Types of every contract value (beyond the keys, which the caller checked)."""
    if type(data["format"]) is not int or data["format"] != FORMAT or \
            not isinstance(data["kind"], str) or data["kind"] != KIND:
        raise CpganError(f"{path}: not a GAN checkpoint (kind {_shown(data['kind'])}, format "
                         f"{_shown(data['format'])}; expected kind {KIND!r}, format {FORMAT})")
    switches = data["switches"]
    if not isinstance(switches, dict) or set(switches) != set(SWITCHES) or \
            not all(isinstance(v, bool) for v in switches.values()):
        raise CpganError(f"{path}: 'switches' must map {', '.join(SWITCHES)} to booleans")
    encoders, memory = data["encoders"], data["memory"]
    if not isinstance(encoders, str) or not encoders or Path(encoders).is_absolute():
        raise CpganError(f"{path}: 'encoders' must be a path relative to the artifacts root")
    memory_fits = (isinstance(memory, str) and not Path(memory).is_absolute()
                   if switches["use_memory"] else memory is None)
    if not memory_fits:
        raise CpganError(f"{path}: 'memory' must be a relative path when use_memory is on and "
                         "None when it is off")
    for key in ("vocab_size", "step", "epoch"):
        if type(data[key]) is not int or data[key] < 0:
            raise CpganError(f"{path}: '{key}' must be a non-negative integer")
    if not isinstance(data["finished"], bool):
        raise CpganError(f"{path}: 'finished' must be a boolean")
    for key in STATE_KEYS:
        if not _is_state(data[key]):
            raise CpganError(f"{path}: '{key}' is not a state dict of tensors")
    refuse_nonfinite(path, data["generator_ema"], "'generator_ema'")


def read_checkpoint(path: str | Path) -> GanCheckpoint:
    """Load and validate a GAN run checkpoint (the contract's ``checkpoint.pt``)."""
    path = Path(path)
    data = load_torch_file(path, "GAN checkpoint",
                           "train one with 'cpgan-train', or pass --checkpoint")
    if not isinstance(data, dict):
        raise CpganError(f"{path}: not a GAN checkpoint (expected a dict)")
    missing = [key for key in CHECKPOINT_KEYS if key not in data]
    if missing:
        raise CpganError(f"{path}: not a complete GAN checkpoint (missing "
                         f"{', '.join(repr(k) for k in missing)})")
    _check_fields(path, data)
    return GanCheckpoint(path, config_from_dict(data["config"], path), dict(data["switches"]),
                         data["encoders"], data["memory"], data["vocab_size"],
                         data["generator_ema"], data["step"], data["epoch"], data["finished"])


# --------------------------------------------------------------------------------------------
# Generators


def build_generator(config: Config) -> Generator:
    """The generator of the run contract, from ``config.gan`` and ``config.encoder.text_dim``."""
    g = config.gan
    try:
        return Generator(text_dim=config.encoder.text_dim, z_dim=g.z_dim,
                         condition_dim=g.condition_dim, gf_dim=g.gf_dim, base_size=g.base_size,
                         stages=g.stages, r_num=g.r_num,
                         condition_augmentation=g.condition_augmentation)
    except ValueError as exc:
        raise CpganError(f"gan config: {exc}") from None


def for_inference(generator: Generator) -> Generator:
    """Frozen, eval mode, and in ``channels_last`` memory order: oneDNN's convolutions then
    skip a layout conversion around every nearest-neighbour upsampling, which made
    generation ~1.6x faster on CPU (toy preset, one thread) for outputs equal to ~1e-6."""
    return generator.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def untrained_generator(config: Config, seed: int) -> Generator:
    """A freshly initialised generator of the same config (the evaluation's floor): its
    weights are a function of ``seed`` only, drawn without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = build_generator(config)
    return for_inference(generator)


def load_generator(checkpoint: GanCheckpoint) -> Generator:
    """The checkpoint's EMA generator, frozen and in eval mode."""
    generator = build_generator(checkpoint.config)
    try:
        generator.load_state_dict(checkpoint.generator_ema)
    except RuntimeError as exc:
        raise CpganError(f"{checkpoint.path}: 'generator_ema' does not fit the generator of its "
                         f"config ({str(exc).strip().splitlines()[0]})") from None
    return for_inference(generator)


# --------------------------------------------------------------------------------------------
# Text


def load_text_encoder(path: str | Path, vocab: Vocabulary, config: Config,
                      memory_path: str | Path | None) -> MemoryAttendedTextEncoder:
    """Only the frozen MATE of a DAMSM encoder file (``models/damsm*.pt``), for sampling.

    Unlike :func:`cpgan.trainer.damsm.load_pretrained_encoders` this needs neither the
    detector nor Inception (the image encoder is not built), so ``cpgan-sample`` runs with the
    text encoder, the memory bank and the generator alone. The same checks apply to what it
    reads: vocabulary size, sizes against ``config``, and the memory bank's digest.
    """
    from cpgan.trainer.damsm import (
        build_text_encoder,
        load_text_state,
        read_encoder_file,
        recorded_memory,
    )

    path = Path(path)
    data = read_encoder_file(path)
    record = data["config"]
    sizes = {"vocab_size": len(vocab), "word_embed_dim": config.encoder.word_embed_dim,
             "text_dim": config.encoder.text_dim}
    for key, wanted in sizes.items():
        if record.get(key) != wanted:
            raise CpganError(f"{path}: encoders have {key} = {record.get(key)!r}, the GAN "
                             f"run needs {wanted!r}")
    memory = recorded_memory(path, record, vocab, memory_path)
    text = build_text_encoder(len(vocab), config.encoder, memory)
    try:
        load_text_state(text, data["text_encoder"])
    except (RuntimeError, ValueError) as exc:
        raise CpganError(f"{path}: text encoder weights do not fit the recorded sizes "
                         f"({str(exc).strip().splitlines()[0]})") from None
    return text.eval().requires_grad_(False)


@dataclass
class CaptionBatch:
    """Captions as the text encoder reads them, with what the vocabulary did not know."""

    texts: list[str]
    captions: Tensor            # [B, T] long, <pad> after ``lengths`` words
    lengths: Tensor             # [B] long
    unknown: list[list[str]]    # per caption: tokens that became <unk>
    truncated: list[int]        # per caption: tokens dropped beyond max_words


def check_captions(texts: Sequence[str]) -> None:
    """Refuse a caption without any word (empty, or punctuation only): it cannot condition the
    generator, whose word attention would be a softmax over nothing."""
    if not texts:
        raise CpganError("no caption given")
    for text in texts:
        if not tokenize(text):
            raise CpganError(f"caption {text!r} has no word to condition on (empty or "
                             "punctuation only)")


def tokenize_captions(texts: Sequence[str], vocab: Vocabulary, max_words: int) -> CaptionBatch:
    """Encode user captions with the project's tokenizer and length rule (the first
    ``max_words`` tokens); :func:`check_captions` refuses one without any word."""
    from cpgan.trainer.data import pad_caption

    check_captions(texts)
    rows, lengths, unknown, truncated = [], [], [], []
    for text in texts:
        tokens = tokenize(text)
        kept = tokens[:max_words]
        rows.append(pad_caption([vocab.id(t) for t in kept], max_words))
        lengths.append(len(kept))
        unknown.append(sorted({t for t in kept if vocab.id(t) == UNK_ID}))
        truncated.append(len(tokens) - len(kept))
    return CaptionBatch(list(texts), torch.stack(rows), torch.tensor(lengths, dtype=torch.long),
                        unknown, truncated)


@dataclass
class EncodedText:
    """Generator conditioning: words ``[B, T, d]`` (batch-first), s ``[B, d]``, mask ``[B, T]``."""

    words: Tensor
    sentence: Tensor
    mask: Tensor

    def __getitem__(self, index: slice) -> "EncodedText":
        return EncodedText(self.words[index], self.sentence[index], self.mask[index])

    def __len__(self) -> int:
        return int(self.sentence.shape[0])


@torch.no_grad()
def encode_captions(text_encoder: MemoryAttendedTextEncoder, captions: Tensor,
                    lengths: Tensor) -> EncodedText:
    """W and s from the frozen MATE (Eq. 8-9); word mask = token != <pad> (run contract)."""
    words, sentence = text_encoder(captions, lengths)
    return EncodedText(words.transpose(1, 2).contiguous(), sentence, captions != PAD_ID)


# --------------------------------------------------------------------------------------------
# Generation


def item_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` under ``seed`` (numpy's SeedSequence mixes them, so
    neighbouring items and neighbouring seeds give unrelated streams)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index)]).generate_state(
        1, dtype=np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def item_noise(seed: int, indices: Sequence[int], z_dim: int, condition_dim: int,
               truncation: float) -> tuple[Tensor, Tensor]:
    """Per item: z ``[B, z_dim]`` (|z| < truncation) and the CA epsilon ``[B, condition_dim]``."""
    zs, eps = [], []
    for index in indices:
        generator = torch.Generator().manual_seed(item_seed(seed, int(index)))
        zs.append(truncated_normal((z_dim,), truncation, generator=generator))
        eps.append(torch.randn(condition_dim, generator=generator))
    return torch.stack(zs), torch.stack(eps)


class _GivenEpsilon(nn.Module):
    """Conditioning augmentation with epsilon given per item instead of ``randn_like``:
    c = mu + exp(logvar / 2) * eps, exactly the formula of ConditioningAugmentation."""

    def __init__(self, inner: ConditioningAugmentation, eps: Tensor) -> None:
        super().__init__()
        self.inner, self.eps = inner, eps

    def forward(self, sentence: Tensor, sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        _, mu, logvar = self.inner(sentence, sample=False)
        if not sample:
            return mu, mu, logvar
        return mu + torch.exp(0.5 * logvar) * self.eps, mu, logvar


@contextlib.contextmanager
def _conditioning_noise(generator: Generator, eps: Tensor) -> Iterator[None]:
    inner = generator.condition
    generator.condition = _GivenEpsilon(inner, eps)  # type: ignore[assignment]
    try:
        yield
    finally:
        generator.condition = inner


@torch.no_grad()
def generate(generator: Generator, text: EncodedText, seed: int, indices: Sequence[int],
             truncation: float) -> GeneratorOutput:
    """Images (all stages) and word attention maps for captions ``text``; item k uses the
    noise of ``indices[k]`` under ``seed``."""
    if len(indices) != len(text):
        raise ValueError(f"{len(indices)} item indices for {len(text)} captions")
    device = text.sentence.device
    z, eps = item_noise(seed, indices, generator.z_dim, generator.condition.condition_dim,
                        truncation)
    with _conditioning_noise(generator, eps.to(device)):
        return generator(z.to(device), text.sentence, text.words, text.mask)


def enlarge(images: Tensor, size: int) -> Tensor:
    """``[B, 3, s, s]`` images at ``size`` pixels (bilinear), unchanged when already there: how
    a smaller stage's images are shown to networks made for the last stage's size."""
    if images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                           align_corners=False)


def to_uint8(images: Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] -> uint8 ``[B, H, W, 3]`` for pictures."""
    scaled = (images.detach().float().clamp(-1, 1) + 1) * 127.5
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def final_size(config: Config) -> int:
    """Side of the last stage's images (toy 64, paper 256)."""
    return multi_resolution_sizes(config.gan.base_size, config.gan.stages)[-1]


# --------------------------------------------------------------------------------------------
# Everything cpgan-sample needs


@dataclass
class Sampler:
    """A trained generator with its text encoder and vocabulary, ready to draw images."""

    checkpoint: GanCheckpoint
    generator: Generator
    text_encoder: MemoryAttendedTextEncoder
    vocab: Vocabulary
    device: str

    @property
    def config(self) -> Config:
        return self.checkpoint.config

    def captions(self, texts: Sequence[str]) -> CaptionBatch:
        return tokenize_captions(texts, self.vocab, self.config.data.max_caption_words)

    def sample(self, batch: CaptionBatch, per_caption: int, seed: int,
               batch_size: int = 32) -> Tensor:
        """``[len(texts) * per_caption, 3, S, S]`` final-stage images in [-1, 1] (CPU), caption
        by caption; image j of caption i is item ``i * per_caption + j``."""
        text = encode_captions(self.text_encoder, batch.captions.to(self.device),
                               batch.lengths.to(self.device))
        repeat = torch.arange(len(text), device=self.device).repeat_interleave(per_caption)
        text = EncodedText(text.words[repeat], text.sentence[repeat], text.mask[repeat])
        images = []
        for start in range(0, len(text), batch_size):
            indices = range(start, min(start + batch_size, len(text)))
            out = generate(self.generator, text[start:indices.stop], seed, indices,
                           self.config.gan.truncation)
            images.append(out.images[-1].cpu())
        return torch.cat(images)


def resolve(artifacts: Path, relative: str) -> Path:
    """A path the checkpoint records relative to the artifacts root."""
    return Path(artifacts) / relative


def load_vocab(artifacts: Path, checkpoint: GanCheckpoint) -> Vocabulary:
    """``vocab.json``, checked against the vocabulary size the run was trained with."""
    vocab = Vocabulary.load(Path(artifacts) / VOCAB_NAME)
    if len(vocab) != checkpoint.vocab_size:
        raise CpganError(f"{checkpoint.path}: trained for {checkpoint.vocab_size} words, "
                         f"{Path(artifacts) / VOCAB_NAME} has {len(vocab)}")
    return vocab


def load_sampler(checkpoint_path: str | Path, artifacts: Path, device: str = "cpu") -> Sampler:
    """Read the checkpoint, the vocabulary, the memory bank and the text encoder it names."""
    checkpoint = read_checkpoint(checkpoint_path)
    vocab = load_vocab(artifacts, checkpoint)
    memory = resolve(artifacts, checkpoint.memory) if checkpoint.memory else None
    encoders = resolve(artifacts, checkpoint.encoders)
    text = load_text_encoder(encoders, vocab, checkpoint.config, memory)
    if text.uses_memory != checkpoint.switches["use_memory"]:
        raise CpganError(f"{encoders}: its text encoder {'uses' if text.uses_memory else 'has no'}"
                         f" memory, the run {checkpoint.path} has use_memory = "
                         f"{checkpoint.switches['use_memory']}")
    return Sampler(checkpoint, load_generator(checkpoint).to(device), text.to(device), vocab,
                   device)
