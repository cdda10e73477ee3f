"""``cpgan-eval`` entry point (see cli/unavailable.py until its stage lands)."""
from cpgan.cli.unavailable import evaluate as main

__all__ = ["main"]
