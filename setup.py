"""Package layout that ``pyproject.toml`` cannot express: the top-level ``assets/`` folder (the tiny offline world,
example grids and prompts) is installed as the data package ``studio_assets``, so a wheel carries it and the
installed studio finds it from any directory (see :mod:`pipelines.assets`). Everything else is in pyproject.toml.
"""

from setuptools import find_namespace_packages, find_packages, setup

CODE = find_packages(include=["studio*", "pipelines*", "fusion*", "ui*"]) + find_namespace_packages(
    include=["studio.*", "pipelines.*", "fusion.*", "ui.*"], exclude=["*.__pycache__"])
ASSETS = ["studio_assets"] + [f"studio_assets.{p}" for p in find_namespace_packages(where="assets")]

setup(
    packages=sorted(set(CODE)) + ASSETS,
    package_dir={"studio_assets": "assets"},  # its package data ("**/*") is declared in pyproject.toml
)
