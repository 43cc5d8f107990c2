"""The family matrix against docs/models.md: each cell's outcome is what the page says.

Regenerate the page after a change that moves a cell: ``python -m tests.families.render``.
"""

import pytest

pytest.importorskip("compressed_tensors", reason="needs the engines extra")
pytest.importorskip("onnxruntime", reason="needs the engines extra")
pytest.importorskip("gguf", reason="needs the engines extra")

from tests.families import cases, render  # noqa: E402

pytestmark = pytest.mark.external
REGEN = "regenerate docs/models.md with `python -m tests.families.render`"


@pytest.fixture(scope="module")
def doc():
    return render.read_doc()


@pytest.mark.parametrize("family,path", cases.CELLS, ids=[f"{f}-{p}" for f, p in cases.CELLS])
def test_cell_outcome_is_what_the_doc_says(family, path, doc):
    got = cases.run_cell(family, path)
    assert got == doc.get((family, path)), \
        f"{family} x {path}: ran {got!r}, docs/models.md says {doc.get((family, path))!r}; " \
        f"{REGEN} if the change is intended"


def test_doc_lists_exactly_the_cells(doc):
    assert list(doc) == cases.CELLS, REGEN


def test_doc_is_rendered_from_its_cells(doc):
    """The matrix, the footnotes and the descriptions are what ``render`` writes for the
    outcomes the page lists: nothing edited by hand."""
    assert render.DOC.read_text() == render.render(doc), REGEN


def test_no_cell_fails(doc):
    fails = [f"{f} x {p}: {o}" for (f, p), o in doc.items() if o.startswith("FAIL")]
    if fails:
        pytest.xfail(f"{len(fails)} FAIL cells in docs/models.md (lowbit bugs, reported): "
                     + " | ".join(fails))


def test_outcome_lines_are_deterministic_and_round_trip(tmp_path):
    """Temp paths and addresses leave the outcome line; a '|' in it survives the table."""
    e = ValueError(f"cannot read {tmp_path}/lowbit-matrix-ab12/x/model.gguf at 0x7f3a2c\nmore")
    assert cases.first_line(e) == "cannot read <dir> at 0x?"
    assert cases.first_line(KeyError()) == "KeyError"
    results = {c: "yes" for c in cases.CELLS}
    results[cases.CELLS[0]] = "refused: a | b"
    doc = tmp_path / "models.md"
    doc.write_text(render.render(results))
    assert render.read_doc(doc) == results
