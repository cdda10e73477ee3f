"""Install the project's top-level folders under the single import name ``cpgan``.

The design card keeps ``pipeline/``, ``model/``, ``trainer/`` and ``cli/`` at the top of the
repository; ``package_dir`` maps them to ``cpgan.pipeline`` etc. so nothing generic lands in
site-packages. Everything else (dependencies, console scripts) lives in setup.cfg.
"""
from setuptools import setup

SUBPACKAGES = ("pipeline", "model", "trainer", "cli")

setup(
    packages=["cpgan"] + [f"cpgan.{name}" for name in SUBPACKAGES],
    package_dir={"cpgan": "cpgan", **{f"cpgan.{name}": name for name in SUBPACKAGES}},
)
