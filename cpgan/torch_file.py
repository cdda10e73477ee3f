"""Reading a ``.pt``/``.pth`` file without trusting it.

Every weight, checkpoint and encoder file the project reads comes through
:func:`load_torch_file`. ``torch.load(weights_only=True)`` builds tensors, dicts, lists and
numbers only, never an arbitrary pickled object (the guide's security rule), and every way the
load can fail (a pickled object refused, a truncated zip, an I/O error) becomes the same
one-line :class:`CpganError` naming the file. What the file holds is then the caller's to check:
each reader validates the keys, types and sizes it relies on before using them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from cpgan.errors import CpganError


def load_torch_file(path: str | Path, what: str, missing_hint: str = "") -> Any:
    """The content of ``path`` read on the CPU with ``weights_only=True``.

    ``what`` names the file's kind in errors ("GAN checkpoint"); ``missing_hint`` says how to
    get the file when it is absent ("run 'cpgan-prep train-detector'").
    """
    path = Path(path)
    if not path.is_file():
        hint = f" ({missing_hint})" if missing_hint else ""
        raise CpganError(f"{path}: {what} not found{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling refusal, a corrupt zip, an I/O error: one user error
        raise CpganError(f"{path}: not a readable {what} ({type(exc).__name__} under "
                         "torch.load(weights_only=True))") from None


def refuse_nonfinite(path: str | Path, tensors: Mapping[str, Any], what: str) -> None:
    """Refuse, in one line, the first floating tensor of ``tensors`` holding NaN or infinity.

    A network loaded with such a weight does not fail: it answers NaN for every input (no
    region detected, NaN attention, NaN images), far from the file that caused it. ``what``
    names the mapping in the message ("'state_dict'"). Tensors that are not dense floating
    point are left to the caller's own checks.
    """
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.layout == torch.strided and \
                value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CpganError(f"{path}: {what} entry '{key}' holds NaN or infinite values")
