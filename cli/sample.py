"""``cpgan-sample`` entry point (see cli/unavailable.py until its stage lands)."""
from cpgan.cli.unavailable import sample as main

__all__ = ["main"]
