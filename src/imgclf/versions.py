"""Library versions recorded in every run's config.yaml."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("imgclf", "torch", "torchvision", "timm", "scikit-learn", "numpy", "pillow")


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def version() -> str:
    """imgclf's own version."""
    try:
        return metadata.version("imgclf")
    except metadata.PackageNotFoundError:
        return "(not installed)"
