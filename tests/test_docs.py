"""The documentation says true things: the README's quickstart runs and prints what the README
says, every `kfc_ref.*` name and `tests/...::test_*` reference in the docs exists, relative links
resolve, nothing refers to files outside the repository, and the packaging metadata matches the
package (version, console script)."""
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
              if f.endswith(".md"))
README = os.path.join(ROOT, "README.md")
MARKDOWN = [README, os.path.join(ROOT, "notebooks", "README.md"), *DOCS]
NOTEBOOK_SOURCES = sorted(os.path.join(ROOT, "notebooks", f)
                          for f in os.listdir(os.path.join(ROOT, "notebooks"))
                          if re.match(r"\d\d_.*\.py$", f))
NAME = re.compile(r"`(kfc_ref(?:\.\w+)+)")
TEST_REF = re.compile(r"(tests/\w+\.py)::(\w+)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
#: Files the repository must not point at (kept outside it); spelled in pieces so that this
#: test file does not match itself.
OUTSIDE = ("design" + ".md", "appendices" + ".md", "../" + "shared")


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def resolve(dotted: str):
    """Import the longest importable module prefix of ``dotted`` and get the rest as attributes."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_readme_quickstart_runs_and_prints_what_the_readme_says():
    text = _read(README)
    section = text[text.index("## API quickstart"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", 10)]
    assert len(code.strip().splitlines()) <= 14, "the quickstart should stay about 10 lines"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md quickstart", "exec"), {})
    printed = out.getvalue().strip()
    assert printed and f"`{printed}`" in section, (printed, "is not what the README says")


@pytest.mark.parametrize("path", MARKDOWN, ids=os.path.basename)
def test_every_kfc_ref_name_in_the_docs_exists(path):
    names = sorted(set(NAME.findall(_read(path))))
    missing = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"{os.path.relpath(path, ROOT)} names what does not exist: {missing}"


def test_paper_map_references_real_tests():
    text = _read(os.path.join(ROOT, "docs", "paper_map.md"))
    refs = sorted(set(TEST_REF.findall(text)))
    assert len(refs) > 40, "the paper map should cite the tests that check each equation"
    missing = [f"{f}::{t}" for f, t in refs
               if not os.path.exists(os.path.join(ROOT, f))
               or not re.search(rf"^\s*def {t}\(", _read(os.path.join(ROOT, f)), re.M)]
    assert not missing, f"docs/paper_map.md cites tests that do not exist: {missing}"


def test_paper_map_finds_a_misspelled_name():
    """Negative control for the two tests above."""
    with pytest.raises((ImportError, AttributeError)):
        resolve("kfc_ref.curvature.fisher.true_fisher_typo")
    assert resolve("kfc_ref.curvature.fisher.true_fisher") is not None


@pytest.mark.parametrize("path", MARKDOWN + NOTEBOOK_SOURCES, ids=os.path.basename)
def test_relative_links_resolve(path):
    broken = []
    for target in LINK.findall(_read(path)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue                                             # web links, anchors
        target = target.split("#")[0]
        if not os.path.exists(os.path.join(os.path.dirname(path), target)):
            broken.append(target)
    assert not broken, f"{os.path.relpath(path, ROOT)} links to missing files: {broken}"


def test_nothing_refers_to_files_outside_the_repository():
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    hits = []
    for f in files:
        if f.startswith(".ci/") or not os.path.isfile(os.path.join(ROOT, f)):
            continue
        try:
            text = _read(os.path.join(ROOT, f))
        except UnicodeDecodeError:
            continue                                             # figures, binaries
        hits += [f"{f}: {needle}" for needle in OUTSIDE if needle in text]
    assert not hits, hits


def test_version_flag_and_console_script():
    import kfc_ref
    out = subprocess.run([sys.executable, "-m", "kfc_ref", "--version"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"kfc_ref {kfc_ref.__version__}"
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    assert project["scripts"]["kfc-ref"] == "kfc_ref.__main__:main"
    assert "version" in project["dynamic"]                       # read from kfc_ref.__version__
    assert "1602.01407" in _read(os.path.join(ROOT, "CITATION.cff"))
