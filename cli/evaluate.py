"""``cpgan-eval``: score a trained CPGAN and write the HTML report; ``cpgan-eval
fit-classifier`` fits the toy preset's scoring network first.

Run without a subcommand, it evaluates one GAN run checkpoint (:mod:`cpgan.trainer.evaluate`)
and writes ``<artifacts>/report/report.json``, ``index.html`` and its PNGs
(:mod:`cpgan.pipeline.report`), then the ``eval`` stage's provenance record
(``report/report.provenance.json``), which ``cpgan-prep status`` shows.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from cpgan import layout
from cpgan.cli.common import RunContext, common_options, report_errors
from cpgan.cli.evaluate_tools import fit_classifier
from cpgan.errors import CpganError
from cpgan.pipeline import artifacts

SPLITS = ("val2014",)
DEFAULT_BATCH = 50


@click.group(invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@common_options
@click.option("--checkpoint", "checkpoint_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="GAN run checkpoint to evaluate. Default: the most recently modified "
              "<artifacts>/runs/*/checkpoint.pt, or <artifacts>/runs/cpgan/checkpoint.pt when "
              "there is none.")
@click.option("--split", type=click.Choice(SPLITS), default="val2014", show_default=True,
              help="Split whose (image, caption) pairs are generated and scored.")
@click.option("--num-images", type=click.IntRange(min=4), default=None,
              help="Evaluate the first N captioned images of the split (default: all).")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH,
              show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--seed", type=int, default=None,
              help="Seed of the noise, the untrained generator, the R-precision distractors and "
              "the real set's FID halves (default: the run's config seed). The (image, caption) "
              "pairs are always the run's validation pairs.")
@click.option("--scoring-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Toy preset: the scoring classifier for IS and FID. Default: "
              "<artifacts>/models/classifier.pt (make it with 'cpgan-eval fit-classifier').")
@click.option("--inception-weights", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="Paper preset: torchvision's ImageNet Inception-v3 state dict "
              "(inception_v3_google-0cc3c7bd.pth); scores IS as the CPGAN release did, gives "
              "the FID features and the encoders' Inception backbone.")
@click.option("--fid-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Paper preset: pytorch-fid's pt_inception-2015-12-05 FID network "
              "(pt_inception-2015-12-05-6726825d.pth), whose pool3 features give the FID of "
              "published numbers. Without it FID uses the --inception-weights pool features "
              "(not comparable with published FIDs); the report's config says which.")
@click.option("--detector-weights", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="Detector for SOA and the encoders' object features: models/detector.pt or "
              "a Darknet .weights file for the preset's cfg. Default: "
              "<artifacts>/models/detector.pt.")
@click.option("--soa-detector-weights", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="Score SOA with this detector (the preset's cfg) instead of the encoders' "
              "--detector-weights: one trained with another seed, which the generator never "
              "trained through. Needs --report-dir.")
@click.option("--rprecision-encoders", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="DAMSM encoders (models/damsm*.pt) that score R-precision. Default: the "
              "run's own, as the CPGAN release does; an ablation scores every variant with the "
              "same file (bench/ablation.py uses models/damsm.pt).")
@click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where report.json and index.html go (default: <artifacts>/report). Only "
              "the default folder is the eval stage's record that 'cpgan-prep status' shows.")
@click.option("--stage", type=click.IntRange(min=0), default=None,
              help="Score stage K's images (0: the first) instead of the last stage's, "
              "enlarged to the final size, with the real images shrunk to that stage's size "
              "and back. Needs --report-dir: the main report stays the last stage's.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Image-decoding loader processes.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch compute threads (default: OMP_NUM_THREADS, else every core; on a "
              "machine busy with other jobs, 1 is much faster than 2).")
def cli(run: RunContext, checkpoint_path: Path | None, split: str, num_images: int | None,
        batch_size: int, device: str, seed: int | None, scoring_weights: Path | None,
        inception_weights: Path | None, fid_weights: Path | None,
        detector_weights: Path | None, soa_detector_weights: Path | None,
        rprecision_encoders: Path | None, report_dir: Path | None, stage: int | None,
        workers: int, threads: int | None) -> None:
    """Evaluate a trained CPGAN: IS, FID, R-precision and SOA of generated, real and
    untrained-generator images, side by side.

    One image per val (image, caption) pair from the EMA generator (truncated noise); the
    same captions and noise through a freshly initialised generator of the same config give
    the floor, the real val images the ceiling. Writes <artifacts>/report/report.json and an
    offline index.html with sample grids, word attention maps, memory crops and training
    curves. The model sizes and caption length come from the checkpoint's config.
    """
    if click.get_current_context().invoked_subcommand is not None:
        return
    if stage is not None and report_dir is None:
        raise CpganError("--stage needs --report-dir: the main report stays the last stage's")
    if soa_detector_weights is not None and report_dir is None:
        raise CpganError("--soa-detector-weights needs --report-dir: the main report stays the "
                         "encoders' detector's")
    if report_dir is None and _report_is_current(
            run, checkpoint_path, split, num_images, batch_size, seed, scoring_weights,
            inception_weights, fid_weights, detector_weights, rprecision_encoders):
        click.echo(_up_to_date_line(run.artifacts))
        return
    # imported after the up-to-date check: torch and torchvision take ~5 s to import
    import torch

    from cpgan.trainer.detector import choose_threads

    torch.set_num_threads(choose_threads(threads))
    _evaluate(run, checkpoint_path, split, num_images, batch_size, device, seed,
              scoring_weights, inception_weights, fid_weights, detector_weights,
              rprecision_encoders, report_dir, workers, stage, soa_detector_weights)


def _evaluate(run: RunContext, checkpoint_path: Path | None, split_name: str,
              num_images: int | None, batch_size: int, device: str, seed: int | None,
              scoring_weights: Path | None, inception_weights: Path | None,
              fid_weights: Path | None, detector_weights: Path | None,
              rprecision_encoders: Path | None, report_dir: Path | None, workers: int,
              stage: int | None = None, soa_detector_weights: Path | None = None) -> None:
    from cpgan.pipeline.coco import CocoSplit
    from cpgan.pipeline.report import METRICS_LOG, REPORT_DIR, ReportInputs, write_report
    from cpgan.trainer.evaluate import (
        EvalFiles,
        EvalOptions,
        evaluate,
        load_eval_models,
        summary_line,
    )
    from cpgan.trainer.damsm import pretrained_variants
    from cpgan.trainer.sampling import read_checkpoint

    root = run.artifacts
    checkpoint = read_checkpoint(checkpoint_path or layout.default_checkpoint(root))
    config = checkpoint.config
    seed = config.seed if seed is None else seed
    models_dir = root / "models"
    files = EvalFiles(root, scoring_weights or models_dir / layout.CLASSIFIER_NAME,
                      inception_weights, detector_weights or models_dir / layout.DETECTOR_NAME,
                      run.project_path(config.detector.cfg), fid_weights, rprecision_encoders,
                      soa_detector_weights)
    split = CocoSplit.open(run.coco_root, split_name, require_instances=True)
    params = _params(root, checkpoint.path, split_name, num_images, batch_size, seed,
                     config.preset, rprecision_encoders)
    scoring_file = files.classifier_weights if config.preset == "toy" else inception_weights
    record_inputs = (files.inputs(checkpoint, split, SimpleNamespace(weights=Path(scoring_file)))
                     if scoring_file is not None else None)  # else loading the models will say why
    staged = report_dir is None  # only the default folder is the eval stage's record
    if staged and record_inputs is not None and artifacts.is_current(
            root, "eval", params=params, inputs=record_inputs):
        click.echo(_up_to_date_line(root))
        return
    models = load_eval_models(checkpoint, files, split, seed, device)
    record_inputs = record_inputs or files.inputs(checkpoint, split, models.scoring)
    options = EvalOptions(num_images, batch_size, seed, device, workers, stage=stage)
    evaluation = evaluate(models, split, options)
    evaluation.report["encoders"] = pretrained_variants(models_dir)
    folder = root / REPORT_DIR if staged else report_dir
    inputs = ReportInputs(checkpoint.path.parent / METRICS_LOG,
                          root if checkpoint.memory else None, run.coco_root,
                          evaluation.memory_candidates)
    written = write_report(folder, evaluation.report, evaluation.showcase, inputs)
    report = evaluation.report
    summary = {block: {k: v for k, v in report[block].items() if k != "soa_per_class"}
               for block in ("generated", "real", "untrained")}
    if staged:
        artifacts.write_record(root, "eval", config=config.to_dict(), params=params,
                               inputs=record_inputs, outputs=written, summary=summary)
    scored = "" if stage is None else f" stage {stage}"
    click.echo(f"cpgan-eval [{checkpoint.run_name} step {checkpoint.step}{scored}]: "
               f"{report['config']['num_images']} pairs in {report['config']['seconds']:.0f} s; "
               f"{summary_line(report)} -> {folder / 'index.html'}")



def _params(root: Path, checkpoint: Path, split_name: str, num_images: int | None,
            batch_size: int, seed: int, preset: str,
            rprecision_encoders: Path | None) -> dict[str, Any]:
    """The eval stage's parameters: a change makes the report stale. Paths inside the
    artifacts root are relative to it, so a moved root keeps its report."""
    params = {"checkpoint": artifacts.record_key(root, checkpoint), "split": split_name,
              "num_images": num_images, "batch_size": batch_size, "seed": seed,
              "scoring": "classifier" if preset == "toy" else "inception"}
    if rprecision_encoders is not None:
        params["rprecision_encoders"] = artifacts.record_key(root, rprecision_encoders)
    return params


def _report_is_current(run: RunContext, checkpoint_path: Path | None, split_name: str,
                       num_images: int | None, batch_size: int, seed: int | None,
                       scoring_weights: Path | None, inception_weights: Path | None,
                       fid_weights: Path | None, detector_weights: Path | None,
                       rprecision_encoders: Path | None) -> bool:
    """Whether the eval stage's record is current for these options, decided without torch.

    _evaluate decides it from the checkpoint, which only torch reads: its config, encoders and
    memory. Here they come from the record, whose config is the checkpoint's, and from the
    report.json it lists, which names the encoders and memory. Both describe the checkpoint
    while it is the recorded one, and is_current checks that (the checkpoint is an input).
    The inputs are those of cpgan.trainer.evaluate.EvalFiles.inputs. False when undecided:
    _evaluate then decides from the checkpoint.
    """
    from cpgan.pipeline.report import REPORT_DIR, REPORT_JSON

    root = run.artifacts
    models_dir = root / "models"
    checkpoint = Path(checkpoint_path or layout.default_checkpoint(root))
    record = artifacts.read_record(root, "eval") or {}
    try:
        config = record["config"]
        report = json.loads((root / REPORT_DIR / REPORT_JSON).read_text(encoding="utf-8"))
        encoders, memory = (report["config"]["checkpoint"][k] for k in ("encoders", "memory"))
        preset = config["preset"]
        seed = config["seed"] if seed is None else seed
        checkpoint_files = [root / encoders, run.project_path(config["detector"]["cfg"]),
                            *([root / memory] if memory else [])]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    scoring = ((scoring_weights or models_dir / layout.CLASSIFIER_NAME) if preset == "toy"
               else inception_weights)
    if scoring is None:
        return False
    inputs = [checkpoint, *checkpoint_files, root / layout.VOCAB_NAME,
              detector_weights or models_dir / layout.DETECTOR_NAME, Path(scoring),
              layout.annotation_file(run.coco_root, "captions", split_name),
              layout.annotation_file(run.coco_root, "instances", split_name),
              *(path for path, _, _ in layout.damsm_variant_files(models_dir))]
    extra = [inception_weights, fid_weights, rprecision_encoders,
             root / layout.MEMORY_NAME if rprecision_encoders is not None else None]
    inputs += [p for p in extra if p is not None]
    params = _params(root, checkpoint, split_name, num_images, batch_size, seed, preset,
                     rprecision_encoders)
    return artifacts.is_current(root, "eval", params=params, inputs=inputs)


def _up_to_date_line(root: Path) -> str:
    from cpgan.pipeline.report import INDEX_HTML, REPORT_DIR

    return (f"cpgan-eval: up to date ({root / REPORT_DIR / INDEX_HTML}; rerun after removing "
            "report/report.provenance.json to recompute)")


cli.add_command(fit_classifier)
main = report_errors(cli)

if __name__ == "__main__":
    main()
