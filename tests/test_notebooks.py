"""Every notebook in notebooks/ runs top to bottom at smoke scale and draws a figure; the
sweep notebook also reads a study that has no complete trial yet.

SANDBOX_SMOKE=1 makes each notebook pick its seconds-long scale (tiny models, a few steps,
one worker, outputs in a temp dir). The kernel is the `python3` kernel of ipykernel, which
jupyter_client starts with this interpreter (sys.executable).
"""

from pathlib import Path

import nbclient
import nbformat
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

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


def execute(path: Path, tmp_path: Path, monkeypatch, **env: str) -> nbformat.NotebookNode:
    """Run the notebook at smoke scale with `env` set on top; returns it with its outputs."""
    monkeypatch.setenv("SANDBOX_SMOKE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temp output dirs land here
    for name in ("SANDBOX_WORKERS", "SANDBOX_STORAGE_URL", "SANDBOX_STUDY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    return nb


def outputs(nb: nbformat.NotebookNode) -> list:
    """The outputs of every code cell, in order."""
    return [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_smoke_scale(path, tmp_path, monkeypatch):
    nb = execute(path, tmp_path, monkeypatch)
    figures = [
        output
        for output in outputs(nb)
        if output.output_type == "display_data" and "image/png" in output.get("data", {})
    ]
    assert figures, f"{path.name} drew no figure (no image/png display_data output)"


@pytest.mark.parametrize(
    "states",
    [(TrialState.FAIL, TrialState.WAITING), (TrialState.PRUNED, TrialState.PRUNED), ()],
    ids=["interrupted", "all-pruned", "no-trial"],
)
def test_sweep_notebook_reads_a_study_without_a_complete_trial(states, tmp_path, monkeypatch):
    # What an interrupted sweep leaves (its trial failed by the interrupt, the retry queued),
    # or one whose every trial was pruned; made with Optuna directly, in no time.
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="unfinished", direction="maximize")
    params = {"model.mixer_params.first_ssm": "diag", "train.lr": 3e-3}
    dists = {
        "model.mixer_params.first_ssm": CategoricalDistribution(["shift", "diag"]),
        "train.lr": FloatDistribution(1e-3, 1e-2, log=True),
    }
    for state in states:
        value = 0.25 if state == TrialState.PRUNED else None
        study.add_trial(create_trial(state=state, value=value, params=params, distributions=dists))

    nb = execute(
        NOTEBOOK_DIR / "04_sweep_analysis.ipynb",
        tmp_path,
        monkeypatch,
        SANDBOX_STORAGE_URL=storage,
    )
    text = "".join(output.text for output in outputs(nb) if output.output_type == "stream")
    assert "no complete trial yet: no best_config.yaml to export" in text
    skipped = "no finished trial yet: no strip plots or history" in text
    assert skipped == (TrialState.PRUNED not in states)
