"""The first cell of every reading notebook: ``from nbsetup import QUICK, show``.

* puts this checkout's ``kfc_ref`` first on ``sys.path`` (the notebooks run from notebooks/
  without installing the package, and never pick up another installed copy);
* ``QUICK``: True when the environment sets ``KFC_REF_QUICK=1`` (what CI sets), which shrinks
  every experiment so that a notebook runs in seconds;
* NumPy prints 4 digits; ``show(path)`` displays a PNG written by ``kfc_ref.experiments.plotting``.
"""
import os
import sys

QUICK = os.environ.get("KFC_REF_QUICK", "0") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(ROOT, "kfc_ref")) and sys.path[0] != ROOT:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

np.set_printoptions(precision=4, suppress=True, linewidth=110)


def show(path):
    """Display a PNG written by a kfc_ref.experiments.plotting function."""
    from IPython.display import Image, display
    display(Image(filename=path))
