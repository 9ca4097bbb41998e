"""Package list for setuptools; everything else is in pyproject.toml.

`zoo/` (the model registry, one TOML file per artifact) sits at the repository top so that it is
easy to review; the wheel installs it as `my3dgen_cli/zoo_registry_data/`. `my3dgen` is the public Python
API under the install name (lazy re-exports of `my3dgen_cli`).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["my3dgen", "my3dgen_cli", "my3dgen_cli.*"]), "my3dgen_cli.zoo_registry_data"],
    package_dir={"my3dgen_cli.zoo_registry_data": "zoo"},
)
