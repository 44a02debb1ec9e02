"""The notebooks: committed without outputs, and executed end to end on small real inputs.

They run with nbclient in a kernel of this interpreter (``python3``, the venv's ipykernel), from
``notebooks/`` as Jupyter would, with ``OMNIENC_NB_SMALL=1`` (a few volumes, a few pretraining
steps) and ``OMNIENC_NB_OUT`` pointing at a temporary folder. On 2 CPU cores with a cold cache
the latent notebook takes about 35 s (most of it numba compiling UMAP) and the quick start about
45 s, under the one minute that would make them ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def stripped_problems(nb: nbformat.NotebookNode) -> list[str]:
    """Why a notebook is not stripped: outputs, execution counts, widget state."""
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"cell {i} has outputs")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i} has an execution count")
    if "widgets" in nb.metadata:
        problems.append("metadata holds widget state")
    return problems


def test_both_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} == {"latent_umap.ipynb", "quickstart.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebooks_are_valid_and_stripped(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert stripped_problems(nb) == []
    assert nb.metadata["kernelspec"]["name"] == "python3"
    # Consumers only: they import the package, never a test or benchmark helper by path.
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "sys.path" not in code and "import tests" not in code


def test_stripped_check_catches_outputs(tmp_path: Path):
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    cell.execution_count = 3
    assert stripped_problems(nb) == ["cell 1 has outputs", "cell 1 has an execution count"]


def _execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("OMNIENC_NB_SMALL", "1")
    monkeypatch.setenv("OMNIENC_NB_OUT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "agg")
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO / "notebooks")}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(json.dumps(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_latent_umap_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nb = _execute("latent_umap.ipynb", tmp_path, monkeypatch)
    out = tmp_path / "latent_umap"
    for tag in ("pretrained", "random-init"):
        for suffix in ("png", "html", "csv"):
            assert (out / f"{tag}.{suffix}").stat().st_size > 0
    text = _text(nb)
    assert "trustworthiness" in text and "label within breastmnist 28" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2


def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nb = _execute("quickstart.ipynb", tmp_path, monkeypatch)
    out = tmp_path / "quickstart"
    assert (out / "pretrain" / "encoder" / "model.safetensors").is_file()
    assert (out / "liver_in_query.nii.gz").is_file()
    text = _text(nb)
    assert "step 4" in text and "test AUC" in text and "Dice" in text
