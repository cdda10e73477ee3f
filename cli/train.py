"""``cpgan-train``: DAMSM pretraining of the encoders, then (in a later version) the GAN.

Stages, in the order the paper trains them:

* ``damsm`` -- pretrain the text encoder (MATE, with the memory bank) and the image encoder
  (OAIE, with the frozen detector) on real (image, caption) pairs with the DAMSM loss
  (:mod:`cpgan.trainer.damsm`); writes ``models/damsm.pt``, skipped when it is up to date;
* ``gan`` -- the 3-stage GAN; not available in this version (exit status 2);
* ``all`` (default) -- ``damsm`` when its model is missing or stale, then ``gan``.

Ablations write their own files so they never replace the main encoders: ``--no-memory``
gives ``models/damsm-no-memory.pt`` (plain AttnGAN text encoder), ``--no-oaie``
``models/damsm-no-oaie.pt`` (no object features V_o), both ``damsm-no-memory-no-oaie.pt``.
The main run's provenance is the ``damsm`` stage record (``models/damsm.provenance.json``,
shown by ``cpgan-prep status``); an ablation keeps the same kind of record beside its model
(``models/damsm-no-memory.provenance.json``).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click

from cpgan.cli.common import RunContext, common_options, report_errors
from cpgan.errors import CpganError
from cpgan.pipeline import artifacts

STAGES = ("damsm", "gan", "all")
GAN_UNAVAILABLE = ("cpgan-train: the GAN stage is not available in this version (the "
                   "generator and discriminators exist, their training loop has not landed; "
                   "see README, 'What works today')")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@common_options
@click.option("--stage", type=click.Choice(STAGES), default="all", show_default=True,
              help="damsm: pretrain the encoders; gan: train the GAN (not available yet); "
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
@click.option("--detector-weights", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Detector for V_o: models/detector.pt from "
              "'cpgan-prep train-detector' or a Darknet .weights file for the preset's cfg. "
              "Default: <artifacts>/models/detector.pt.")
@click.option("--inception-weights", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="torchvision's ImageNet Inception-v3 weights "
              "(inception_v3_google-0cc3c7bd.pth); needed by the paper preset, whose image "
              "encoder uses a frozen Inception-v3.")
@click.option("--epochs", type=click.IntRange(min=0), default=None,
              help="Training epochs (default: the preset's encoder.epochs).")
@click.option("--batch-size", type=click.IntRange(min=2), default=None,
              help="Images per step (default: the preset's encoder.batch_size).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--resume", is_flag=True,
              help="Continue from the last finished epoch of models/damsm*.ckpt.pt "
              "(a run killed mid-way continues exactly).")
@click.option("--limit", type=click.IntRange(min=2), default=None,
              help="Train on the first N captioned train images only (quick trials).")
@click.option("--val-limit", type=click.IntRange(min=2), default=None,
              help="Validate on the first N captioned val images only.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Image-decoding loader processes (0: decode in the training process).")
def cli(run: RunContext, stage: str, memory_path: Path | None, no_memory: bool, no_oaie: bool,
        detector_weights: Path | None, inception_weights: Path | None, epochs: int | None,
        batch_size: int | None, device: str, resume: bool, limit: int | None,
        val_limit: int | None, workers: int) -> None:
    """Train CPGAN on the artifacts of cpgan-prep (toy dataset by default).

    \b
    Typical use, once the cpgan-prep stages have run (make-toy, vocab, train-detector,
    detect, train-attention, attend, build-memory; see 'cpgan-prep status'):
      cpgan-train --stage damsm              # pretrain the encoders -> models/damsm.pt
      cpgan-train --stage damsm --no-memory  # the ablation -> models/damsm-no-memory.pt
      cpgan-train                            # damsm if needed, then the GAN (not yet)

    Each DAMSM epoch prints the validation loss and R-precision (image global feature vs
    sentence vector, 1 true caption against 99 random ones, 10 folds; and the in-batch
    variant of the CPGAN release). A finished, up-to-date model is not retrained.
    """
    if epochs is not None:
        run.config.encoder.epochs = epochs
    if batch_size is not None:
        run.config.encoder.batch_size = batch_size
    if stage == "gan":
        click.echo(GAN_UNAVAILABLE, err=True)
        sys.exit(2)
    job = DamsmJob(run, memory_path, not no_memory, not no_oaie, detector_weights,
                   inception_weights, limit, val_limit)
    if job.is_current():
        click.echo(f"damsm [{job.name}]: up to date ({job.model}); {job.describe()}")
    else:
        job.train(device, resume, workers)
    if stage == "all":
        click.echo(GAN_UNAVAILABLE, err=True)
        sys.exit(2)


class DamsmJob:
    """The damsm stage of one invocation: resolved inputs, provenance, training."""

    def __init__(self, run: RunContext, memory_path: Path | None, use_memory: bool,
                 use_objects: bool, detector_weights: Path | None,
                 inception_weights: Path | None, limit: int | None,
                 val_limit: int | None) -> None:
        from cpgan.trainer.damsm import model_name, model_path

        self.run = run
        self.root = run.artifacts
        self.use_memory, self.use_objects = use_memory, use_objects
        self.memory_path = (memory_path or self.root / "memory.h5") if use_memory else None
        self.detector_weights = ((detector_weights or self.root / "models" / "detector.pt")
                                 if use_objects else None)
        self.detector_cfg = run.project_path(run.config.detector.cfg) if use_objects else None
        self.inception_weights = inception_weights
        self.limit, self.val_limit = limit, val_limit
        self.name = model_name(use_memory, use_objects)
        self.model = model_path(self.root / "models", use_memory, use_objects)
        self.vocab_path = self.root / "vocab.json"
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

    # -------------------------------------------------------------------------- provenance

    def params(self) -> dict[str, Any]:
        config = self.run.config
        return {"variant": self.name, "encoder": dataclasses.asdict(config.encoder),
                "max_caption_words": config.data.max_caption_words, "seed": config.seed,
                "detector": ({k: getattr(config.detector, k) for k in
                              ("feature_layer", "num_regions", "score_threshold", "nms_iou")}
                             if self.use_objects else None),
                "limit": self.limit, "val_limit": self.val_limit}

    def inputs(self) -> list[Path]:
        from cpgan.pipeline.coco import annotation_file

        coco = self.run.coco_root
        files = [annotation_file(coco, "captions", "train2014"),
                 annotation_file(coco, "captions", "val2014"), self.vocab_path]
        files += [p for p in (self.memory_path, self.detector_weights, self.detector_cfg,
                              self.inception_weights) if p is not None]
        return files

    @property
    def main_variant(self) -> bool:
        return self.use_memory and self.use_objects

    @property
    def record(self) -> Path:
        return self.model.with_name(f"{self.name}.provenance.json")

    def is_current(self) -> bool:
        if self.main_variant:
            return artifacts.is_current(self.root, "damsm", params=self.params(),
                                        inputs=self.inputs())
        return _variant_is_current(self.root, self.record, self.params(), self.inputs())

    def describe(self) -> str:
        from cpgan.trainer.damsm import describe_metrics, pretrained_summary

        metrics = pretrained_summary(self.model)
        return f"val {describe_metrics(metrics)}" if metrics else "no stored metrics"

    # -------------------------------------------------------------------------- training

    def train(self, device: str, resume: bool, workers: int) -> None:
        from cpgan.pipeline.detect import load_detector
        from cpgan.pipeline.text import Vocabulary
        from cpgan.trainer.damsm import describe_metrics, train_damsm

        vocab = Vocabulary.load(self.vocab_path)
        memory = None
        if self.memory_path is not None:
            from cpgan.pipeline.memory import load_memory

            memory = load_memory(self.memory_path, vocab).memory
        detector = (load_detector(self.detector_cfg, self.detector_weights)
                    if self.use_objects else None)
        result = train_damsm(self.run.coco_root, self.root / "models", self.run.config, vocab,
                             memory, detector, self.inception_weights, device=device,
                             resume=resume, limit=self.limit, val_limit=self.val_limit,
                             num_workers=workers)
        summary = result.summary()
        if self.main_variant:
            artifacts.write_record(self.root, "damsm", config=self.run.config.to_dict(),
                                   params=self.params(), inputs=self.inputs(),
                                   outputs=[self.model], summary=summary)
        else:
            _write_variant_record(self.root, self.record, self.run.config.to_dict(),
                                  self.params(), self.inputs(), [self.model], summary)
        minutes, seconds = divmod(int(result.seconds + 0.5), 60)
        click.echo(f"damsm [{self.name}]: {result.epochs} epochs on {result.train_images} "
                   f"train images ({result.skipped_images} skipped) in {minutes}m{seconds:02d}s; "
                   f"val {describe_metrics(result.metrics)} -> {self.model}")


# ------------------------------------------------------------------------------ ablation records
#
# The stage record of pipeline/artifacts.py has one fixed path per stage; an ablation model
# keeps a record of the same layout beside itself so that the main record stays the main
# model's.


def _variant_record(root: Path, config: dict[str, Any], params: dict[str, Any],
                    inputs: list[Path], outputs: list[Path],
                    summary: dict[str, Any]) -> dict[str, Any]:
    from cpgan import __version__

    def keyed(paths: list[Path]) -> dict[str, Any]:
        return {_key(root, p): artifacts.fingerprint(p) for p in sorted(paths)}

    return {"stage": "damsm", "split": None, "version": __version__, "params": params,
            "inputs": keyed(inputs), "outputs": keyed(outputs), "summary": summary,
            "config": config}


def _key(root: Path, path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _write_variant_record(root: Path, record: Path, config: dict[str, Any],
                          params: dict[str, Any], inputs: list[Path], outputs: list[Path],
                          summary: dict[str, Any]) -> None:
    content = _variant_record(root, config, params, inputs, outputs, summary)
    artifacts.atomic_write_text(record, json.dumps(content, indent=1, sort_keys=True) + "\n")


def _variant_is_current(root: Path, record: Path, params: dict[str, Any],
                        inputs: list[Path]) -> bool:
    try:
        content = json.loads(record.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(content, dict) or content.get("params") != json.loads(json.dumps(params)):
        return False
    if set(content.get("inputs", {})) != {_key(root, p) for p in inputs}:
        return False
    for key, known in {**content.get("inputs", {}), **content.get("outputs", {})}.items():
        path = Path(key) if Path(key).is_absolute() else root / key
        if not path.is_file() or artifacts.fingerprint(path, known)["sha256"] != known.get("sha256"):
            return False
    return True


main = report_errors(cli)

if __name__ == "__main__":
    main()
