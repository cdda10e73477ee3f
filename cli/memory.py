"""``cpgan-prep build-memory`` and ``cpgan-prep show-memory``: the memory of §3.2.1 (Eq. 7).

Both are module-level Click commands; ``cli/prep.py`` adds them to the ``cpgan-prep`` group.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cpgan.cli.common import RunContext, cluster_options, common_options
from cpgan.pipeline import artifacts

if TYPE_CHECKING:
    from cpgan.pipeline.memory import MemoryResult

SPLITS = ("train2014", "val2014")
SHOWN_ZERO_SUPPORT = 8


@click.command("build-memory")
@common_options
@click.option("--topk", type=click.IntRange(min=1), default=None,
              help="K of Eq. 7: the most relevant images kept per word "
              "(default: the preset's memory.topk, 5).")
@click.option("--split", type=click.Choice(SPLITS), default="train2014", show_default=True,
              help="Captions whose attention builds the memory (the paper uses train).")
@cluster_options
@click.option("--purity/--no-purity", default=True, show_default=True,
              help="Write memory_purity.json: how often the regions chosen for a category "
              "word overlap an instance of that category (needs the instances file).")
@click.option("--force", is_flag=True, help="Rebuild even when memory.h5 is up to date.")
def build_memory_command(run: RunContext, topk: int | None, split: str, workers: int,
                         scheduler: str | None, purity: bool, force: bool) -> None:
    """The visual memory m_r of every vocabulary word (Eq. 7) -> memory.h5.

    For word r, each image with a caption containing r is relevant; its relevance is the
    largest attention weight over its occurrences of r, whose region is used. The K most
    relevant images give m_r = sum a_k v_k / sum a_k. Reads vocab.json, attention/ and
    regions/; writes memory.h5 (memory [V, D], words, support, relevant) and
    memory_index.parquet (the regions behind each m_r). Words without a relevant image get a
    zero vector and are listed. An up-to-date memory.h5 is reused.
    """
    from cpgan.pipeline.memory import PURITY_NAME, build_memory

    if topk is not None:
        run.config.memory.topk = topk
    result = build_memory(run.artifacts, split=split, topk=run.config.memory.topk,
                          workers=workers, scheduler=scheduler, force=force)
    outputs = [result.path, result.index_path]
    purity_path = run.artifacts / PURITY_NAME
    summary, line = result.summary(), ""
    if purity:
        report = _purity(run, split, rebuild=not result.reused or not purity_path.exists())
        if report is not None:
            outputs.append(purity_path)
            overall = summary["purity"] = report["overall"]
            value = "n/a" if overall["purity"] is None else f"{overall['purity']:.3f}"
            line = (f"; purity {value} ({overall['hits']}/{overall['regions']} regions of "
                    f"{overall['words']} category words)")
    if not (result.reused and artifacts.is_current(run.artifacts, "build-memory",
                                                   params=result.params, inputs=result.inputs)):
        artifacts.write_record(run.artifacts, "build-memory", config=run.config.to_dict(),
                               params=result.params, inputs=result.inputs, outputs=outputs,
                               summary=summary)
    click.echo(_summary_line(result) + line)


def _purity(run: RunContext, split: str, rebuild: bool) -> dict[str, Any] | None:
    """The purity report: recomputed after a build, else read back; None without instances."""
    import json

    from cpgan.pipeline.coco import CocoSplit
    from cpgan.pipeline.memory import PURITY_NAME, write_purity

    path = run.artifacts / PURITY_NAME
    if not rebuild:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # unreadable: compute it again
    coco = CocoSplit.open(run.coco_root, split)
    if not coco.has_instances:
        click.echo(f"build-memory: no {coco.instances_file.name}: purity report skipped", err=True)
        return None
    return write_purity(run.artifacts, coco)


def _summary_line(result: MemoryResult) -> str:
    zero = result.zero_support
    listed = ", ".join(zero[:SHOWN_ZERO_SUPPORT]) + (", ..." if zero[SHOWN_ZERO_SUPPORT:] else "")
    missing = f"{len(zero)} without a relevant image" + (f" ({listed})" if zero else "")
    state = " (up to date, reused)" if result.reused else ""
    return (f"build-memory [{result.split}]: {result.words} words, K={result.topk}, "
            f"D={result.feature_dim}: {result.summary()['with_memory']} with a memory, {missing}; "
            f"specials have none -> {result.path}{state}")


@click.command("show-memory")
@common_options
@click.argument("words", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG to write. Default: <artifacts>/show-memory.png.")
@click.option("--split", type=click.Choice(SPLITS), default=None,
              help="Split whose images are cropped (default: the one memory.h5 was built from).")
def show_memory_command(run: RunContext, words: tuple[str, ...], out: Path | None,
                        split: str | None) -> None:
    """Draw the region crops that built the memory of each WORD (Figure 3).

    One row per word: its K most relevant images' chosen regions, each labelled with its
    attention weight a_k and source image id; N is the number of relevant images.
    """
    import h5py

    from cpgan.errors import CpganError
    from cpgan.pipeline.coco import CocoSplit
    from cpgan.pipeline.memory import MEMORY_NAME, draw_memory

    if split is None:
        try:
            with h5py.File(run.artifacts / MEMORY_NAME, "r") as f:
                split = str(f.attrs["split"])
        except (OSError, KeyError):
            raise CpganError(f"{run.artifacts / MEMORY_NAME}: no readable memory bank "
                             "(run 'cpgan-prep build-memory')") from None
    out = out or run.artifacts / "show-memory.png"
    draw_memory(run.artifacts, CocoSplit.open(run.coco_root, split),
                [w.lower() for w in words], out)
    click.echo(f"show-memory: {len(words)} words -> {out}")
