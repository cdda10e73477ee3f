"""What the resumable trainers share: the RNG states a checkpoint carries, the check that a
checkpoint belongs to the run resuming it, and one refusal for a checkpoint that does not fit.

A resumed run must continue *the same* run (the guide: a killed and resumed run gives the same
result as an uninterrupted one), so a checkpoint is refused, in one line naming the file, when
it was trained with other settings, when it is past the epochs asked for, or when its weights,
optimizer or RNG states cannot be put back into this run's objects.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from cpgan.errors import CpganError
from cpgan.torch_file import load_torch_file


def rng_state() -> dict[str, Any]:
    """The torch RNGs (CPU, and CUDA once initialised) that drive dropout and noise draws."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_epoch_checkpoint(
    path: Path,
    what: str,
    settings: dict[str, Any],
    total_epochs: int,
    stored_settings: Callable[[Any], Any] = lambda stored: stored,
) -> dict[str, Any]:
    """The checkpoint ``path`` of an epoch-based trainer, when it belongs to this run.

    ``stored_settings`` maps the checkpoint's recorded settings to today's form (keys the
    checkpoint predates filled with their defaults, :func:`cpgan.config.fill_new_keys`), so an
    upgrade of the code does not strand a resume.
    """
    state = load_torch_file(path, what)
    if not isinstance(state, dict) or stored_settings(state.get("settings")) != settings:
        raise CpganError(f"{path}: checkpoint was trained with other settings or data; "
                         "remove it (or drop --resume) to restart")
    epoch = state.get("epoch")
    if type(epoch) is not int or epoch < 0:
        raise CpganError(f"{path}: checkpoint has no epoch count")
    if epoch > total_epochs:
        raise CpganError(f"{path}: checkpoint is at epoch {epoch}, beyond the "
                         f"{total_epochs} epochs asked for")
    return state


@contextmanager
def refusing_unfit_checkpoint(path: Path) -> Iterator[None]:
    """Turn a failure to restore a checkpoint's states (a missing key, a tensor of another
    shape) into one line naming the file."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CpganError(f"{path}: weights or RNG states do not fit this run "
                         f"({reason})") from None
