"""The paper's ablation (§4.2, Figure 6) at the toy budget: AttnGAN+, +MATE, +OAIE, +FGCD, CPGAN.

Each variant is the same GAN trainer with the other modules switched off (``--no-memory``,
``--no-oaie``, ``--no-fgcd``), trained with the toy preset's budget and seed through
``cpgan-train --stage all`` (which first pretrains the DAMSM encoders that variant's TISCL
needs, ``models/damsm[-no-memory][-no-oaie].pt``), then scored by ``cpgan-eval`` on the toy
val pairs. Every variant's R-precision is measured with the *same* encoders
(``cpgan-eval --rprecision-encoders``), and those are an independent ruler: DAMSM encoders
(memory and objects on) trained here with another seed (config seed + 1) and twice the
preset's epochs, in ``<artifacts>/ablation/ruler/``. (Like the demo's encoders, the ruler's
image encoder starts from the toy scoring classifier, as the paper's both start from
Inception.) A variant's own encoders would grade
their own generator's images, and even one shared file that some variants trained against
would favour those: TISCL (Eq. 6) pushes the generator towards exactly the similarity that
R-precision ranks. ``--scorer FILE`` uses another encoder file instead. IS and FID use the
toy classifier, SOA-C the toy detector, as in ``make demo``.

Run it on the artifacts of a finished ``make demo`` (the prep stages, the main DAMSM, the
classifier and the full CPGAN run are reused, not retrained)::

    .venv/bin/python bench/ablation.py --artifacts artifacts [--results RESULTS.md]

Everything it makes goes under ``<artifacts>/ablation/`` (the ruler, and report.json and
index.html per variant) and ``<artifacts>/runs/<run>/``; a rerun skips finished variants (training and evaluation both
resume), so a killed ablation loses nothing. The table, with the command and the wall time of
each variant, replaces the block between the markers in RESULTS.md.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from results_file import replace_block

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BEGIN = "<!-- ablation table: bench/ablation.py writes between these markers -->"
END = "<!-- end of ablation table -->"


@dataclass(frozen=True)
class Variant:
    """One row of Figure 6: which of the three modules are on."""

    label: str
    memory: bool
    oaie: bool
    fgcd: bool

    @property
    def run(self) -> str:
        """The GAN trainer's run folder name."""
        from cpgan.trainer.gan import run_name

        return run_name(self.memory, self.oaie, self.fgcd)

    @property
    def switches(self) -> list[str]:
        return ([] if self.memory else ["--no-memory"]) + ([] if self.oaie else ["--no-oaie"]) \
            + ([] if self.fgcd else ["--no-fgcd"])


VARIANTS = (
    Variant("AttnGAN+", False, False, False),
    Variant("+MATE", True, False, False),
    Variant("+OAIE", False, True, False),
    Variant("+FGCD", False, False, True),
    Variant("CPGAN", True, True, True),
)


RULER_SEED_OFFSET = 1
RULER_EPOCH_FACTOR = 2


def train_ruler(artifacts: Path) -> Path:
    """The independent R-precision ruler (see the module doc): its own artifacts folder holding
    copies of the vocabulary, memory bank and detector it is trained with, the same toy COCO.
    ``cpgan-train`` skips it when it is already up to date."""
    from cpgan.config import load_config

    folder = artifacts / "ablation" / "ruler"
    copy_encoder_inputs(artifacts, folder)
    preset = load_config("toy")
    config = folder / "ruler.toml"
    config.write_text(f"seed = {preset.seed + RULER_SEED_OFFSET}\n\n[encoder]\n"
                      f"epochs = {preset.encoder.epochs * RULER_EPOCH_FACTOR}\n")
    run_command([str(BIN / "cpgan-train"), "--stage", "damsm", "--artifacts", str(folder),
                 "--coco-root", str(artifacts / "toy-coco"), "--config", str(config)])
    return folder / "models" / "damsm.pt"


def copy_encoder_inputs(artifacts: Path, folder: Path) -> None:
    """Give ``folder`` its own copies of what DAMSM pretraining reads besides the dataset
    (vocabulary, memory bank, detector, the classifier the toy image encoder starts from), so
    encoders trained there never touch the demo's."""
    (folder / "models").mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "memory.h5", "models/detector.pt", "models/classifier.pt"):
        source, target = artifacts / name, folder / name
        if not target.is_file() or not filecmp.cmp(source, target, shallow=False):
            shutil.copyfile(source, target)


def run_command(command: list[str]) -> float:
    """Run one stage, its output passing through; the wall seconds it took."""
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def finished_step(checkpoint: Path) -> int | None:
    """The step of a finished run's checkpoint (None while unfinished or missing)."""
    if not checkpoint.is_file():
        return None
    from cpgan.trainer.sampling import read_checkpoint

    run = read_checkpoint(checkpoint)
    return run.step if run.finished else None


def evaluated(report: Path, checkpoint: Path, step: int, scorer: Path) -> bool:
    """Is ``report`` the evaluation of this very checkpoint step with this scorer?"""
    if not report.is_file():
        return False
    config = json.loads(report.read_text())["config"]
    return (config["checkpoint"]["path"] == str(checkpoint) and config["checkpoint"]["step"] == step
            and config["r_precision_encoders"] == str(scorer))


def ablate(variant: Variant, artifacts: Path, scorer: Path, threads: int) -> dict:
    """Train (or resume, or skip) and evaluate one variant; its report plus the seconds spent."""
    common = ["--artifacts", str(artifacts)]
    checkpoint = artifacts / "runs" / variant.run / "checkpoint.pt"
    seconds = {"train": 0.0, "eval": 0.0}
    if finished_step(checkpoint) is None:
        seconds["train"] = run_command([str(BIN / "cpgan-train"), "--stage", "all",
                                        *variant.switches, *common])
    step = finished_step(checkpoint)
    folder = artifacts / "ablation" / variant.run
    report = folder / "report.json"
    if not evaluated(report, checkpoint, step, scorer):
        seconds["eval"] = run_command([
            str(BIN / "cpgan-eval"), "--checkpoint", str(checkpoint), "--rprecision-encoders",
            str(scorer), "--report-dir", str(folder), "--threads", str(threads), *common])
    return {"report": json.loads(report.read_text()), "seconds": seconds}


def metric_text(block: dict, key: str) -> str:
    """A report value as text: 'mean ± std', 3 decimals, or n/a."""
    value = block[key]
    if isinstance(value, dict):
        return f"{value['mean']:.3f} ± {value['std']:.3f}"
    return "n/a" if value is None else f"{value:.3f}"


def short_path(path: str) -> str:
    """A scorer path from ``ablation/`` on when it lies in an artifacts folder."""
    parts = Path(path).parts
    return str(Path(*parts[parts.index("ablation"):])) if "ablation" in parts else path


def table(rows: list[tuple[Variant, dict]], command: str) -> str:
    """The RESULTS.md block: one row a variant, plus the real and untrained references."""
    lines = [BEGIN, "", f"Made by `{command}`.", "",
             "| variant | modules | R-precision | SOA-C | SOA-I | FID | IS | GAN steps |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, result in rows:
        g = result["report"]["generated"]
        step = result["report"]["config"]["checkpoint"]["step"]
        modules = ", ".join(name for name, on in (("MATE", variant.memory), ("OAIE", variant.oaie),
                                                  ("FGCD", variant.fgcd)) if on) or "none"
        lines.append(f"| {variant.label} | {modules} | {metric_text(g, 'r_precision')} | "
                     f"{metric_text(g, 'soa_c')} | {metric_text(g, 'soa_i')} | {g['fid']:.1f} | "
                     f"{metric_text(g, 'inception_score')} | {step} |")
    reference = rows[-1][1]["report"]
    for block in ("real", "untrained"):
        b = reference[block]
        lines.append(f"| *{block} images* | | {metric_text(b, 'r_precision')} | {metric_text(b, 'soa_c')} | "
                     f"{metric_text(b, 'soa_i')} | {b['fid']:.1f} | {metric_text(b, 'inception_score')} | |")
    config = reference["config"]
    lines += ["", f"{config['num_images']} toy val pairs per variant, seed {config['seed']}; "
              f"R-precision scored by `{short_path(config['r_precision_encoders'])}` for every "
              "variant (100 candidates, 10 folds); IS and FID by the toy classifier; SOA by the "
              "toy detector. Wall seconds (train + eval, this run; 0 = reused): "
              + ", ".join(f"{v.label} {r['seconds']['train']:.0f} + {r['seconds']['eval']:.0f}"
                          for v, r in rows) + ".", "", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--results", type=Path, default=ROOT / "RESULTS.md")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the evaluations (training: OMP_NUM_THREADS)")
    parser.add_argument("--scorer", type=Path, default=None,
                        help="DAMSM encoders that score every variant's R-precision (default: "
                        "an independent ruler trained under <artifacts>/ablation/ruler)")
    args = parser.parse_args()
    artifacts = args.artifacts.resolve()
    if not (artifacts / "models" / "damsm.pt").is_file():
        sys.exit(f"{artifacts}: no finished demo; run 'make demo ARTIFACTS={args.artifacts}' first")
    scorer = args.scorer.resolve() if args.scorer else train_ruler(artifacts)
    if not scorer.is_file():
        sys.exit(f"{scorer}: missing")
    rows = [(variant, ablate(variant, artifacts, scorer, args.threads)) for variant in VARIANTS]
    command = "python bench/ablation.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    replace_block(args.results, BEGIN, END, table(rows, command.strip()))
    print(f"ablation table -> {args.results}")


if __name__ == "__main__":
    main()
