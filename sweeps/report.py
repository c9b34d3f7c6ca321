"""`sandbox sweep-report`: a study's trials.csv, best_config.yaml and figures.

trials.csv       one row per trial: number, state, value (the objective, the run's validation
                 accuracy; for a pruned trial its last reported one), the retried trial,
                 one column per parameter path, test accuracy, steps, wall_s, run_dir, ...;
                 an empty parameter cell: the trial never sampled it, None: the choice None
best_config.yaml the best complete trial's full run config (`sandbox train` takes it as is;
                 none for a study that `sandbox sweep` did not make)
history.png      objective by trial number, and the best so far
importances.png  parameter importances (Optuna's default evaluator, PED-ANOVA), with >= 2
                 parameters shared by >= 4 complete trials
variants.png     objective by value of each categorical or integer parameter (variant_points)
Every file is written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sandbox.config import ConfigError, build_config, dump_config
from sandbox.io import atomic_write, atomic_write_text, make_dir
from sweeps.runner import FINISHED, SPACE_ATTR, default_storage, make_storage, origin

ATTR_COLUMNS = [
    "val_accuracy",
    "test_accuracy",
    "test_exact",
    "steps",
    "wall_s",
    "solved",
    "num_params",
    "run_dir",
    "host",
    "skipped",
    "error",
]
MIN_TRIALS_FOR_IMPORTANCE = 4


def load_sweep_study(
    out: str | Path | None, storage: str | None, study_name: str | None
) -> optuna.Study:
    """The study in `storage` (default: OUT/study.db) named `study_name` (default: the only
    study there)."""
    if storage is None:
        if out is None:
            raise ConfigError("give --out (a sweep directory) or --storage")
        if not (Path(out) / "study.db").exists():
            raise ConfigError(f"no study database at {Path(out) / 'study.db'}")
        storage = default_storage(Path(out))
    rdb = make_storage(storage, create=False)
    names = optuna.get_all_study_names(rdb)
    if study_name is None:
        if len(names) != 1:
            raise ConfigError(f"--study: the storage holds studies {names}; name one")
        study_name = names[0]
    if study_name not in names:
        raise ConfigError(f"--study: no study {study_name!r} in the storage; it has {names}")
    return optuna.load_study(study_name=study_name, storage=rdb)


def trial_rows(study: optuna.Study) -> list[dict]:
    """One dict per trial, in trial order (the columns of trials.csv)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "retry_of": origin(t) if origin(t) != t.number else None,
            "datetime_start": t.datetime_start,
            "duration_s": t.duration.total_seconds() if t.duration is not None else None,
        }
        # pandas writes None as an empty cell, which already means "not sampled".
        row.update({p: "None" if v is None else v for p, v in t.params.items()})
        row.update({key: t.user_attrs.get(key) for key in ATTR_COLUMNS})
        rows.append(row)
    return rows


def best_config_yaml(study: optuna.Study) -> str:
    """The best complete trial's run config, validated, with a comment saying where from."""
    try:
        best = study.best_trial
    except ValueError:
        raise ConfigError(f"study {study.study_name!r} has no complete trial yet") from None
    config = build_config(best.user_attrs["config"])
    header = (
        f"# Best trial {best.number} of sweep study {study.study_name!r}: validation "
        f"accuracy {best.value:.4f}, test accuracy {best.user_attrs.get('test_accuracy')}.\n"
        f"# Parameters: {best.params}\n"
    )
    return header + dump_config(config)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def _history(df, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7, 4))
    done = df[df.state.isin(["COMPLETE", "PRUNED"])]
    sns.scatterplot(data=done, x="number", y="value", hue="state", style="state", ax=ax)
    complete = df[df.state == "COMPLETE"].sort_values("number")
    ax.step(complete.number, complete.value.cummax(), where="post", color="k", label="best")
    ax.set(xlabel="trial", ylabel="validation accuracy", title="Optimization history")
    ax.legend()
    _save(fig, path)


def _importances(study: optuna.Study, path: Path) -> bool:
    import matplotlib.pyplot as plt
    import seaborn as sns

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    shared = set.intersection(*(set(t.params) for t in complete)) if complete else set()
    values = {t.value for t in complete}
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE or len(shared) < 2 or len(values) < 2:
        return False
    importances = optuna.importance.get_param_importances(study)
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(importances)))
    sns.barplot(x=list(importances.values()), y=list(importances.keys()), ax=ax, color="C0")
    ax.set(xlabel="importance", ylabel="", title=f"Parameter importances ({len(complete)} trials)")
    _save(fig, path)
    return True


def variant_points(study: optuna.Study, param: str):
    """The points of `param`'s strip plot: a DataFrame with a row (number, state, value,
    `param` as the tick label str(choice)) per finished trial that sampled `param`.

    Read from the trials, not from a DataFrame of trial_rows: there a trial without the
    parameter (queued or failed before sampling) is NaN, which turns an integer column float
    (1.0 misses the tick "1") and looks like a null choice to notna()."""
    import pandas as pd

    rows = [
        {"number": t.number, "state": t.state.name, "value": t.value, param: str(t.params[param])}
        for t in study.get_trials(deepcopy=False, states=FINISHED)
        if param in t.params
    ]
    return pd.DataFrame(rows, columns=["number", "state", "value", param])


def tick_order(points, param: str, choices: list | None) -> list[str]:
    """The x ticks of `param`'s strip plot (``points`` from variant_points): the choices in
    their listed order for a categorical parameter, else (``choices`` None: an integer one)
    the values sampled in numeric order; seaborn would order the strings by first
    appearance ("8", "2", "16")."""
    if choices is not None:
        return [str(c) for c in choices]
    return [str(v) for v in sorted({int(x) for x in points[param]})]


def _variants(study: optuna.Study, path: Path) -> bool:
    import matplotlib.pyplot as plt
    import seaborn as sns

    space = study.user_attrs.get(SPACE_ATTR, {}).get("params", {})
    points = {
        p: variant_points(study, p)
        for p, spec in space.items()
        if spec["type"] in ("categorical", "int")
    }
    discrete = [p for p, shown in points.items() if len(shown)]
    if not discrete:
        return False
    cols = min(4, len(discrete))
    rows = -(-len(discrete) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(discrete) :]:
        ax.set_visible(False)
    for i, (ax, param) in enumerate(zip(axes.flat, discrete)):
        spec = space[param]
        choices = spec["choices"] if spec["type"] == "categorical" else None
        order = tick_order(points[param], param, choices)
        sns.stripplot(
            data=points[param], x=param, y="value", hue="state", order=order, ax=ax, jitter=0.15
        )
        ax.set(ylabel="validation accuracy")
        ax.tick_params(axis="x", labelrotation=20)
        if i:
            ax.get_legend().remove()
    fig.suptitle("Validation accuracy by variant")
    fig.tight_layout()
    _save(fig, path)
    return True


def write_report(study: optuna.Study, out: str | Path) -> list[Path]:
    """Write trials.csv, best_config.yaml and the figures into `out`; returns the paths."""
    # No matplotlib.use("Agg"): headless matplotlib picks Agg by itself, and forcing it would
    # switch off inline figures for a notebook that calls this.
    import pandas as pd

    out = Path(out)
    make_dir(out)
    rows = trial_rows(study)
    # A column of integers stays one where it has gaps (pandas would make it floats): a
    # retry_of of "2.0" matches no trial number read as text, and a parameter's "8.0" pasted
    # back as an override is refused (head_dim must be an integer).
    df = pd.DataFrame(rows)
    for column in df.columns:
        present = [r[column] for r in rows if r.get(column) is not None]
        if present and all(type(v) is int for v in present):
            df[column] = df[column].astype("Int64")
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    written = [out / "trials.csv"]
    atomic_write_text(written[0], buf.getvalue())
    if not any(r["state"] in {s.name for s in FINISHED} for r in rows):
        return written
    # A study that `sandbox sweep` did not make keeps no run configs: no best_config.yaml.
    if any(r["state"] == "COMPLETE" for r in rows) and "config" in study.best_trial.user_attrs:
        atomic_write_text(out / "best_config.yaml", best_config_yaml(study))
        written.append(out / "best_config.yaml")
    _history(df, out / "history.png")
    written.append(out / "history.png")
    if _importances(study, out / "importances.png"):
        written.append(out / "importances.png")
    if _variants(study, out / "variants.png"):
        written.append(out / "variants.png")
    return written
