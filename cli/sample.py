"""``cpgan-sample``: images for captions from a trained CPGAN run.

Reads a GAN run checkpoint (the run contract), the vocabulary, the memory bank and the text
encoder it names (:mod:`cpgan.trainer.sampling`); writes one PNG with N images per caption, the
caption written under its row. The same seed gives the same file, byte for byte.
"""
from __future__ import annotations

from pathlib import Path

import click

from cpgan.cli.common import RunContext, common_options, report_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@common_options
@click.argument("captions", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PNG to write.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Noise seed: the same seed, captions and N give the same images.")
@click.option("--n", "per_caption", type=click.IntRange(min=1, max=64), default=4,
              show_default=True, help="Images per caption.")
@click.option("--checkpoint", "checkpoint_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="GAN run checkpoint. Default: the most recently modified "
              "<artifacts>/runs/*/checkpoint.pt, or <artifacts>/runs/cpgan/checkpoint.pt when "
              "there is none.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
def cli(run: RunContext, captions: tuple[str, ...], out: Path, seed: int, per_caption: int,
        checkpoint_path: Path | None, device: str) -> None:
    """Draw N images for each CAPTION with a trained generator (its EMA weights).

    \b
    Example:
      cpgan-sample "a red ball left of a blue square on the grass" "two green stars" \\
          --out samples.png --n 4 --seed 1

    Words the vocabulary does not know are read as <unk> and listed on stderr; only the
    first data.max_caption_words words of a caption are read.
    """
    from cpgan.pipeline.report import draw_caption_grid
    from cpgan.trainer.sampling import check_captions, default_checkpoint, load_sampler, to_uint8

    check_captions(captions)
    sampler = load_sampler(checkpoint_path or default_checkpoint(run.artifacts), run.artifacts,
                           device)
    batch = sampler.captions(captions)
    limit = sampler.config.data.max_caption_words
    for text, unknown, cut in zip(captions, batch.unknown, batch.truncated):
        if unknown:
            click.echo(f"cpgan-sample: not in the vocabulary, read as <unk>: "
                       f"{', '.join(unknown)} (in {text!r})", err=True)
        if cut:
            click.echo(f"cpgan-sample: {text!r} has {limit + cut} words; only the first {limit} "
                       "are read", err=True)
    images = sampler.sample(batch, per_caption, seed)
    draw_caption_grid(to_uint8(images), list(captions), per_caption, out)
    checkpoint = sampler.checkpoint
    click.echo(f"cpgan-sample: {len(captions)} caption(s) x {per_caption} images from "
               f"{checkpoint.run_name} step {checkpoint.step}, seed {seed} -> {out}")


main = report_errors(cli)

if __name__ == "__main__":
    main()
