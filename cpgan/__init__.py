"""CPGAN: Content-Parsing GAN for text-to-image synthesis (Liang, Pei & Lu).

The subpackages are the repository's top-level folders, installed under this name:
``cpgan.pipeline`` (offline stages), ``cpgan.model`` (torch modules, losses, metrics),
``cpgan.trainer`` (training loops) and ``cpgan.cli`` (Click front ends).
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cpgan")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
