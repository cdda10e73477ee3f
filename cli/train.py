"""``cpgan-train``: DAMSM pretraining of the encoders, then the GAN.

Stages, in the order the paper trains them:

* ``damsm`` -- pretrain the text encoder (MATE, with the memory bank) and the image encoder
  (OAIE, with the frozen detector) on real (image, caption) pairs with the DAMSM loss
  (:mod:`cpgan.trainer.damsm`); writes ``models/damsm.pt``, skipped when it is up to date;
* ``gan`` -- the 3-stage GAN with the frozen pretrained encoders (:mod:`cpgan.trainer.gan`);
  writes ``runs/cpgan/`` (checkpoint.pt, metrics.jsonl, samples/, config.json), skipped when
  it is finished and up to date;
* ``all`` (default) -- ``damsm`` when its model is missing or stale, then ``gan``.

Ablations write their own files so they never replace the main ones: ``--no-memory``
gives ``models/damsm-no-memory.pt`` (plain AttnGAN text encoder), ``--no-oaie``
``models/damsm-no-oaie.pt`` (no object features V_o), both ``damsm-no-memory-no-oaie.pt``;
the GAN runs ``runs/cpgan-no-memory/`` etc., ``--no-fgcd`` adding ``-no-fgcd`` (all three:
AttnGAN+). The main runs' provenance are the ``damsm`` and ``gan`` stage records
(``models/damsm.provenance.json``, ``runs/cpgan/gan.provenance.json``, shown by
``cpgan-prep status``); an ablation, or a run renamed with ``--name``, keeps the same kind of
record beside its outputs (``models/damsm-no-memory.provenance.json``,
``runs/cpgan-no-fgcd/gan.provenance.json``).

``--epochs`` and ``--batch-size`` set the trained stage's values: ``encoder.*`` for
``--stage damsm``, ``gan.*`` for ``gan`` and ``all`` (whose damsm part keeps the preset's).
Under ``torchrun`` the GAN trains with DistributedDataParallel (``--batch-size`` per process);
the encoders must then be trained already.
"""
from __future__ import annotations

import abc
import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from cpgan import layout
from cpgan.cli.common import RunContext, common_options, report_errors
from cpgan.config import config_defaults
from cpgan.errors import CpganError
from cpgan.pipeline import artifacts

STAGES = ("damsm", "gan", "all")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@common_options
@click.option("--stage", type=click.Choice(STAGES), default="all", show_default=True,
              help="damsm: pretrain the encoders; gan: train the GAN; "
              "all: damsm when models/damsm.pt is missing or stale, then gan.")
@click.option("--memory", "memory_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="The memory bank from 'cpgan-prep build-memory'. "
              "Default: <artifacts>/memory.h5.")
@click.option("--no-memory", is_flag=True,
              help="Ablation: plain AttnGAN text encoder (no memory); writes "
              "models/damsm-no-memory.pt.")
@click.option("--no-oaie", is_flag=True,
              help="Ablation: no object features V_o in the image encoder (AttnGAN's); "
              "writes models/damsm-no-oaie.pt.")
@click.option("--no-fgcd", is_flag=True,
              help="Ablation: AttnGAN's sentence-conditioned discriminator instead of the "
              "Fine-grained Conditional Discriminator (GAN stage only). All three switches: "
              "AttnGAN+.")
@click.option("--detector-weights", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Detector for V_o: models/detector.pt from "
              "'cpgan-prep train-detector' or a Darknet .weights file for the preset's cfg. "
              "Default: <artifacts>/models/detector.pt.")
@click.option("--inception-weights", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="torchvision's ImageNet Inception-v3 weights "
              "(inception_v3_google-0cc3c7bd.pth); needed by the paper preset, whose image "
              "encoder uses a frozen Inception-v3.")
@click.option("--epochs", type=click.IntRange(min=0), default=None,
              help="Training epochs of the trained stage (default: the preset's encoder.epochs "
              "for --stage damsm, gan.epochs otherwise).")
@click.option("--batch-size", type=click.IntRange(min=2), default=None,
              help="Images per step (per process under torchrun) of the trained stage "
              "(default: the preset's encoder.batch_size / gan.batch_size).")
@click.option("--device", default="cpu", show_default=True,
              help="torch device, e.g. cuda (cuda:LOCAL_RANK under torchrun).")
@click.option("--resume", is_flag=True,
              help="Continue from the last checkpoint: the last finished epoch of "
              "models/damsm*.ckpt.pt, the last saved step of runs/<name>/checkpoint.pt "
              "(a run killed mid-way continues exactly).")
@click.option("--limit", type=click.IntRange(min=2), default=None,
              help="Train on the first N captioned train images only (quick trials).")
@click.option("--name", default=None,
              help="GAN run folder name under <artifacts>/runs/ (default: cpgan, or "
              "cpgan-no-memory-... for ablations).")
@click.option("--checkpoint-every", type=click.IntRange(min=1),
              default=layout.GAN_CHECKPOINT_EVERY, show_default=True,
              help="GAN: write runs/<name>/checkpoint.pt every N steps (and at the end).")
@click.option("--sample-every", type=click.IntRange(min=1), default=layout.GAN_SAMPLE_EVERY,
              show_default=True,
              help="GAN: write a captioned sample grid of the EMA generator every N steps.")
@click.option("--log-every", type=click.IntRange(min=1), default=layout.GAN_LOG_EVERY,
              show_default=True, help="GAN: append the losses to metrics.jsonl every N steps.")
@click.option("--val-limit", type=click.IntRange(min=2), default=None,
              help="Validate on the first N captioned val images only.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Image-decoding loader processes (0: decode in the training process).")
def cli(run: RunContext, stage: str, memory_path: Path | None, no_memory: bool, no_oaie: bool,
        no_fgcd: bool, detector_weights: Path | None, inception_weights: Path | None,
        epochs: int | None, batch_size: int | None, device: str, resume: bool,
        limit: int | None, name: str | None, checkpoint_every: int, sample_every: int,
        log_every: int, val_limit: int | None, workers: int) -> None:
    """Train CPGAN on the artifacts of cpgan-prep (toy dataset by default).

    \b
    Typical use, once the cpgan-prep stages have run (make-toy, vocab, train-detector,
    detect, train-attention, attend, build-memory; see 'cpgan-prep status'):
      cpgan-train --stage damsm              # pretrain the encoders -> models/damsm.pt
      cpgan-train --stage damsm --no-memory  # the ablation -> models/damsm-no-memory.pt
      cpgan-train                            # damsm if needed, then the GAN -> runs/cpgan/
      torchrun --nproc_per_node 2 -m cpgan.cli.train --stage gan   # data-parallel GAN

    Each DAMSM epoch prints the validation loss and R-precision (image global feature vs
    sentence vector, 1 true caption against 99 random ones, 10 folds; and the in-batch
    variant of the CPGAN release). The GAN shows its losses in the progress bar, logs them to
    runs/<name>/metrics.jsonl and draws captioned samples of its EMA generator to
    runs/<name>/samples/. A finished, up-to-date model or run is not retrained.
    """
    section = run.config.encoder if stage == "damsm" else run.config.gan
    if epochs is not None:
        section.epochs = epochs
    if batch_size is not None:
        section.batch_size = batch_size
    if stage in ("damsm", "all"):
        _damsm_stage(run, memory_path, not no_memory, not no_oaie, detector_weights,
                     inception_weights, device, resume, limit, val_limit, workers)
    if stage in ("gan", "all"):
        options = GanOptions(device, resume, limit, name, checkpoint_every, sample_every,
                             log_every, workers)
        job = GanJob(run, memory_path, (not no_memory, not no_oaie, not no_fgcd),
                     detector_weights, inception_weights, options)
        if job.is_current():
            click.echo(f"gan [{job.name}]: up to date ({job.folder}); {job.describe()}")
        else:
            job.train()


def _damsm_stage(run: RunContext, memory_path: Path | None, use_memory: bool,
                 use_objects: bool, detector_weights: Path | None,
                 inception_weights: Path | None, device: str, resume: bool, limit: int | None,
                 val_limit: int | None, workers: int) -> None:
    """Train the encoders unless they are up to date (never inside a torchrun job)."""
    job = DamsmJob(run, memory_path, use_memory, use_objects, detector_weights,
                   inception_weights, limit, val_limit)
    if job.is_current():
        click.echo(f"damsm [{job.name}]: up to date ({job.model}); {job.describe()}")
        return
    # imported after the up-to-date check: torch and torchvision take ~5 s to import
    from cpgan.trainer.gan import distributed_from_env

    if distributed_from_env().active:
        raise CpganError(f"{job.model}: the DAMSM encoders are missing or stale; train them "
                         "first with 'cpgan-train --stage damsm' (not under torchrun)")
    job.train(device, resume, workers)


class _TrainingJob(abc.ABC):
    """What the damsm and gan stages share: the input files one variant reads (resolved and
    checked before any work), and its provenance record (the stage's own for the main model,
    one beside the variant's output for an ablation)."""

    stage: str

    def __init__(self, run: RunContext, memory_path: Path | None, use_memory: bool,
                 use_objects: bool, detector_weights: Path | None,
                 inception_weights: Path | None) -> None:
        self.run = run
        self.root = run.artifacts
        self.memory_path = (memory_path or self.root / layout.MEMORY_NAME) if use_memory else None
        self.detector_weights = ((detector_weights or self.root / "models" / layout.DETECTOR_NAME)
                                 if use_objects else None)
        self.detector_cfg = run.project_path(run.config.detector.cfg) if use_objects else None
        self.inception_weights = inception_weights
        self.vocab_path = self.root / layout.VOCAB_NAME
        self._check_inputs_exist()

    def _check_inputs_exist(self) -> None:
        """Fail before any work (and before the toy dataset is generated) on a missing file."""
        if not self.vocab_path.is_file():
            raise CpganError(f"{self.vocab_path}: vocabulary not found (run 'cpgan-prep vocab')")
        if self.memory_path is not None and not self.memory_path.is_file():
            raise CpganError(f"{self.memory_path}: memory bank not found (run 'cpgan-prep "
                             "build-memory', pass --memory, or train the --no-memory ablation)")
        if self.detector_weights is not None and not self.detector_weights.is_file():
            raise CpganError(f"{self.detector_weights}: detector weights not found (run "
                             "'cpgan-prep train-detector' or pass --detector-weights)")

    def _detector_params(self) -> dict[str, Any] | None:
        detector = self.run.config.detector
        return ({k: getattr(detector, k) for k in
                 ("feature_layer", "num_regions", "score_threshold", "nms_iou")}
                if self.detector_cfg is not None else None)

    def _inputs(self, *stage_files: Path) -> list[Path]:
        coco = self.run.coco_root
        files = [layout.annotation_file(coco, "captions", "train2014"),
                 layout.annotation_file(coco, "captions", "val2014"), self.vocab_path,
                 *stage_files]
        files += [p for p in (self.memory_path, self.detector_weights, self.detector_cfg,
                              self.inception_weights) if p is not None]
        return files

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """The settings whose change makes the stage's output stale."""

    @abc.abstractmethod
    def inputs(self) -> list[Path]:
        """The files whose change makes the stage's output stale."""

    @property
    @abc.abstractmethod
    def main_variant(self) -> bool:
        """Is this the full model (recorded as the stage) rather than an ablation?"""

    @property
    @abc.abstractmethod
    def record(self) -> Path:
        """The ablation variant's record (the main model's is the stage record)."""

    def _recorded_current(self) -> bool:
        # the config sections params() records: a key they predate counts as its default
        defaults = config_defaults("encoder", "gan", "detector")
        return artifacts.is_current(self.root, self.stage, params=self.params(),
                                    inputs=self.inputs(), defaults=defaults,
                                    path=self._record_file())

    def _recorded_summary(self) -> dict[str, Any]:
        """The summary of the stage's record (the main model's) or of the variant's."""
        record = artifacts.read_record(self.root, self.stage, path=self._record_file())
        summary = record.get("summary") if record is not None else None
        return summary if isinstance(summary, dict) else {}

    def _write_record(self, outputs: list[Path], summary: dict[str, Any]) -> None:
        artifacts.write_record(self.root, self.stage, config=self.run.config.to_dict(),
                               params=self.params(), inputs=self.inputs(), outputs=outputs,
                               summary=summary, path=self._record_file())

    def _record_file(self) -> Path | None:
        """The variant's own record; None for the main model, whose record is the stage's."""
        return None if self.main_variant else self.record


class DamsmJob(_TrainingJob):
    """The damsm stage of one invocation: resolved inputs, provenance, training."""

    stage = "damsm"

    def __init__(self, run: RunContext, memory_path: Path | None, use_memory: bool,
                 use_objects: bool, detector_weights: Path | None,
                 inception_weights: Path | None, limit: int | None,
                 val_limit: int | None) -> None:
        super().__init__(run, memory_path, use_memory, use_objects, detector_weights,
                         inception_weights)
        self.use_memory, self.use_objects = use_memory, use_objects
        self.limit, self.val_limit = limit, val_limit
        self.name = layout.damsm_name(use_memory, use_objects)
        self.model = layout.damsm_path(self.root / "models", use_memory, use_objects)
        self.classifier_weights = (self.root / "models" / layout.CLASSIFIER_NAME
                                   if run.config.encoder.backbone == "classifier" else None)
        if self.classifier_weights is not None and not self.classifier_weights.is_file():
            raise CpganError(f"{self.classifier_weights}: the toy scoring classifier, which the "
                             "image encoder starts from, is not there (run 'cpgan-eval "
                             "fit-classifier' first)")

    # -------------------------------------------------------------------------- provenance

    def params(self) -> dict[str, Any]:
        config = self.run.config
        return {"variant": self.name, "encoder": dataclasses.asdict(config.encoder),
                "max_caption_words": config.data.max_caption_words, "seed": config.seed,
                "detector": self._detector_params(),
                "limit": self.limit, "val_limit": self.val_limit}

    def inputs(self) -> list[Path]:
        return self._inputs(*([self.classifier_weights] if self.classifier_weights else []))

    @property
    def main_variant(self) -> bool:
        return self.use_memory and self.use_objects

    @property
    def record(self) -> Path:
        return layout.damsm_record(self.model)

    def is_current(self) -> bool:
        return self._recorded_current()

    def describe(self) -> str:
        """The val figures of the up-to-date model: those its record keeps (the same ones the
        model file stores, which only torch reads)."""
        metrics = self._recorded_summary().get("metrics")
        if not isinstance(metrics, dict):  # not in the record: read the model file
            from cpgan.trainer.damsm import pretrained_summary

            metrics = pretrained_summary(self.model)
        return f"val {layout.describe_damsm_metrics(metrics)}" if metrics else "no stored metrics"

    # -------------------------------------------------------------------------- training

    def train(self, device: str, resume: bool, workers: int) -> None:
        from cpgan.pipeline.detect import load_detector
        from cpgan.pipeline.text import Vocabulary
        from cpgan.trainer.damsm import train_damsm

        vocab = Vocabulary.load(self.vocab_path)
        memory = None
        if self.memory_path is not None:
            from cpgan.pipeline.memory import load_memory

            memory = load_memory(self.memory_path, vocab).memory
        detector = (load_detector(self.detector_cfg, self.detector_weights)
                    if self.use_objects else None)
        result = train_damsm(self.run.coco_root, self.root / "models", self.run.config, vocab,
                             memory, detector, self.inception_weights,
                             classifier_weights=self.classifier_weights, device=device,
                             resume=resume, limit=self.limit, val_limit=self.val_limit,
                             num_workers=workers)
        self._write_record([self.model], result.summary())
        minutes, seconds = divmod(int(result.seconds + 0.5), 60)
        click.echo(f"damsm [{self.name}]: {result.epochs} epochs on {result.train_images} "
                   f"train images ({result.skipped_images} skipped) in {minutes}m{seconds:02d}s; "
                   f"val {layout.describe_damsm_metrics(result.metrics)} -> {self.model}")


@dataclasses.dataclass(frozen=True)
class GanOptions:
    """The GAN stage's command-line settings besides the config."""

    device: str
    resume: bool
    limit: int | None
    name: str | None
    checkpoint_every: int
    sample_every: int
    log_every: int
    workers: int


class GanJob(_TrainingJob):
    """The gan stage of one invocation: resolved inputs, provenance, training."""

    stage = "gan"

    def __init__(self, run: RunContext, memory_path: Path | None,
                 switches: tuple[bool, bool, bool], detector_weights: Path | None,
                 inception_weights: Path | None, options: GanOptions) -> None:
        use_memory, use_objects, use_fgcd = switches
        self.switches = {"use_memory": use_memory, "use_objects": use_objects,
                         "use_fgcd": use_fgcd}  # as cpgan.trainer.gan.Switches.as_dict()
        super().__init__(run, memory_path, use_memory, use_objects, detector_weights,
                         inception_weights)
        self.options = options
        self.name = options.name or layout.run_name(*switches)
        self.folder = layout.run_dir(self.root, self.name)  # raises, saying what a name may hold
        self.encoders = layout.damsm_path(self.root / "models", use_memory, use_objects)

    # -------------------------------------------------------------------------- provenance

    def params(self) -> dict[str, Any]:
        config = self.run.config
        return {"run": self.name, "switches": dict(self.switches),
                "gan": dataclasses.asdict(config.gan),
                "encoder": dataclasses.asdict(config.encoder),
                "max_caption_words": config.data.max_caption_words, "seed": config.seed,
                "detector": self._detector_params(),
                "limit": self.options.limit, "processes": _processes()}

    def inputs(self) -> list[Path]:
        return self._inputs(self.encoders)

    def outputs(self) -> list[Path]:
        return [layout.checkpoint_file(self.folder), layout.metrics_file(self.folder)]

    @property
    def main_variant(self) -> bool:
        return self.name == layout.RUN_STEM and all(self.switches.values())

    @property
    def record(self) -> Path:
        return self.folder / layout.GAN_RECORD_NAME

    def is_current(self) -> bool:
        return self.encoders.is_file() and self._recorded_current()

    def describe(self) -> str:
        try:
            lines = layout.metrics_file(self.folder).read_text(encoding="utf-8").splitlines()
            return describe_losses(json.loads(lines[-1]))
        except (OSError, IndexError, json.JSONDecodeError, KeyError, TypeError):
            return "no logged losses"

    # -------------------------------------------------------------------------- training

    def train(self) -> None:
        from cpgan.pipeline.detect import load_detector
        from cpgan.pipeline.text import Vocabulary
        from cpgan.trainer.gan import Switches, distributed_from_env, train_gan

        if not self.encoders.is_file():
            raise CpganError(f"{self.encoders}: DAMSM encoders not found (run 'cpgan-train "
                             "--stage damsm' with the same --no-memory / --no-oaie switches)")
        switches = Switches(**self.switches)
        vocab = Vocabulary.load(self.vocab_path)
        detector = (load_detector(self.detector_cfg, self.detector_weights)
                    if switches.use_objects else None)
        o = self.options
        result = train_gan(self.run.coco_root, self.root, self.run.config, vocab,
                           switches, memory_path=self.memory_path, detector=detector,
                           inception_weights=self.inception_weights, name=self.name,
                           device=o.device, resume=o.resume, limit=o.limit,
                           checkpoint_every=o.checkpoint_every, sample_every=o.sample_every,
                           log_every=o.log_every, num_workers=o.workers)
        if not distributed_from_env().is_main:
            return
        self._write_record(self.outputs(), result.summary())
        minutes, seconds = divmod(int(result.seconds + 0.5), 60)
        losses = describe_losses(result.metrics) if result.metrics else "no step trained"
        click.echo(f"gan [{self.name}]: {result.epochs} epochs ({result.steps} steps, "
                   f"{result.steps_trained} now, x{result.processes} processes) on "
                   f"{result.train_images} train images ({result.skipped_images} skipped) in "
                   f"{minutes}m{seconds:02d}s, {result.images_per_second:.1f} img/s; "
                   f"{losses} -> {self.folder}")


def _processes() -> int:
    """The processes of this run: one, unless torchrun's variables are set (then the trainer
    reads and checks them, importing torch)."""
    if not layout.under_torchrun():
        return 1
    from cpgan.trainer.gan import distributed_from_env

    return distributed_from_env().world_size


def describe_losses(row: dict[str, Any]) -> str:
    """'step 2500: loss_d 1.234, loss_g 5.678, TISCL 0.912, KL 0.010' for summary lines."""
    return (f"step {row['step']}: loss_d {row['loss_d']:.3f}, loss_g {row['loss_g']:.3f}, "
            f"TISCL {row['loss_tiscl']:.3f}, KL {row['loss_kl']:.3f}")


# ------------------------------------------------------------------------------ ablation records
#
# The stage record of pipeline/artifacts.py has one fixed path per stage; an ablation model
# keeps a record of the same layout beside itself so that the main record stays the main
# model's.


main = report_errors(cli)

if __name__ == "__main__":
    main()
