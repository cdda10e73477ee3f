"""``cpgan-train`` entry point (see cli/unavailable.py until its stage lands)."""
from cpgan.cli.unavailable import train as main

__all__ = ["main"]
