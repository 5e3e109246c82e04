"""Package list for setuptools (metadata lives in pyproject.toml).

The repository's top-level ``models/`` folder (the bundled model folders) is
installed as the ``sdltag_models`` package, so a built wheel carries the default
model and ``sdltag.modelfolder.default_model_dir()`` finds it.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["sdltag", "sdltag.*"]) + ["sdltag_models"],
    package_dir={"sdltag_models": "models"},
)
