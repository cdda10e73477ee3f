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


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Any) -> None:
    """Put a checkpoint's optimizer state back, then check each parameter's entries.

    ``Optimizer.load_state_dict`` checks the parameter groups' sizes, not the per-parameter
    state: an Adam moment of another shape loads, then crashes the first step far from the
    file, and a NaN or negative one turns the weights it updates NaN at the first step. Raises
    ``ValueError``, which :func:`refusing_unfit_checkpoint` turns into one line naming the file.
    """
    optimizer.load_state_dict(state)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            _check_optimizer_entry(f"optimizer state '{key}' of parameter {index}", key, value,
                                   param)


def _check_optimizer_entry(what: str, key: str, value: Any, param: torch.Tensor) -> None:
    """A step count is a finite non-negative scalar; every other entry is a finite floating
    tensor of the parameter's shape, and a running mean of squares is not negative."""
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        raise ValueError(f"{what} is not a dense tensor")
    if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} is not finite floating-point")
    if key == "step":
        if value.dim() != 0 or float(value) < 0:
            raise ValueError(f"{what} is not a non-negative scalar")
    elif value.shape != param.shape:
        raise ValueError(f"{what} has shape {tuple(value.shape)}, the parameter "
                         f"{tuple(param.shape)}")
    elif key.endswith("_sq") and bool((value < 0).any()):
        raise ValueError(f"{what} holds negative values")


@contextmanager
def refusing_unfit_checkpoint(path: Path) -> Iterator[None]:
    """Turn a failure to restore a checkpoint's states (a missing key, a tensor of another
    shape) into one line naming the file."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CpganError(f"{path}: weights, optimizer or RNG states do not fit this run "
                         f"({reason})") from None
