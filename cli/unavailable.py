"""Entry points whose stages have not landed yet.

They exist so the console scripts are installed from the start, and they say plainly
that the stage is not available instead of pretending to run it.
"""
from __future__ import annotations

import sys

import click

_PLANNED = {
    "cpgan-eval": "IS, FID, R-precision and SOA of generated, real and untrained-generator "
    "images, with an HTML report",
    "cpgan-sample": "images for captions from a trained generator",
}


def _command(name: str) -> click.Command:
    @click.command(name=name, help=f"{_PLANNED[name]}.\n\nNot available in this version: "
                   "the stage has not been implemented yet (see README, 'What works today').",
                   context_settings={"help_option_names": ["-h", "--help"],
                                     "ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        click.echo(f"{name}: not available in this version ({_PLANNED[name]} has not been "
                   "implemented yet; see README, 'What works today')", err=True)
        sys.exit(2)

    return command


evaluate = _command("cpgan-eval")
sample = _command("cpgan-sample")
