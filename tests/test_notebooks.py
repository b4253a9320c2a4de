"""The reading notebooks in notebooks/.

Each notebook has a jupytext percent-format source ``notebooks/NN_name.py`` (the source of truth)
and a paired ``NN_name.ipynb`` committed with the outputs of a full-mode run.  These tests check
that every .ipynb holds exactly its source's cells (outputs, metadata and cell ids are ignored,
so saving a notebook from Jupyter keeps them green) and execute every source top to bottom in
quick mode (KFC_REF_QUICK=1), from notebooks/ as Jupyter would.
``jupytext --sync notebooks/*.py`` brings a source and its notebook back in line.
"""
import copy
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
SOURCES = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "[0-9][0-9]_*.py")))
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
SYNC_COMMAND = "jupytext --sync notebooks/*.py"
#: Per-cell limit: a quick-mode cell takes seconds; a hung kernel should fail, not stall CI.
CELL_TIMEOUT_S = 120
#: The committed notebooks carry their outputs (figures as PNG); keep the repository light.
MAX_TOTAL_NOTEBOOK_BYTES = 5_000_000

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed")
jupytext = pytest.importorskip("jupytext", reason="jupytext is not installed")


def cell_sources(nb) -> list[tuple[str, str]]:
    """What a notebook says, without what running it produced: (cell type, source) per cell."""
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def _name(path):
    return os.path.splitext(os.path.basename(path))[0]


def test_every_source_has_its_notebook_and_readme_entry():
    assert len(SOURCES) == 8, SOURCES
    assert [_name(p) for p in SOURCES] == [_name(p) for p in NOTEBOOKS]
    with open(os.path.join(NOTEBOOK_DIR, "README.md")) as fh:
        readme = fh.read()
    for path in SOURCES:
        assert os.path.basename(path) in readme, f"{path} is missing from notebooks/README.md"
    assert SYNC_COMMAND in readme, "notebooks/README.md must give the sync command"


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_notebook_cells_equal_their_source(source):
    notebook = nbformat.read(source[:-3] + ".ipynb", as_version=4)
    expected, committed = cell_sources(jupytext.read(source)), cell_sources(notebook)
    mismatches = [k for k, (a, b) in enumerate(zip(expected, committed)) if a != b]
    assert len(expected) == len(committed) and not mismatches, (
        f"{os.path.basename(source)} and its .ipynb differ (cells {mismatches[:5]}, "
        f"{len(expected)} vs {len(committed)} cells); run `{SYNC_COMMAND}`")


def test_cell_comparison_sees_an_edit_and_ignores_outputs(tmp_path):
    """Negative control for the test above: an edited cell differs, an executed one does not."""
    nb = jupytext.read(SOURCES[0])
    saved = copy.deepcopy(nb)
    code = next(c for c in saved.cells if c.cell_type == "code")
    code["outputs"] = [nbformat.v4.new_output("stream", text="ran\n")]
    code["execution_count"] = 1
    path = tmp_path / "saved.ipynb"
    nbformat.write(saved, str(path))                           # what Jupyter's save would do
    assert cell_sources(nbformat.read(str(path), as_version=4)) == cell_sources(nb)
    code["source"] += "\nprint('edited')"
    assert cell_sources(saved) != cell_sources(nb)


def test_committed_notebooks_are_small():
    total = sum(os.path.getsize(p) for p in NOTEBOOKS)
    assert total < MAX_TOTAL_NOTEBOOK_BYTES, f"notebooks total {total / 1e6:.1f} MB"


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_notebook_runs_in_quick_mode(source, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (no python3 kernel)")
    monkeypatch.setenv("KFC_REF_QUICK", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)       # the kernel's inline backend
    nb = jupytext.read(source)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()
    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
    assert "quick mode" in "".join(out.get("text", "") for out in nb.cells[1].outputs)
