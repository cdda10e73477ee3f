"""What the resumable trainers share: the RNG states a checkpoint carries, the check that a
checkpoint belongs to the run resuming it, and one refusal for a checkpoint that does not fit.

A resumed run must continue *the same* run (the guide: a killed and resumed run gives the same
result as an uninterrupted one), so a checkpoint is refused, in one line naming the file, when
it was trained with other settings, when it is past the epochs asked for, or when its weights,
optimizer or RNG states, counts or histories cannot be put back into this run's objects (the
checks here are the ones the trainers share; torch's own loaders take any values there).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

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
    """Put a checkpoint's optimizer state back, then check its settings and each parameter's
    entries.

    ``Optimizer.load_state_dict`` checks the parameter groups' sizes, not what they hold: an
    Adam moment of another shape loads, then crashes the first step far from the file, a NaN
    or negative one turns the weights it updates NaN at the first step, and the groups'
    settings (betas, weight decay) replace this run's. Only the learning rate may differ (the
    schedules change it). Raises ``ValueError``, which :func:`refusing_unfit_checkpoint` turns
    into one line naming the file.
    """
    expected = [_group_settings(group) for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for index, group in enumerate(optimizer.param_groups):
        stored, ours = _group_settings(group), expected[index]
        for key in sorted(stored.keys() | ours.keys()):
            if stored.get(key) != ours.get(key):
                raise ValueError(f"optimizer setting '{key}' of group {index} is "
                                 f"{stored.get(key)!r}, this run {ours.get(key)!r}")
        if not is_finite_number(group["lr"]) or group["lr"] < 0:
            raise ValueError(f"optimizer learning rate of group {index} is {group['lr']!r}")
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


def _group_settings(group: Mapping[str, Any]) -> dict[str, Any]:
    """A parameter group's settings that no schedule changes."""
    return {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool, which is an int to Python) that is neither NaN nor
    infinite: what a loss, a metric or a rate read from a file must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def count_entry(state: Mapping[str, Any], key: str, most: int | None = None) -> int:
    """``state[key]`` as a count (an epoch, images seen, average updates): an int, not a
    bool, from 0 to ``most``."""
    value = state[key]
    if type(value) is not int or value < 0 or (most is not None and value > most):
        bound = "" if most is None else f" up to {most}"
        raise ValueError(f"'{key}' must be an integer from 0{bound}, got {value!r}")
    return value


def finite_numbers(values: Any, what: str) -> list[float]:
    """``values`` as a list of finite numbers (a loss history)."""
    if not isinstance(values, list) or not all(is_finite_number(v) for v in values):
        raise ValueError(f"{what} must be a list of finite numbers")
    return [float(v) for v in values]


def failed_images(state: Mapping[str, Any]) -> dict[int, str]:
    """The images a run recorded as undecodable: ``failed_ids`` (image ids) and
    ``failed_reasons`` (one message each), lists of one length."""
    ids, reasons = state["failed_ids"], state["failed_reasons"]
    if not isinstance(ids, list) or not isinstance(reasons, list) or len(ids) != len(reasons) \
            or not all(type(i) is int for i in ids) or not all(isinstance(r, str) for r in reasons):
        raise ValueError("'failed_ids' and 'failed_reasons' must be lists of image ids and "
                         "messages of one length")
    return dict(zip(ids, reasons))


@contextmanager
def refusing_unfit_checkpoint(path: Path) -> Iterator[None]:
    """Turn a failure to restore a checkpoint's states (a missing key, a tensor of another
    shape) into one line naming the file."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CpganError(f"{path}: checkpoint does not fit this run ({reason}); remove it "
                         "(or drop --resume) to restart") from None
