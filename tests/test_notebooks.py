"""Every reading notebook in notebooks/ runs top to bottom in quick mode (KFC_REF_QUICK=1), and
the committed notebooks are exactly what notebooks/build_notebooks.py generates (no outputs)."""
import glob
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
#: Per-cell limit: a quick-mode cell takes seconds; a hung kernel should fail, not stall CI.
CELL_TIMEOUT_S = 120

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (no python3 kernel)")


def test_there_is_a_notebook_per_topic():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert len(names) == 8, names
    with open(os.path.join(NOTEBOOK_DIR, "README.md")) as fh:
        readme = fh.read()
    for name in names:
        assert name in readme, f"{name} is missing from notebooks/README.md"


def test_committed_notebooks_match_the_generator(tmp_path):
    sys.path.insert(0, NOTEBOOK_DIR)
    try:
        import build_notebooks
    finally:
        sys.path.remove(NOTEBOOK_DIR)
    for path in build_notebooks.build(str(tmp_path)):
        committed = nbformat.read(os.path.join(NOTEBOOK_DIR, os.path.basename(path)), 4)
        fresh = nbformat.read(path, 4)
        assert [c.source for c in committed.cells] == [c.source for c in fresh.cells], \
            f"{os.path.basename(path)} differs from build_notebooks.py; rerun the script"
        for cell in committed.cells:
            assert not cell.get("outputs"), f"{os.path.basename(path)} has committed outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_quick_mode(path, monkeypatch):
    monkeypatch.setenv("KFC_REF_QUICK", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)       # the kernel's inline backend
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()
    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
