"""The Colab tutorials run top to bottom (smoke mode) and are committed clean.

Each notebook in ``tutorials/`` is executed in a fresh ``python3`` kernel with
``KERAS_SAM_SMOKE=1``: tiny models, one epoch, and ``tfds.testing.mock_data``
instead of the CIFAR-10 download, so no network is needed. A cell that raises
fails the test.
"""

from __future__ import annotations

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs nbformat (the `test` extra)")
nbclient = pytest.importorskip("nbclient", reason="needs nbclient (the `test` extra)")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_momentum_sam", "03_cheap_sam", "04_tpu_training", "05_sharpness"]
COLAB = "https://colab.research.google.com/github/keras-sam/keras-sam/blob/main/tutorials/"
CELL_TIMEOUT_S = 300

by_name = pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)


def _read(path: pathlib.Path):
    return nbformat.read(path, as_version=4)


def test_every_tutorial_is_present():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@by_name
def test_notebook_is_committed_clean(path):
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: commit notebooks with outputs cleared"
            assert cell.execution_count is None, f"{path.name}: clear execution counts"


@by_name
def test_notebook_has_colab_badge_and_install_cell(path):
    nb = _read(path)
    assert nb.cells[0].cell_type == "markdown"
    assert f"{COLAB}{path.name}" in nb.cells[0].source, "Open-in-Colab badge"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "pip" in first_code.source and "install" in first_code.source
    assert 'find_spec("keras_sam") is None' in first_code.source, "install only if missing"


@by_name
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_SAM_SMOKE", "1")
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    # The kernel must import this checkout of keras_sam even when it is not installed.
    pythonpath = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), pythonpath])))
    nb = _read(path)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # files the notebook writes go here
    )
    client.execute()
