"""What every cpgan command shares: the common options, the resolved run context, and the
rule that a fatal input problem prints one ``error:`` line and exits non-zero."""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from cpgan.config import PRESETS, Config, load_config
from cpgan.errors import CpganError
from cpgan.pipeline.cluster import default_workers

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOY_DIRNAME = "toy-coco"


@dataclass
class RunContext:
    """The resolved common options of one command."""

    artifacts: Path
    config: Config
    coco_root_option: Path | None

    @property
    def coco_root(self) -> Path:
        """The dataset root: ``--coco-root``, else the toy dataset, generated on first use."""
        if self.coco_root_option is not None:
            if not self.coco_root_option.is_dir():
                raise CpganError(f"{self.coco_root_option}: --coco-root is not a folder")
            return self.coco_root_option
        toy = self.artifacts / TOY_DIRNAME
        if not toy.exists():
            from cpgan.pipeline.toy import generate_toy_coco

            click.echo(f"no --coco-root given: generating the toy dataset at {toy}", err=True)
            generate_toy_coco(toy, seed=self.config.seed)
        return toy

    def project_path(self, value: str | Path) -> Path:
        """A path from the config, absolute: as given if it exists, else relative to the
        project root (so ``configs/darknet/yolov3.cfg`` works from any working directory).
        Absolute because provenance records store it: the same file must give the same
        record whatever folder the command ran from."""
        path = Path(value)
        if path.is_absolute() or path.exists():
            return path.resolve()
        return (PROJECT_ROOT / path).resolve()


def common_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --artifacts, --preset, --config and --coco-root; pass a RunContext as ``run``."""

    @click.option(
        "--artifacts",
        type=click.Path(file_okay=False, path_type=Path),
        default="artifacts",
        envvar="CPGAN_ARTIFACTS",
        show_default=True,
        help="Root folder of every artifact (env CPGAN_ARTIFACTS).",
    )
    @click.option(
        "--preset",
        type=click.Choice(PRESETS),
        default="toy",
        show_default=True,
        help="Sizes: 'toy' trains on two CPU cores in minutes, 'paper' is COCO at the paper's sizes.",
    )
    @click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="TOML file overriding any preset value (same sections as configs/*.toml).",
    )
    @click.option(
        "--coco-root",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="COCO 2014 root (annotations/, train2014/, val2014/). "
        "Default: the toy dataset at <artifacts>/toy-coco, made on first use.",
    )
    @functools.wraps(command)
    def wrapper(
        artifacts: Path, preset: str, config_file: Path | None, coco_root: Path | None, **kwargs: Any
    ) -> Any:
        run = RunContext(artifacts, load_config(preset, config_file), coco_root)
        return command(run=run, **kwargs)

    return wrapper


def cluster_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --workers and --scheduler, the dask cluster of a parallel prep stage."""
    command = click.option(
        "--scheduler",
        default=None,
        help="Address of an existing dask scheduler, e.g. tcp://host:8786 "
        "(the artifacts folder must be on a filesystem the workers share).",
    )(command)
    return click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=default_workers(),
        show_default="the number of CPU cores",
        help="Dask worker processes of the LocalCluster, one torch thread each "
        "(ignored with --scheduler).",
    )(command)


def report_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Run a Click entry point, turning CpganError into one stderr line and exit status 1."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, standalone_mode=False, **kwargs)
        except CpganError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)

    return wrapper

