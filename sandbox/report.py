"""Writers for `sandbox compare`: results.csv, table.md, the terminal table and figures.

Rows are the per-run results chosen by `compare.select_lr`; a summary groups them by
(task, mixer) over seeds. Accuracies are fractions in the CSV and percentages in tables,
whose first rows are chance (`random`) and, for tasks with one, the best no-recall guess
(`no recall`, tasks.baselines).
A preset's `figures` names the figures written (FIGURES below), each as out/<kind>.png:
gaps (the default; bars per mixer, one panel per task), width (accuracy vs d_model, one
line per layer, one panel per task ordered by seq_len), heatmap (task x mixer mean test
accuracy) and length (accuracy and wall time vs seq_len, one line per mixer). Every figure
shows each task's baselines (``baseline_levels``): chance dashed, the no-recall guess dotted.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

import tasks
from sandbox.io import atomic_write, atomic_write_text
from tasks import baselines

BASELINE_ROWS = ("random", "no recall")  # table.md's rows above the variants' (table_rows)

CSV_COLUMNS = [
    "task",
    "mixer",
    "seed",
    "test_accuracy",
    "test_exact",
    "val_accuracy",
    "lr",
    "steps",
    "steps_to_solve",
    "wall_s",
    "params",
]


def results_csv(rows: list[dict]) -> str:
    """CSV text, one line per (task, mixer, seed), in row order."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def summarize(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(task, mixer) -> mean and sample sd of test accuracy (%), median steps, seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["mixer"]), []).append(row)
    summary = {}
    for key, group in groups.items():
        acc = [100 * r["test_accuracy"] for r in group]
        summary[key] = {
            "mean": statistics.fmean(acc),
            "sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "n": len(acc),
            "steps": statistics.median(r["steps"] for r in group),
            "solved": sum(bool(r["solved"]) for r in group),
            "wall_s": statistics.fmean(r["wall_s"] for r in group),
            "params": group[0]["params"],
        }
    return summary


def _per_task_row(runs, figure, test_params=None) -> dict:
    """figure(task) of each task row, from the task its test split is drawn from: the one
    its runs train on, with the row's ``test_params`` (a preset's) on top."""
    test_params = test_params or {}
    out = {}
    for r in runs:
        if r.task not in out:
            params = {**r.config.task.params, **test_params.get(r.task, {})}
            out[r.task] = figure(tasks.build(r.config.task.name, **params))
    return out


def random_accuracy(runs, test_params=None) -> dict[str, float]:
    """Chance accuracy (%) of each task row: the best guess blind to the context."""
    return _per_task_row(runs, lambda task: 100 * task.random_accuracy, test_params)


def no_recall_accuracy(runs, test_params=None) -> dict[str, float | None]:
    """The best no-recall guess's accuracy (%) of each task row (tasks.baselines: it reads the
    context but never matches the query to a key), None for a task without one."""

    def best(task) -> float | None:
        found = baselines.no_recall_accuracy(task)
        return 100 * max(found.values()) if found else None

    return _per_task_row(runs, best, test_params)


def baseline_levels(runs, test_params=None) -> dict[str, dict[str, float]]:
    """Each task row's baselines (%) as the figures draw them: {"chance": ...} and, for a
    task with a no-recall guess, "no recall"."""
    chance = random_accuracy(runs, test_params)
    no_recall = no_recall_accuracy(runs, test_params)
    return {
        t: {"chance": c} | ({} if no_recall[t] is None else {"no recall": no_recall[t]})
        for t, c in chance.items()
    }


def _fmt(stat: dict | None) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.1f}" + (f" ± {stat['sd']:.1f}" if stat["n"] > 1 else "")


def table_rows(summary, preset, chance, no_recall=None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per task, our accuracy (%), the paper's, and median steps; first the
    chance row and, where a task row has one (``no_recall``), the no-recall baseline's.
    A preset without paper numbers gets no paper columns."""
    task_names = list(preset.tasks)
    with_paper = bool(preset.paper)
    header = ["mixer"]
    for t in task_names:
        header += [f"{t} (ours)", f"{t} (paper)", f"{t} steps"] if with_paper else [t, f"{t} steps"]

    def paper(t, column):
        value = preset.paper.get(t, {}).get(column)
        return [f"{value:.1f}" if value is not None else "-"] if with_paper else []

    rows = [["random"]]
    for t in task_names:
        rows[0] += [f"{chance[t]:.1f}", *paper(t, "random"), "-"]
    no_recall = no_recall or {}
    if any(no_recall.get(t) is not None for t in task_names):
        rows.append(["no recall"])
        for t in task_names:
            value = no_recall.get(t)
            rows[-1] += [f"{value:.1f}" if value is not None else "-", *paper(t, ""), "-"]
    for mixer in preset.variants:
        row = [mixer]
        for t in task_names:
            stat = summary.get((t, mixer))
            steps = f"{stat['steps']:.0f}" if stat else "-"
            row += [_fmt(stat), *paper(t, mixer), steps]
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(header, rows, title: str, caption: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    for i, h in enumerate(header):
        # Folded at spaces (task names' underscores shown as spaces here only), not rich's
        # default ellipsis: at 80 columns "associative_recall (ours)" was cut to "associa…",
        # which left the columns unnamed. Mixer names stay whole.
        justify = "left" if i == 0 else "right"
        table.add_column(h.replace("_", " "), justify=justify, overflow="fold", no_wrap=i == 0)
    for r in rows:
        table.add_row(*r)
    Console().print(table)


def _pyplot():
    """matplotlib.pyplot, imported on first use. The backend is left alone: headless
    matplotlib picks Agg by itself, and forcing it would stop inline figures in notebooks."""
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    """Write a matplotlib figure to path atomically as PNG, then free it."""

    def save(tmp):
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")

    atomic_write(path, save)
    _pyplot().close(fig)


def _accuracy_frame(rows: list[dict]):
    """One record per run: task, mixer (the variant), layer, d_model, seq_len, accuracy (%),
    wall_s."""
    import pandas as pd

    keys = ("task", "mixer", "layer", "d_model", "seq_len", "wall_s")
    return pd.DataFrame(
        [{**{k: r[k] for k in keys}, "accuracy": 100 * r["test_accuracy"]} for r in rows]
    )


def _tasks_by_length(rows: list[dict], preset) -> list[str]:
    """The task rows that have results, shortest seq_len first (preset order breaks ties)."""
    length = {r["task"]: r["seq_len"] for r in rows}
    return sorted((t for t in preset.tasks if t in length), key=lambda t: length[t])


# How each baseline level is drawn: chance dashed, the no-recall guess dotted.
_LEVEL_STYLE = {"chance": ("--", "gray"), "no recall": (":", "dimgray")}


def _baseline_lines(ax, levels: dict[str, float]) -> None:
    """A panel's baselines (``baseline_levels`` of its task) as horizontal lines, each named
    on the panel itself (seaborn's figure legend lists the plotted hues only)."""
    for name, accuracy in levels.items():
        ls, color = _LEVEL_STYLE[name]
        ax.axhline(accuracy, ls=ls, color=color, lw=1)
        ax.annotate(
            name, (1, accuracy), xycoords=("axes fraction", "data"), xytext=(-2, 2),
            textcoords="offset points", ha="right", va="bottom", color=color, fontsize=8,
            zorder=5, bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8},
        )  # fmt: skip


def figure(rows: list[dict], preset, levels: dict[str, dict[str, float]], path: Path) -> None:
    """Bar chart of test accuracy per mixer (ours with sd over seeds, paper beside it),
    one panel per task, with the task's baseline ``levels``."""
    _pyplot()
    import pandas as pd
    import seaborn as sns

    data = [
        {"task": r["task"], "mixer": r["mixer"], "accuracy": 100 * r["test_accuracy"], "": "ours"}
        for r in rows
    ]
    for t, by_mixer in preset.paper.items():
        data += [
            {"task": t, "mixer": m, "accuracy": v, "": "paper"}
            for m, v in by_mixer.items()
            if m in preset.variants
        ]
    frame = pd.DataFrame(data)
    grid = sns.catplot(
        frame,
        kind="bar",
        x="mixer",
        y="accuracy",
        hue="",
        col="task",
        order=list(preset.variants),
        col_order=[t for t in preset.tasks if t in set(frame["task"])],
        errorbar="sd",
        height=3.5,
        aspect=1.3,
    )
    for task, ax in grid.axes_dict.items():
        _baseline_lines(ax, levels[task])
        ax.set_ylim(0, 105)
        ax.tick_params(axis="x", rotation=30)
    grid.set_axis_labels("", "test accuracy (%)")
    _save_png(grid.figure, path)


def width_figure(rows: list[dict], preset, levels: dict[str, dict[str, float]], path: Path) -> None:
    """Test accuracy vs model width (d_model), one line per layer (model.mixer; mean and sd
    over seeds), one panel per task ordered by seq_len, with its baseline ``levels``."""
    _pyplot()
    import seaborn as sns

    frame = _accuracy_frame(rows)
    order = _tasks_by_length(rows, preset)
    grid = sns.relplot(
        frame,
        kind="line",
        x="d_model",
        y="accuracy",
        hue="layer",
        style="layer",
        markers=True,
        dashes=False,
        col="task",
        col_order=order,
        errorbar="sd",
        height=3.2,
        aspect=1.1,
    )
    widths = sorted(set(frame["d_model"]))
    length = dict(zip(frame["task"], frame["seq_len"], strict=True))
    for task, ax in grid.axes_dict.items():
        _baseline_lines(ax, levels[task])
        ax.set_ylim(-2, 105)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_title(f"{task} (seq_len {length[task]})")
    grid.set_axis_labels("model width (d_model)", "test accuracy (%)")
    _save_png(grid.figure, path)


def heatmap_figure(
    rows: list[dict], preset, levels: dict[str, dict[str, float]], path: Path
) -> None:
    """Mean test accuracy (%) over seeds, tasks down, mixers across, the baseline ``levels``
    in the row label; a cell without a finished run is blank."""
    plt = _pyplot()
    import seaborn as sns

    frame = _accuracy_frame(rows)
    table = frame.pivot_table(index="task", columns="mixer", values="accuracy", aggfunc="mean")
    table = table.reindex(index=list(preset.tasks), columns=list(preset.variants))
    table.index = [
        f"{t} ({', '.join(f'{name} {v:.1f}' for name, v in levels[t].items())})"
        for t in table.index
    ]
    fig, ax = plt.subplots(figsize=(1.1 * len(table.columns) + 3, 0.5 * len(table) + 1.2))
    sns.heatmap(
        table,
        annot=True,
        fmt=".0f",
        vmin=0,
        vmax=100,
        cmap="viridis",
        ax=ax,
        cbar_kws={"label": "test accuracy (%)"},
    )
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.tick_params(axis="x", rotation=30)
    _save_png(fig, path)


def length_figure(
    rows: list[dict], preset, levels: dict[str, dict[str, float]], path: Path
) -> None:
    """Two panels against seq_len (log 2), one line per mixer: test accuracy with the
    baseline ``levels`` of each length's task, and the run's training wall time (to the early
    stop or the step cap)."""
    plt = _pyplot()
    import seaborn as sns
    from matplotlib.ticker import LogLocator, NullLocator, ScalarFormatter

    frame = _accuracy_frame(rows)
    order = [m for m in preset.variants if m in set(frame["mixer"])]
    lengths = sorted(set(frame["seq_len"]))
    fig, (acc_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, y in ((acc_ax, "accuracy"), (time_ax, "wall_s")):
        sns.lineplot(
            frame,
            x="seq_len",
            y=y,
            hue="mixer",
            hue_order=order,
            style="mixer",
            style_order=order,
            markers=True,
            dashes=False,
            errorbar="sd",
            ax=ax,
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length")
    by_length = {r["seq_len"]: levels[r["task"]] for r in rows}
    for name, (ls, color) in _LEVEL_STYLE.items():
        line = [by_length[n].get(name) for n in lengths]
        if None in line:
            continue  # a length whose task has no such baseline
        if len(set(line)) == 1:  # one level: a named line, as elsewhere
            _baseline_lines(acc_ax, {name: line[0]})
        else:  # a level per length, named at its right end
            acc_ax.plot(lengths, line, ls=ls, color=color, lw=1)
            acc_ax.annotate(
                name, (lengths[-1], line[-1]), xytext=(-2, 2), textcoords="offset points",
                ha="right", va="bottom", color=color, fontsize=8,
            )  # fmt: skip
    acc_ax.set_ylim(-2, 105)
    acc_ax.set_ylabel("test accuracy (%)")
    time_ax.set_yscale("log")
    # Plain numbers at 1, 2, 5 x 10^k and no minor labels: matplotlib's default labels every
    # minor tick as "4 x 10^1" and so on, which ran into the axis label.
    time_ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    time_ax.yaxis.set_major_formatter(ScalarFormatter())
    time_ax.yaxis.set_minor_locator(NullLocator())
    time_ax.set_ylabel("training wall time (s)")
    acc_ax.get_legend().remove()  # one legend, where the time curves leave room
    sns.move_legend(time_ax, "upper left", title="mixer")
    _save_png(fig, path)


# Figure kind (a preset's `figures`) -> writer of out/<kind>.png.
FIGURES = {
    "gaps": figure,
    "width": width_figure,
    "heatmap": heatmap_figure,
    "length": length_figure,
}


def write_all(chosen: list[dict], preset, runs, out: Path, show: bool = True) -> None:
    """results.csv, table.md and the preset's figures (<kind>.png) under out; the table
    printed to the terminal."""
    order = {(r.task, r.variant, r.seed): i for i, r in enumerate(runs)}
    chosen = sorted(chosen, key=lambda r: order[(r["task"], r["mixer"], r["seed"])])
    levels = baseline_levels(runs, preset.test_params)
    chance = {t: level["chance"] for t, level in levels.items()}
    no_recall = {t: level.get("no recall") for t, level in levels.items()}
    atomic_write_text(out / "results.csv", results_csv(chosen))
    header, rows = table_rows(summarize(chosen), preset, chance, no_recall)
    note = f"\n{preset.paper_note}\n" if preset.paper_note else ""
    atomic_write_text(out / "table.md", markdown(header, rows) + note)
    if chosen:
        for kind in preset.figures:
            FIGURES[kind](chosen, preset, levels, out / f"{kind}.png")
    if show:
        print_table(header, rows, preset.description or "sandbox compare", preset.paper_note)
