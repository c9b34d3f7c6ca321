"""Every notebook in notebooks/ runs top to bottom at smoke scale and draws a figure.

SANDBOX_SMOKE=1 makes each notebook pick its seconds-long scale (tiny models, a few steps,
one worker, outputs in a temp dir). The kernel is the `python3` kernel of ipykernel, which
jupyter_client starts with this interpreter (sys.executable).
"""

from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_the_four_notebooks_are_there():
    expected = {
        "01_capability_gaps",
        "02_h3_ablations",
        "03_length_and_speed",
        "04_sweep_analysis",
    }
    assert expected <= {p.stem for p in NOTEBOOKS}


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_smoke_scale(path, tmp_path, monkeypatch):
    monkeypatch.setenv("SANDBOX_SMOKE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temp output dirs land here
    monkeypatch.delenv("SANDBOX_WORKERS", raising=False)
    monkeypatch.delenv("SANDBOX_STORAGE_URL", raising=False)
    monkeypatch.delenv("SANDBOX_STUDY", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError naming the failing cell

    figures = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "display_data" and "image/png" in output.get("data", {})
    ]
    assert figures, f"{path.name} drew no figure (no image/png display_data output)"
