"""``cpgan-prep``: the offline stages that turn COCO into frozen artifacts.

Each subcommand reads artifacts, writes artifacts atomically with a provenance record, and
skips work that is already done with the same inputs and parameters.
"""
from __future__ import annotations

from pathlib import Path

import click

from cpgan.cli.common import TOY_DIRNAME, RunContext, common_options, report_errors
from cpgan.errors import CpganError
from cpgan.pipeline import artifacts


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
def cli() -> None:
    """Offline preprocessing for CPGAN: dataset -> vocabulary -> YOLOv3 regions ->
    Bottom-Up/Top-Down attention -> per-word memory (paper §3.2.1).

    Every command works with no arguments on the embedded toy dataset (made on first use
    under <artifacts>/toy-coco) and on COCO 2014 with --coco-root. Outputs land under
    --artifacts (default ./artifacts); 'cpgan-prep status' says what is done.
    """


@cli.command("make-toy")
@common_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write the dataset. Default: <artifacts>/toy-coco.")
@click.option("--train-images", type=click.IntRange(min=1), default=4000, show_default=True)
@click.option("--val-images", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=128, show_default=True,
              help="Side of the square images in pixels.")
@click.option("--seed", type=int, default=None, help="Random seed (default: the preset's seed).")
def make_toy(run: RunContext, out: Path | None, train_images: int, val_images: int,
             image_size: int, seed: int | None) -> None:
    """Generate the toy dataset in the official COCO 2014 layout.

    Small images of coloured shapes (circle, square, triangle, star, ...) on textured
    backgrounds, each with instance boxes and 5 true captions such as "a small red circle
    left of a blue square on the grass". The same seed gives the same bytes.
    """
    from cpgan.pipeline.toy import generate_toy_coco

    out = out or run.artifacts / TOY_DIRNAME
    if out.exists():
        click.echo(f"make-toy: {out} already exists; remove it to generate again")
        return
    generate_toy_coco(out, train_images=train_images, val_images=val_images,
                      image_size=image_size, seed=run.config.seed if seed is None else seed)
    click.echo(f"make-toy: {train_images} train + {val_images} val images -> {out}")


@cli.command("vocab")
@common_options
@click.option("--min-count", type=click.IntRange(min=1), default=None,
              help="Keep words seen at least this often in train captions (default: preset).")
def vocab(run: RunContext, min_count: int | None) -> None:
    """Build the vocabulary shared by every stage from the train captions.

    AttnGAN's tokenisation (lower-case, \\w+ tokens, non-ASCII dropped); specials <pad>
    <unk> <bos> <eos> take ids 0-3. Writes <artifacts>/vocab.json.
    """
    from cpgan.pipeline.coco import CocoSplit
    from cpgan.pipeline.text import build_vocabulary

    if min_count is not None:
        run.config.data.min_word_count = min_count
    params = {"min_count": run.config.data.min_word_count}
    captions_file = run.coco_root / "annotations" / "captions_train2014.json"
    target = run.artifacts / "vocab.json"
    if artifacts.is_current(run.artifacts, "vocab", params=params, inputs=[captions_file]):
        click.echo(f"vocab: up to date ({target})")
        return
    split = CocoSplit.open(run.coco_root, "train2014")
    texts = (text for image_id in split.image_ids() for _cid, text in split.captions(image_id))
    vocabulary = build_vocabulary(texts, params["min_count"])
    vocabulary.save(target)
    summary = {"tokens": len(vocabulary)}
    artifacts.write_record(run.artifacts, "vocab", config=run.config.to_dict(), params=params,
                           inputs=[captions_file], outputs=[target], summary=summary)
    click.echo(f"vocab: {len(vocabulary)} tokens (min count {params['min_count']}) -> {target}")


@cli.command("status")
@common_options
def status(run: RunContext) -> None:
    """Say which stages are done, stale (an input changed since) or missing."""
    split_stages = {"detect", "attend"}
    for stage in artifacts.STAGES:
        splits = _recorded_splits(run.artifacts, stage) if stage in split_stages else [None]
        for split in splits or ["train2014"]:
            state, reason = artifacts.stage_state(run.artifacts, stage, split)
            label = f"{stage} [{split}]" if split else stage
            click.echo(f"{label:<26} {state:<8} {reason}".rstrip())


def _recorded_splits(root: Path, stage: str) -> list[str]:
    folder = artifacts.record_path(root, stage, "x").parent
    return sorted(p.name.removesuffix(".provenance.json") for p in folder.glob("*.provenance.json"))


main = report_errors(cli)

if __name__ == "__main__":
    main()
