"""GAN training of CPGAN: §3.1 (Eq. 2-6), §3.4 (Eq. 11), §4.1, supplementary §6.1-6.2.

One step, on a batch of real (image pyramid, caption) pairs from :mod:`cpgan.trainer.data`:

1. the frozen, pretrained MATE (``models/damsm*.pt``) encodes the captions: words W, sentence s;
2. the generator maps truncated Gaussian noise (|z| < ``gan.truncation``, §4.1) and (s, W) to
   one image per stage (Eq. 2);
3. every stage's D^uc and D^c take one Adam step on Eq. 5: real images with their captions,
   the generated images (detached) with the same captions, and the real images with the
   batch's captions rolled by one (the mismatched pairs (I, X-bar));
4. the generator takes one Adam step on L_G (Eq. 3-4, scored by the just-updated
   discriminators, as AttnGAN does) + lambda * TISCL (Eq. 6: the DAMSM loss of the frozen
   pretrained OAIE on the last stage's image against MATE's W and s, gamma1-3 from
   ``config.encoder``; with ``gan.tiscl_stages = "all"``, the mean over every stage's image)
   + the conditioning-augmentation KL term (AttnGAN's weight 1; none with
   ``gan.condition_augmentation = false``, where c = mu(s), see below);
5. an exponential moving average of the generator's parameters is updated; samples and
   checkpoints use it as ``generator_ema``.

Switches: ``use_memory=False`` / ``use_objects=False`` take the encoders of the matching
DAMSM ablation (plain text encoder / no object features), ``use_fgcd=False`` gives D^c
AttnGAN's sentence-conditioned head instead of the Fine-grained Conditional Discriminator;
all three off is AttnGAN+.

The run folder (``<artifacts>/runs/<name>/``, see :func:`run_name`) holds ``checkpoint.pt``,
``metrics.jsonl``, ``samples/step-NNNNNNN.png`` and ``config.json``, the contract shared with
``cpgan-eval`` / ``cpgan-sample``; every file is written atomically except ``metrics.jsonl``,
an append-only log whose lines beyond the checkpoint's step (including a torn last line) are
dropped, atomically, when a run resumes.

Exact resume. Every random draw of step ``t`` (z, the CA noise) comes from generators seeded
by ``(seed, t, rank)``, and the data of a step is a function of ``(seed, epoch, position)``
(:mod:`cpgan.trainer.data`), so a run resumed from the checkpoint of step ``t`` skips the
``t mod steps_per_epoch`` batches of its epoch already done and continues bit for bit.

Distributed. Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) the process group is
initialised (gloo on CPU, nccl on CUDA), the generator and the discriminators' Eq. 5 objective
are wrapped in DistributedDataParallel, every epoch's order is split across ranks as
DistributedSampler does (padded by repeating its head, rank r takes every world-th index from
r), ``--batch-size`` is per process, and rank 0 alone writes files or prints.

Conditioning augmentation. AttnGAN (and the paper, through it) draws G0's condition c from
N(mu(s), sigma(s)^2) and adds KL(N(mu, sigma^2) || N(0, I)) to G's loss. The logged ``loss_kl``
(a mean over c's dimensions) bounds what c can tell G of the sentence: I(c; s) <= condition_dim
* loss_kl nats. In the toy GAN it stays near 0.005 whether the KL term weighs 1 or 0, so c is
noise and G0 draws without knowing its caption. ``gan.condition_augmentation = false`` takes
c = mu(s) and drops the KL term (RESULTS.md, session 15).

EMA. AttnGAN keeps ``avg_param_G`` with decay 0.999. We use the same decay with the usual
warm-up ``min(0.999, (1 + t) / (10 + t))`` so that a short run's average is not dominated by
its first, untrained steps; past step ~9000 it is exactly 0.999. The toy preset's 1,500 steps
end at 0.994 (about the last tenth of the run); a decay of at most 0.99, or the live weights,
gave the same SOA-C on two seeds (RESULTS.md, session 37).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader
from tqdm import tqdm

from cpgan import layout
from cpgan.config import Config, config_defaults, dotted_keys, fill_new_keys
from cpgan.errors import CpganError
from cpgan.model.discriminator import Discriminators, spectral_norm_without_batch_norm
from cpgan.model.gan_losses import (
    discriminator_loss,
    generator_adversarial_loss_over_stages,
    kl_loss,
)
from cpgan.model.generator import Generator, GeneratorOutput, truncated_normal
from cpgan.model.image_encoder import ObjectAwareImageEncoder
from cpgan.model.losses import damsm_loss
from cpgan.model.text_encoder import MemoryAttendedTextEncoder
from cpgan.pipeline.artifacts import atomic_write, atomic_write_text, sweep_temporaries
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.text import PAD_ID, Vocabulary
from cpgan.torch_file import load_torch_file, refuse_nonfinite
from cpgan.trainer.data import (
    Batch,
    TextImageDataset,
    _worker_init,
    collate,
    epoch_order,
    multi_resolution_sizes,
)
from cpgan.trainer.resume import (
    load_optimizer_state,
    refusing_unfit_checkpoint,
    rng_state,
    set_rng_state,
)
from cpgan.trainer.sampling import build_generator, enlarge

RUN_STEM = layout.RUN_STEM  # in cpgan.layout: read without torch
FORMAT = 1
KIND = "cpgan-gan"
TRAIN_SPLIT = "train2014"
SAMPLE_SPLIT = "val2014"
EMA_DECAY = 0.999             # AttnGAN's avg_param_G
EMA_WARMUP = 10               # decay_t = min(EMA_DECAY, (1 + t) / (EMA_WARMUP + t))
KL_WEIGHT = 1.0               # AttnGAN's cfg.TRAIN.SMOOTH.LAMBDA on KL_loss
STEP_STREAM = 2               # keeps the GAN's draws apart from trainer/data.py's streams
SAMPLE_COUNT = 8              # images per sample grid
SAMPLE_NOISE_SEED = 12345     # the grids' fixed z, so successive grids are comparable
DEFAULT_CHECKPOINT_EVERY = layout.GAN_CHECKPOINT_EVERY  # in cpgan.layout: cpgan-train's defaults
DEFAULT_SAMPLE_EVERY = layout.GAN_SAMPLE_EVERY
DEFAULT_LOG_EVERY = layout.GAN_LOG_EVERY
CHECKPOINT_KEYS = frozenset({
    "format", "kind", "config", "switches", "encoders", "memory", "vocab_size", "generator",
    "generator_ema", "discriminators", "optimizer_g", "optimizer_d", "step", "epoch",
    "finished", "rng"})
# What a resumed run compares against its own settings (:func:`check_resumable`).
RECORDED_KEYS = ("config", "switches", "encoders", "memory", "vocab_size")
TISCL_STAGES = ("last", "all")  # gan.tiscl_stages: which stages' images TISCL scores
RESUMABLE_KEYS = ("gan.epochs",)  # may grow between a checkpoint and its resume


# --------------------------------------------------------------------------------------------
# Names and paths: a run's are in cpgan.layout (the up-to-date checks read them without torch)


@dataclass(frozen=True)
class Switches:
    """Which of CPGAN's three modules are on (all off: AttnGAN+)."""

    use_memory: bool = True
    use_objects: bool = True
    use_fgcd: bool = True

    def as_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)

    @property
    def name(self) -> str:
        return run_name(self.use_memory, self.use_objects, self.use_fgcd)


run_name = layout.run_name
check_run_name = layout.check_run_name
run_dir = layout.run_dir
checkpoint_file = layout.checkpoint_file
metrics_file = layout.metrics_file


def config_file(folder: Path) -> Path:
    return Path(folder) / "config.json"


def sample_file(folder: Path, step: int) -> Path:
    return Path(folder) / "samples" / f"step-{step:07d}.png"


def relative_to_root(root: Path, path: Path) -> str:
    """``path`` relative to the artifacts root, as the contract records ``models/damsm.pt``
    and ``memory.h5`` (a file outside the root gets a ``../`` path, still relative)."""
    return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()


# --------------------------------------------------------------------------------------------
# Models


D_NORMS = ("batch", "spectral")


def build_discriminators(config: Config, use_fgcd: bool = True) -> Discriminators:
    """D^uc and D^c (FGCD, Eq. 11, or AttnGAN's sentence head) for every stage, with BN or,
    for ``gan.d_norm = "spectral"``, spectral norm in its place."""
    g = config.gan
    if g.d_norm not in D_NORMS:
        raise CpganError(f"gan.d_norm is {g.d_norm!r}; choose from {', '.join(D_NORMS)}")
    try:
        discriminators = Discriminators(g.stages, g.df_dim, g.base_size, config.encoder.text_dim,
                                        g.fgcd_patches, fgcd=use_fgcd)
    except ValueError as exc:
        raise CpganError(f"gan sizes: {exc}") from None
    if g.d_norm == "spectral":
        spectral_norm_without_batch_norm(discriminators)
    return discriminators


class TextFeatures(NamedTuple):
    """MATE's output in the layouts the losses need, and the mask of real words."""

    words: Tensor      # [B, T, d] (generator and discriminators)
    sentence: Tensor   # [B, d]
    mask: Tensor       # [B, T] bool

    def rolled(self) -> "TextFeatures":
        """Every image's caption replaced by the next one's: the mismatched X-bar of Eq. 5."""
        return TextFeatures(*(t.roll(1, dims=0) for t in self))

    @property
    def words_by_dim(self) -> Tensor:
        """W as ``[B, d, T]`` (the DAMSM loss's layout)."""
        return self.words.transpose(1, 2)


@torch.no_grad()
def encode_text(text_encoder: MemoryAttendedTextEncoder, captions: Tensor,
                lengths: Tensor) -> TextFeatures:
    """Eq. 1 with the frozen encoder: W, s, and the real-word mask (token != <pad>)."""
    words, sentence = text_encoder(captions, lengths)
    return TextFeatures(words.transpose(1, 2).contiguous(), sentence, captions != PAD_ID)


class DiscriminatorObjective(nn.Module):
    """Eq. 5 summed over the stages, as one module so that DistributedDataParallel sees a single
    forward per discriminator update (each stage's parameters only get their own stage's
    gradient, so one Adam over the sum equals AttnGAN's one optimiser per stage)."""

    def __init__(self, discriminators: Discriminators) -> None:
        super().__init__()
        self.discriminators = discriminators

    def forward(self, real: list[Tensor], fake: list[Tensor],
                text: TextFeatures) -> tuple[Tensor, Tensor]:
        """(total loss, per-stage losses [stages]); ``fake`` must already be detached."""
        mismatched = text.rolled()
        losses = []
        for stage, real_images, fake_images in zip(self.discriminators.stages, real, fake):
            encoded_real, encoded_fake = stage.encode(real_images), stage.encode(fake_images)
            loss, _ = discriminator_loss(
                stage.unconditional_logits(encoded_real),
                stage.unconditional_logits(encoded_fake),
                stage.conditional_logits(encoded_real, *text).logits,
                stage.conditional_logits(encoded_fake, *text).logits,
                stage.conditional_logits(encoded_real, *mismatched).logits)
            losses.append(loss)
        per_stage = torch.stack(losses)
        return per_stage.sum(), per_stage.detach()


def adversarial_loss(discriminators: Discriminators, images: list[Tensor],
                     text: TextFeatures) -> Tensor:
    """L_G of Eq. 3-4: every stage's image scored by its D^uc and D^c (matching caption)."""
    logits = discriminators(images, *text)
    loss, _ = generator_adversarial_loss_over_stages(
        [s.unconditional for s in logits], [s.conditional for s in logits])
    return loss


def _encoded_damsm_loss(regions: Tensor, global_feature: Tensor, region_mask: Tensor,
                        text: TextFeatures, config: Config) -> Tensor:
    """The DAMSM loss of encoded images against ``text``, with ``gan.tiscl_gamma3`` in place
    of the encoders' gamma3 when it is set (> 0)."""
    e = config.encoder
    gamma3 = config.gan.tiscl_gamma3 or e.gamma3
    loss, _ = damsm_loss(text.words_by_dim, text.mask, text.sentence, regions, global_feature,
                         e.gamma1, e.gamma2, gamma3, region_mask=region_mask)
    return loss


def tiscl_loss(image_encoder: ObjectAwareImageEncoder, image: Tensor, text: TextFeatures,
               config: Config) -> Tensor:
    """TISCL (Eq. 6): the DAMSM loss of the frozen encoders on one batch of images."""
    encoded = image_encoder(image)
    return _encoded_damsm_loss(encoded.regions, encoded.global_feature, encoded.region_mask,
                               text, config)


def stages_tiscl(image_encoder: ObjectAwareImageEncoder, images: list[Tensor],
                 text: TextFeatures, config: Config) -> Tensor:
    """TISCL of ``gan.tiscl_stages``: on the last stage's image ("last", Eq. 6 as the paper),
    or the mean over every stage's image enlarged (bilinear) to the last one's size ("all",
    ours: what made the toy GAN's 16-pixel stage draw its caption; RESULTS.md, session 15).
    The stages go through the encoder as one batch."""
    scored = images if config.gan.tiscl_stages == "all" else images[-1:]
    size = scored[-1].shape[-1]
    batch = torch.cat([enlarge(image, size) for image in scored])
    if config.gan.tiscl_channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    encoded = image_encoder(batch)
    parts = zip(encoded.regions.chunk(len(scored)), encoded.global_feature.chunk(len(scored)),
                encoded.region_mask.chunk(len(scored)))
    return torch.stack([_encoded_damsm_loss(regions, feature, mask, text, config)
                        for regions, feature, mask in parts]).mean()


def generator_objective(discriminators: Discriminators, output: GeneratorOutput,
                        text: TextFeatures, image_encoder: ObjectAwareImageEncoder,
                        config: Config) -> tuple[Tensor, dict[str, Tensor]]:
    """L_G (Eq. 3-4) + lambda * TISCL (Eq. 6) + KL; the parts (detached) for logging."""
    adversarial = adversarial_loss(discriminators, output.images, text)
    tiscl = stages_tiscl(image_encoder, output.images, text, config)
    kl = kl_loss(output.mu, output.logvar)  # logged either way: it bounds what c tells of s
    kl_weight = KL_WEIGHT if config.gan.condition_augmentation else 0.0
    total = adversarial + config.gan.tiscl_lambda * tiscl + kl_weight * kl
    return total, {"loss_g_adv": adversarial.detach(), "loss_tiscl": tiscl.detach(),
                   "loss_kl": kl.detach()}


@torch.no_grad()
def update_ema(average: nn.Module, model: nn.Module, step: int) -> None:
    """EMA of the parameters (decay warmed up, see the module docstring); buffers copied."""
    decay = min(EMA_DECAY, (1 + step) / (EMA_WARMUP + step))
    for avg, param in zip(average.parameters(), model.parameters()):
        avg.lerp_(param.detach(), 1.0 - decay)
    for avg, buffer in zip(average.buffers(), model.buffers()):
        avg.copy_(buffer)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of every random draw of step ``step`` on ``rank``."""
    return int(np.random.SeedSequence([seed, STEP_STREAM, step, rank]).generate_state(1)[0])


def sample_noise(batch: int, config: Config, seed: int, device: torch.device) -> Tensor:
    """Truncated Gaussian z (§4.1) from a generator seeded by ``seed``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return truncated_normal((batch, config.gan.z_dim), config.gan.truncation,
                            generator=generator, device=device)


# --------------------------------------------------------------------------------------------
# Training state and one step


@dataclass
class GanState:
    """The trained modules, their optimisers and the step count; ``g_model`` / ``d_model``
    are what the step calls (DistributedDataParallel wrappers under torchrun)."""

    generator: Generator
    generator_ema: Generator
    discriminators: Discriminators
    optimizer_g: torch.optim.Optimizer
    optimizer_d: torch.optim.Optimizer
    g_model: nn.Module
    d_model: nn.Module
    step: int = 0


def build_state(config: Config, use_fgcd: bool, device: torch.device,
                distributed: "Distributed | None" = None) -> GanState:
    """Fresh G, its EMA copy, the discriminators and Adam (config.gan lr_g / lr_d, beta1, beta2)."""
    torch.manual_seed(config.seed)
    generator = build_generator(config).to(device)
    discriminators = build_discriminators(config, use_fgcd).to(device)
    ema = copy.deepcopy(generator).requires_grad_(False).eval()
    g = config.gan
    betas = (g.beta1, g.beta2)
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=g.lr_g, betas=betas)
    optimizer_d = torch.optim.Adam(discriminators.parameters(), lr=g.lr_d, betas=betas)
    g_model: nn.Module = generator
    d_model: nn.Module = DiscriminatorObjective(discriminators)
    if distributed is not None and distributed.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        unused = g.stages == 1  # one stage leaves the C0 residual path out of the graph
        g_model = DDP(g_model, device_ids=ids, find_unused_parameters=unused)
        d_model = DDP(d_model, device_ids=ids)
    return GanState(generator, ema, discriminators, optimizer_g, optimizer_d, g_model, d_model)


def discriminator_step(state: GanState, real: list[Tensor], fake: list[Tensor],
                       text: TextFeatures) -> tuple[float, list[float]]:
    """One Adam step of every stage's discriminators on Eq. 5. With ``gan.d_norm =
    "spectral"``, each step normalises every weight once (one power iteration), not once per
    call: D sees real and fake images in separate calls, and the repeats cost about 5 % of a
    toy step (``parametrize.cached``; a no-op for the BN discriminators)."""
    state.discriminators.requires_grad_(True)
    with parametrize.cached():
        loss, per_stage = state.d_model(list(real), [f.detach() for f in fake], text)
        state.optimizer_d.zero_grad(set_to_none=True)
        loss.backward()
    state.optimizer_d.step()
    return loss.item(), per_stage.tolist()


def generator_step(state: GanState, output: GeneratorOutput, text: TextFeatures,
                   image_encoder: ObjectAwareImageEncoder, config: Config) -> dict[str, float]:
    """One Adam step of the generator; the discriminators are frozen meanwhile (and called
    unwrapped, so DistributedDataParallel never sees a backward it did not prepare)."""
    state.discriminators.requires_grad_(False)
    total, parts = generator_objective(state.discriminators, output, text, image_encoder, config)
    state.optimizer_g.zero_grad(set_to_none=True)
    total.backward()
    state.optimizer_g.step()
    state.discriminators.requires_grad_(True)
    return {"loss_g": total.item(), **{k: v.item() for k, v in parts.items()}}


def train_step(state: GanState, batch: Batch, encoders: "Encoders", config: Config,
               seed: int) -> dict[str, float]:
    """One D update then one G update on ``batch``; every draw is seeded by ``seed``."""
    device = next(state.generator.parameters()).device
    torch.manual_seed(seed)  # the CA noise (global RNG) of this step, and nothing else
    batch = batch.to(device)
    text = encode_text(encoders.text, batch.captions, batch.lengths)
    z = sample_noise(len(batch), config, seed, device)
    state.generator.train()
    state.discriminators.train()
    output = state.g_model(z, text.sentence, text.words, text.mask)
    loss_d, per_stage = discriminator_step(state, batch.images, output.images, text)
    g_parts = generator_step(state, output, text, encoders.image, config)
    state.step += 1
    update_ema(state.generator_ema, state.generator, state.step)
    values = {"loss_d": loss_d, **g_parts}
    values.update({f"loss_d{i}": v for i, v in enumerate(per_stage)})
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise CpganError(f"GAN training diverged at step {state.step} ({bad[0]} = "
                         f"{values[bad[0]]}); lower gan.lr_g / gan.lr_d or restart from the last "
                         f"checkpoint")
    return values


# --------------------------------------------------------------------------------------------
# Encoders, distributed context, data


@dataclass
class Encoders:
    """The frozen pretrained MATE and OAIE, and where they came from (for the checkpoint)."""

    text: MemoryAttendedTextEncoder
    image: ObjectAwareImageEncoder
    path: str            # relative to the artifacts root, e.g. models/damsm.pt
    memory: str | None   # memory.h5 (relative to the root) or None


def load_encoders(root: Path, vocab: Vocabulary, config: Config, switches: Switches,
                  memory_path: Path | None, detector: nn.Module | None,
                  inception_weights: Path | None, device: torch.device) -> Encoders:
    """``models/damsm*.pt`` of the run's switches, checked against everything it needs."""
    from cpgan.trainer.damsm import load_pretrained_encoders, model_path

    path = model_path(Path(root) / "models", switches.use_memory, switches.use_objects)
    memory = (memory_path or Path(root) / layout.MEMORY_NAME) if switches.use_memory else None
    text, image = load_pretrained_encoders(path, vocab, config, memory,
                                           detector if switches.use_objects else None,
                                           inception_weights, device)
    if text.uses_memory != switches.use_memory or image.use_objects != switches.use_objects:
        raise CpganError(f"{path}: encoders were trained with use_memory={text.uses_memory}, "
                         f"use_objects={image.use_objects}; this run needs "
                         f"{switches.use_memory}, {switches.use_objects}")
    return Encoders(text, image, relative_to_root(root, path),
                    relative_to_root(root, memory) if memory is not None else None)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def distributed_from_env() -> Distributed:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; absent: a single process."""
    if not layout.under_torchrun():
        return Distributed()
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise CpganError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") \
            from None
    if world < 1 or not 0 <= rank < world:
        raise CpganError(f"RANK {rank} outside WORLD_SIZE {world}")
    return Distributed(rank, world, local)


def init_distributed(device: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun process group when there is one (gloo on CPU, nccl on CUDA);
    a CUDA device becomes ``cuda:LOCAL_RANK``."""
    context = distributed_from_env()
    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise CpganError(f"--device {device}: CUDA is not available on this machine")
        if context.active or target.index is None:
            target = torch.device("cuda", context.local_rank if context.active else 0)
        torch.cuda.set_device(target)
    if context.active and not dist.is_initialized():
        if not dist.is_available():
            raise CpganError("torch.distributed is not available in this torch build")
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return context, target


def rank_order(count: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's share of epoch ``epoch``'s order, as DistributedSampler splits it: the
    order padded with its own head to a multiple of ``world``, then every world-th index."""
    order = epoch_order(count, seed, epoch)
    total = math.ceil(count / world) * world
    order = (order * math.ceil(total / max(count, 1)))[:total]
    return order[rank:total:world]


def steps_per_epoch(count: int, batch_size: int, world: int) -> int:
    """Full batches per epoch and process (the last, incomplete batch is dropped, as in
    AttnGAN: batch norm and the in-batch DAMSM loss want full batches)."""
    return math.ceil(count / world) // batch_size


def epoch_batches(dataset: TextImageDataset, batch_size: int, epoch: int, start: int,
                  context: Distributed, num_workers: int) -> Iterator[Batch]:
    """Batches ``start``, ``start + 1``, ... of ``epoch`` for this rank (earlier ones skipped
    without decoding anything)."""
    steps = steps_per_epoch(len(dataset), batch_size, context.world_size)
    order = rank_order(len(dataset), dataset.seed, epoch, context.rank, context.world_size)
    dataset.epoch = epoch
    sampler = order[start * batch_size:steps * batch_size]
    if not sampler:
        return iter(())
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=num_workers,
                        worker_init_fn=_worker_init if num_workers else None)
    return iter(loader)


# --------------------------------------------------------------------------------------------
# Checkpoints and the run folder


def _state_dict(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


def _rng_state(seed: int) -> dict[str, Any]:
    """Steps reseed every draw from (seed, step, rank); the global states are kept as well."""
    return {"seed": seed, **rng_state()}


@dataclass
class RunInfo:
    """What a checkpoint records besides the weights."""

    config: Config
    switches: Switches
    encoders: Encoders
    vocab_size: int
    steps_per_epoch: int
    total_steps: int


def make_checkpoint(state: GanState, info: RunInfo) -> dict[str, Any]:
    """The contract's checkpoint dict (exactly :data:`CHECKPOINT_KEYS`)."""
    return {
        "format": FORMAT, "kind": KIND, "config": info.config.to_dict(),
        "switches": info.switches.as_dict(), "encoders": info.encoders.path,
        "memory": info.encoders.memory, "vocab_size": info.vocab_size,
        "generator": _state_dict(state.generator),
        "generator_ema": _state_dict(state.generator_ema),
        "discriminators": _state_dict(state.discriminators),
        "optimizer_g": state.optimizer_g.state_dict(),
        "optimizer_d": state.optimizer_d.state_dict(),
        "step": state.step, "epoch": min(state.step // max(info.steps_per_epoch, 1),
                                         info.config.gan.epochs),
        "finished": state.step >= info.total_steps, "rng": _rng_state(info.config.seed),
    }


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A GAN checkpoint, read with ``weights_only=True`` and checked for the contract's keys."""
    data = load_torch_file(path, "GAN checkpoint")
    if not isinstance(data, dict) or data.get("kind") != KIND or \
            type(data.get("format")) is not int or data["format"] != FORMAT:
        raise CpganError(f"{path}: not a CPGAN GAN checkpoint (format {FORMAT}, kind {KIND})")
    if set(data) != CHECKPOINT_KEYS:
        missing = sorted(CHECKPOINT_KEYS - set(data)) or sorted(set(data) - CHECKPOINT_KEYS)
        raise CpganError(f"{path}: checkpoint keys differ from the contract ({missing[0]})")
    for part in ("generator", "generator_ema", "discriminators"):
        if not isinstance(data[part], dict) or \
                not all(isinstance(v, Tensor) for v in data[part].values()):
            raise CpganError(f"{path}: '{part}' is not a state dict of tensors")
        refuse_nonfinite(path, data[part], f"'{part}'")
    if not isinstance(data["config"], dict):
        raise CpganError(f"{path}: 'config' is not a dict of settings")
    for key in RECORDED_KEYS:
        if not _is_plain_data(data[key]):
            raise CpganError(f"{path}: '{key}' holds something other than plain settings "
                             "(strings, numbers, booleans, lists, dicts)")
    if type(data["step"]) is not int or data["step"] < 0:
        raise CpganError(f"{path}: 'step' must be a non-negative integer")
    return data


def _is_plain_data(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is what JSON can hold (so ``!=`` against this run's values is a plain
    yes or no, never a tensor's element-wise answer)."""
    if depth > 32:
        return False
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_is_plain_data(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain_data(v, depth + 1) for k, v in value.items())
    return False


def config_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first setting (dotted key) that differs, ignoring :data:`RESUMABLE_KEYS`. A key
    the checkpoint predates counts as its :class:`Config` default
    (:func:`cpgan.config.fill_new_keys`)."""
    current = json.loads(json.dumps(current))
    old, new = dotted_keys(fill_new_keys(stored, current, config_defaults())), dotted_keys(current)
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_KEYS and old.get(key) != new.get(key):
            return f"{key} = {old.get(key)!r} in the checkpoint, {new.get(key)!r} now"
    return None


def check_resumable(path: Path, data: dict[str, Any], info: RunInfo) -> None:
    """Refuse, in one line, a checkpoint of another config, variant, encoder or vocabulary."""
    expected = {"switches": info.switches.as_dict(), "encoders": info.encoders.path,
                "memory": info.encoders.memory, "vocab_size": info.vocab_size}
    for key, value in expected.items():
        if data[key] != value:
            raise CpganError(f"{path}: checkpoint has {key} = {data[key]!r}, this run "
                             f"{value!r}; remove it (or drop --resume) to restart")
    difference = config_difference(data["config"], info.config.to_dict())
    if difference:
        raise CpganError(f"{path}: checkpoint was trained with another config ({difference}); "
                         "remove it (or drop --resume) to restart")
    if int(data["step"]) > info.total_steps:
        raise CpganError(f"{path}: checkpoint is at step {data['step']}, beyond the "
                         f"{info.total_steps} steps of {info.config.gan.epochs} epochs")


def restore_state(state: GanState, data: dict[str, Any], path: Path) -> None:
    with refusing_unfit_checkpoint(path):
        state.generator.load_state_dict(data["generator"])
        state.generator_ema.load_state_dict(data["generator_ema"])
        state.discriminators.load_state_dict(data["discriminators"])
        load_optimizer_state(state.optimizer_g, data["optimizer_g"])
        load_optimizer_state(state.optimizer_d, data["optimizer_d"])
        set_rng_state(data["rng"])
    state.step = int(data["step"])


def truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the log's lines up to ``step`` (a torn or unparsable line ends the log), rewritten
    atomically; returns them."""
    kept: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                break
            if row["step"] <= step:
                kept.append(row)
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    return kept


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()


# --------------------------------------------------------------------------------------------
# Sample grids


@dataclass
class SampleSet:
    """The progress grids' fixed captions (val split): token ids, lengths and the raw text."""

    captions: Tensor
    lengths: Tensor
    texts: list[str]


def sample_set(coco_root: Path, vocab: Vocabulary, config: Config) -> SampleSet:
    """The first :data:`SAMPLE_COUNT` val images' fixed captions (the evaluation pairing)."""
    split = CocoSplit.open(coco_root, SAMPLE_SPLIT)
    dataset = TextImageDataset(split, vocab, config.data.max_caption_words, [8], augment=False,
                               seed=config.seed, limit=SAMPLE_COUNT)
    if len(dataset) == 0:
        raise CpganError(f"{split.captions_file}: no captioned image for the sample grids")
    items = [dataset[index] for index in range(len(dataset))]
    texts = [dict(split.captions(item.image_id))[item.caption_id] for item in items]
    return SampleSet(torch.stack([item.caption for item in items]),
                     torch.tensor([item.length for item in items]), texts)


@torch.no_grad()
def render_samples(generator: Generator, encoders: Encoders, samples: SampleSet,
                   config: Config, device: torch.device) -> np.ndarray:
    """The EMA generator's last-stage images for the fixed captions, uint8 ``[N, S, S, 3]``
    (eval mode, c = mu, fixed z: successive grids differ only by training)."""
    text = encode_text(encoders.text, samples.captions.to(device), samples.lengths.to(device))
    z = sample_noise(len(samples.texts), config, SAMPLE_NOISE_SEED, device)
    was_training = generator.training
    generator.eval()
    images = generator(z, text.sentence, text.words, text.mask, sample_condition=False).images[-1]
    generator.train(was_training)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def write_sample_grid(path: Path, images: np.ndarray, captions: list[str], title: str) -> None:
    """One row of images with each caption wrapped under its image, as a PNG (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count = len(images)
    figure = Figure(figsize=(1.9 * count, 2.9))
    FigureCanvasAgg(figure)
    for i, (image, caption) in enumerate(zip(images, captions)):
        axis = figure.add_subplot(1, count, i + 1)
        axis.imshow(image, interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_xlabel("\n".join(textwrap.wrap(caption, 24)[:5]), fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class GanRun:
    """What :func:`train_gan` returns: the outputs and the figures for the summary line."""

    run: str
    folder: Path
    checkpoint: Path
    steps: int
    epochs: int
    steps_trained: int
    train_images: int
    skipped_images: int
    processes: int
    batch_size: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        """Training images per second over all processes (set-up time included)."""
        images = self.steps_trained * self.batch_size * self.processes
        return images / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"folder": str(self.folder),
                                           "checkpoint": str(self.checkpoint),
                                           "images_per_second": self.images_per_second}


def train_gan(
    coco_root: Path,
    root: Path,
    config: Config,
    vocab: Vocabulary,
    switches: Switches = Switches(),
    *,
    memory_path: Path | None = None,
    detector: nn.Module | None = None,
    inception_weights: Path | None = None,
    name: str | None = None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    limit: int | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    sample_every: int = DEFAULT_SAMPLE_EVERY,
    log_every: int = DEFAULT_LOG_EVERY,
    num_workers: int = 0,
    threads: int | None = None,
) -> GanRun:
    """Train the GAN on ``coco_root``'s train split into ``<root>/runs/<name>/``.

    The encoders are ``<root>/models/damsm*.pt`` for the switches (trained beforehand by
    ``cpgan-train --stage damsm``), with ``memory_path`` (default ``<root>/memory.h5``) when
    they use memory and ``detector`` (a loaded Darknet) when they use objects. ``resume``
    continues from ``checkpoint.pt`` when there is one (refusing a checkpoint of another
    config); otherwise training starts over and replaces the folder's log and samples.
    ``limit`` keeps the first N captioned train images; ``threads`` pins torch's threads
    (default: the cores available to this process, shared between local torchrun ranks).
    """
    from cpgan.trainer.detector import choose_threads

    for label, value in (("checkpoint_every", checkpoint_every), ("sample_every", sample_every),
                         ("log_every", log_every)):
        if value < 1:
            raise CpganError(f"{label} must be at least 1, got {value}")
    joined = dist.is_available() and dist.is_initialized()
    context, target = init_distributed(device)
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size)))
    previous = torch.get_num_threads()
    wanted = threads if threads is not None else max(1, choose_threads() // local_world)
    torch.set_num_threads(max(1, wanted))
    try:
        job = _Job(Path(coco_root), Path(root), config, vocab, switches, memory_path, detector,
                   inception_weights, name or switches.name, target, context, progress, limit,
                   checkpoint_every, sample_every, log_every, num_workers)
        return job.run(resume)
    finally:
        torch.set_num_threads(previous)
        if context.active and not joined and dist.is_initialized():
            dist.destroy_process_group()


class _Job:
    """One training run: set-up, the loop, and everything rank 0 writes."""

    def __init__(self, coco_root: Path, root: Path, config: Config, vocab: Vocabulary,
                 switches: Switches, memory_path: Path | None, detector: nn.Module | None,
                 inception_weights: Path | None, name: str, device: torch.device,
                 context: Distributed, progress: bool, limit: int | None,
                 checkpoint_every: int, sample_every: int, log_every: int,
                 num_workers: int) -> None:
        g = config.gan
        if g.tiscl_stages not in TISCL_STAGES:
            raise CpganError(f"gan.tiscl_stages must be one of {', '.join(TISCL_STAGES)}, got "
                             f"{g.tiscl_stages!r}")
        if g.epochs < 0 or g.batch_size < 2 or min(g.lr_g, g.lr_d) <= 0 or g.tiscl_gamma3 < 0:
            raise CpganError(f"the GAN needs gan.epochs >= 0, gan.batch_size >= 2, "
                             f"gan.lr_g, gan.lr_d > 0 and gan.tiscl_gamma3 >= 0, got {g.epochs}, "
                             f"{g.batch_size}, {g.lr_g}, {g.lr_d}, {g.tiscl_gamma3}")
        self.config, self.switches, self.name = config, switches, check_run_name(name)
        self.coco_root, self.root, self.vocab = coco_root, root, vocab
        self.device, self.context, self.progress = device, context, progress and context.is_main
        self.checkpoint_every, self.sample_every = checkpoint_every, sample_every
        self.log_every, self.num_workers = log_every, num_workers
        self.folder = run_dir(root, self.name)
        sizes = multi_resolution_sizes(g.base_size, g.stages)
        self.dataset = TextImageDataset(CocoSplit.open(coco_root, TRAIN_SPLIT), vocab,
                                        config.data.max_caption_words, sizes, augment=True,
                                        seed=config.seed, limit=limit,
                                        mirror_captions=g.mirror_captions)
        spe = steps_per_epoch(len(self.dataset), g.batch_size, context.world_size)
        if spe < 1:
            raise CpganError(f"{coco_root}: {len(self.dataset)} captioned train images give no "
                             f"full batch of {g.batch_size} per process (x{context.world_size})")
        self.encoders = load_encoders(root, vocab, config, switches, memory_path, detector,
                                      inception_weights, device)
        self.info = RunInfo(config, switches, self.encoders, len(vocab), spe, spe * g.epochs)
        self.state = build_state(config, switches.use_fgcd, device, context)
        self.failures: dict[int, str] = {}
        self.last: dict[str, Any] = {}
        self.samples: SampleSet | None = None
        self.saved_step = -1

    # ---------------------------------------------------------------------- set-up

    def _start(self, resume: bool) -> None:
        """Restore the checkpoint (resume) or start over; rank 0 prepares the folder."""
        path = checkpoint_file(self.folder)
        if resume and path.is_file():
            data = read_checkpoint(path)
            check_resumable(path, data, self.info)
            restore_state(self.state, data, path)
            self.saved_step = self.state.step
        elif self.context.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            for old in (path, *sorted((self.folder / "samples").glob("step-*.png"))):
                old.unlink(missing_ok=True)
        if self.context.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            for folder in (self.folder, self.folder / "samples"):
                sweep_temporaries(folder)  # what a killed run was writing
            kept = truncate_metrics(metrics_file(self.folder), self.state.step)
            self.last = kept[-1] if kept else {}
            atomic_write_text(config_file(self.folder),
                              json.dumps(self.config.to_dict(), indent=1, sort_keys=True) + "\n")
            self.samples = sample_set(self.coco_root, self.vocab, self.config)
        self.context.barrier()

    # ---------------------------------------------------------------------- the loop

    def run(self, resume: bool) -> GanRun:
        start_time = time.perf_counter()
        self._start(resume)
        first_step = self.state.step
        spe, total = self.info.steps_per_epoch, self.info.total_steps
        bar = tqdm(total=total, initial=first_step, desc=self.name, unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            while self.state.step < total:
                epoch, position = divmod(self.state.step, spe)
                for batch in epoch_batches(self.dataset, self.config.gan.batch_size, epoch,
                                           position, self.context, self.num_workers):
                    self._one_step(batch, epoch, bar)
        finally:
            bar.close()
        if self.context.is_main:
            if self.saved_step != self.state.step:
                self._save()
            if not sample_file(self.folder, self.state.step).is_file():
                self._sample()
        self.context.barrier()
        seconds = time.perf_counter() - start_time
        return GanRun(self.name, self.folder, checkpoint_file(self.folder), self.state.step,
                      self.config.gan.epochs, self.state.step - first_step, len(self.dataset),
                      len(self.failures), self.context.world_size, self.config.gan.batch_size,
                      seconds, dict(self.last))

    def _one_step(self, batch: Batch, epoch: int, bar: tqdm) -> None:
        self.failures.update(batch.failed)
        seed = step_seed(self.config.seed, self.state.step, self.context.rank)
        if self._too_small(batch):
            self.state.step += 1  # nothing to learn from; keep the data position in step
            values: dict[str, float] = {}
        else:
            values = train_step(self.state, batch, self.encoders, self.config, seed)
        step = self.state.step
        if not self.context.is_main:
            return
        if values:
            bar.set_postfix(d=f"{values['loss_d']:.3f}", g=f"{values['loss_g_adv']:.3f}",
                            tiscl=f"{values['loss_tiscl']:.3f}", refresh=False)
            self.last = {"step": step, "epoch": epoch + 1, **values}
            if step % self.log_every == 0:
                append_metrics(metrics_file(self.folder), self.last)
        bar.update(1)
        if step % self.checkpoint_every == 0:
            self._save()
        if step % self.sample_every == 0:
            self._sample()

    def _too_small(self, batch: Batch) -> bool:
        """A batch with fewer than 2 decoded images (batch norm and the in-batch DAMSM loss
        need two) is skipped on every rank alike."""
        size = torch.tensor([len(batch)], dtype=torch.long)
        if self.context.active:
            size = size.to(self.device)
            dist.all_reduce(size, op=dist.ReduceOp.MIN)
        return int(size.item()) < 2

    def _save(self) -> None:
        save_checkpoint(checkpoint_file(self.folder), make_checkpoint(self.state, self.info))
        self.saved_step = self.state.step

    def _sample(self) -> None:
        assert self.samples is not None  # set by _start on rank 0, the only rank that samples
        images = render_samples(self.state.generator_ema, self.encoders, self.samples,
                                self.config, self.device)
        write_sample_grid(sample_file(self.folder, self.state.step), images, self.samples.texts,
                          f"{self.name}, step {self.state.step} (EMA generator)")
