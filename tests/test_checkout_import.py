"""`import lvface.kernels` from a plain source checkout on PYTHONPATH (no install), as
benchmarks/gpu_check.sh and `deepspeed lvface/train.py` on an uninstalled cluster checkout use it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _import_from(root: Path, code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root.parent, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_kernels_import_from_a_plain_checkout(tmp_path):
    # a checkout as git gives it: lvface/ and kernels/ side by side, no lvface/kernels link
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "lvface", checkout / "lvface", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    shutil.copytree(REPO / "kernels", checkout / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (checkout / "kernels" / "probe_kernel.py").write_text("WHERE = __file__\n")
    out = _import_from(checkout, "import lvface, lvface.kernels, lvface.kernels.probe_kernel as k; "
                                 "print(lvface.__file__); print(lvface.kernels.__file__); print(k.WHERE)")
    lvface_file, kernels_file, probe_file = out.splitlines()
    # this checkout's kernels, not another installed copy's (an editable install may be present)
    assert Path(lvface_file).parent == checkout / "lvface"
    assert Path(kernels_file) == checkout / "kernels" / "__init__.py"
    assert Path(probe_file) == checkout / "kernels" / "probe_kernel.py"


def test_no_finder_where_the_package_has_its_own_kernels(tmp_path):
    # an installed layout (site-packages/lvface/kernels/): the finder stays out of sys.meta_path
    site = tmp_path / "site"
    shutil.copytree(REPO / "lvface", site / "lvface", ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    shutil.copytree(REPO / "kernels", site / "lvface" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    out = _import_from(site, "import sys, lvface, lvface.kernels; "
                             "print(any(type(f).__name__ == '_CheckoutKernelsFinder' for f in sys.meta_path)); "
                             "print(lvface.kernels.__file__)")
    has_finder, kernels_file = out.splitlines()
    assert has_finder == "False"
    assert Path(kernels_file) == site / "lvface" / "kernels" / "__init__.py"
