"""lvface: training system for LVFace.

`lvface.kernels` lives in the repository's top-level `kernels/` folder (DESIGN.md). An installed
lvface (wheel or `pip install -e .`) maps it through pyproject's package-dir. A plain source checkout
on PYTHONPATH -- how `deepspeed lvface/train.py` runs on a cluster without an install, and how
benchmarks/gpu_check.sh runs on an offline GPU node -- has no such mapping, so `_install_kernels_finder`
adds one finder for exactly that one name, and only when the checkout's layout is there: this file's
folder has no `kernels/` of its own and `../kernels/__init__.py` exists. It goes first on
sys.meta_path so that this checkout's kernels are imported with this checkout's lvface, never another
installed copy's. Nothing else is added to sys.path.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds `lvface.kernels` (and, through its search path, its submodules) in a checkout's kernels/."""

    def __init__(self, kernels_dir: Path) -> None:
        self.kernels_dir = kernels_dir

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "lvface.kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.kernels_dir / "__init__.py", submodule_search_locations=[str(self.kernels_dir)])


def _install_kernels_finder() -> None:
    package_dir = Path(__file__).resolve().parent
    kernels_dir = package_dir.parent / "kernels"
    if (package_dir / "kernels").exists() or not (kernels_dir / "__init__.py").is_file():
        return  # an installed package, or a checkout that maps kernels/ itself
    if any(isinstance(finder, _CheckoutKernelsFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _CheckoutKernelsFinder(kernels_dir))


_install_kernels_finder()

from lvface.logs import quiet_library_messages  # noqa: E402 (after the finder: it imports nothing of lvface's)

quiet_library_messages()
