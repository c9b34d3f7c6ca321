"""Writers for `sandbox compare`: results.csv, table.md, the terminal table and gaps.png.

Rows are the per-run results chosen by `compare.select_lr`; a summary groups them by
(task, mixer) over seeds. Accuracies are fractions in the CSV and percentages in tables.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

import tasks
from sandbox.io import atomic_write, atomic_write_text

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


def random_accuracy(runs) -> dict[str, float]:
    """Chance accuracy (%) of each task row, from the task each run trains on."""
    out = {}
    for r in runs:
        if r.task not in out:
            task = tasks.build(r.config.task.name, **r.config.task.params)
            out[r.task] = 100 * task.random_accuracy
    return out


def _fmt(stat: dict | None) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.1f}" + (f" ± {stat['sd']:.1f}" if stat["n"] > 1 else "")


def table_rows(summary, preset, chance) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per task, our accuracy (%), the paper's, and median steps."""
    task_names = list(preset.tasks)
    header = ["mixer"]
    for t in task_names:
        header += [f"{t} (ours)", f"{t} (paper)", f"{t} steps"]
    rows = [["random"]]
    for t in task_names:
        paper = preset.paper.get(t, {}).get("random")
        rows[0] += [f"{chance[t]:.1f}", f"{paper:.1f}" if paper is not None else "-", "-"]
    for mixer in preset.variants:
        row = [mixer]
        for t in task_names:
            stat = summary.get((t, mixer))
            paper = preset.paper.get(t, {}).get(mixer)
            steps = f"{stat['steps']:.0f}" if stat else "-"
            row += [_fmt(stat), f"{paper:.1f}" if paper is not None else "-", steps]
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(header, rows, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console().print(table)


def figure(rows: list[dict], preset, chance: dict[str, float], path: Path) -> None:
    """Bar chart of test accuracy per mixer (ours with sd over seeds, paper beside it),
    one panel per task, chance as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
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
        ax.axhline(chance[task], ls="--", color="gray", lw=1)
        ax.set_ylim(0, 105)
        ax.tick_params(axis="x", rotation=30)
    grid.set_axis_labels("", "test accuracy (%)")

    def save(tmp):
        grid.savefig(tmp, format="png", dpi=120, bbox_inches="tight")

    atomic_write(path, save)
    import matplotlib.pyplot as plt

    plt.close(grid.figure)


def write_all(chosen: list[dict], preset, runs, out: Path, show: bool = True) -> None:
    """results.csv, table.md and gaps.png under out; the table printed to the terminal."""
    order = {(r.task, r.variant, r.seed): i for i, r in enumerate(runs)}
    chosen = sorted(chosen, key=lambda r: order[(r["task"], r["mixer"], r["seed"])])
    chance = random_accuracy(runs)
    atomic_write_text(out / "results.csv", results_csv(chosen))
    header, rows = table_rows(summarize(chosen), preset, chance)
    note = f"\n{preset.paper_note}\n" if preset.paper_note else ""
    atomic_write_text(out / "table.md", markdown(header, rows) + note)
    if chosen:
        figure(chosen, preset, chance, out / "gaps.png")
    if show:
        print_table(header, rows, preset.description or "sandbox compare")
