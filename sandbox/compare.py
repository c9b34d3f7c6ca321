"""`sandbox compare`: a grid of (task x variant x seed [x lr]) training runs, and its table.

A preset (configs/compare/NAME.yaml) gives a base run config, the tasks (rows of the paper's
table), the variants (mixers or layer settings), seeds, an optional learning-rate grid and
the paper's numbers. The learning rate of each (task, variant, seed) is chosen on the
validation split; the test split is only read for the chosen run.
Runs are independent processes; finished runs are skipped when the same --out is reused, and
interrupted runs resume from their last checkpoint.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError
from tqdm.auto import tqdm

from sandbox.config import (
    ConfigError,
    RunConfig,
    Strict,
    apply_override,
    build_config,
    deep_merge,
)
from sandbox.train import total_steps

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "compare"


class ComparePreset(Strict):
    description: str = ""
    extends: str | None = None  # a preset whose fields this one starts from
    base: dict[str, Any] = Field(default_factory=dict)  # RunConfig fields shared by every run
    tasks: dict[str, dict[str, Any]]  # row name -> RunConfig fields (the task section)
    variants: dict[str, dict[str, Any]]  # column name -> RunConfig fields (the model section)
    seeds: int = Field(1, ge=1)
    lr_grid: list[float] = Field(default_factory=list)  # empty: base train.lr only
    paper: dict[str, dict[str, float]] = Field(default_factory=dict)  # task -> variant -> %
    paper_note: str = ""


@dataclass(frozen=True)
class Run:
    task: str
    variant: str
    seed: int
    lr: float
    config: RunConfig

    @property
    def run_id(self) -> str:
        # Variant names are free text ("shift + diag"); directory names keep to [\w.-].
        name = f"{self.task}__{self.variant}__seed{self.seed}__lr{self.lr:g}"
        return re.sub(r"[^\w.-]+", "-", name)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_preset(name_or_path: str, seen: tuple[str, ...] = ()) -> tuple[dict, str]:
    """Raw preset data with `extends` resolved: the child's top-level fields replace the
    parent's, except `base`, which is merged key by key."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset {name_or_path!r}; available: {preset_names()}")
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"preset file {str(path)!r} not found") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path.name}: top level must be a mapping")
    parent_name = data.get("extends")
    if parent_name:
        if parent_name in seen:
            raise ConfigError(f"preset {path.name}: 'extends' cycle through {parent_name!r}")
        parent, _ = _read_preset(parent_name, (*seen, parent_name))
        base = deep_merge(parent.get("base", {}), data.get("base", {}))
        data = {**parent, **data, "base": base}
    return data, path.name


def load_preset(name_or_path: str) -> ComparePreset:
    """A preset by name (configs/compare/NAME.yaml) or by path to a YAML file."""
    data, name = _read_preset(name_or_path)
    try:
        return ComparePreset.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"preset {name}: field {field!r}: {err['msg']}") from None


def expand(preset: ComparePreset, overrides: list[str] = (), seeds: int | None = None) -> list[Run]:
    """Every run of the preset, each with its fully validated RunConfig."""
    runs = []
    for task, task_fields in preset.tasks.items():
        for variant, variant_fields in preset.variants.items():
            data = deep_merge(deep_merge(preset.base, task_fields), variant_fields)
            try:
                for override in overrides:
                    apply_override(data, override)
                lrs = preset.lr_grid or [build_config(data).train.lr]
                for seed in range(seeds or preset.seeds):
                    for lr in lrs:
                        config = build_config(deep_merge(data, {"seed": seed, "train": {"lr": lr}}))
                        runs.append(Run(task, variant, seed, lr, config))
            except ConfigError as e:
                raise ConfigError(f"{task}/{variant}: {e}") from None
    return runs


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group; only the parent handles it and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _execute(job: tuple[dict, str]) -> dict:
    from sandbox.train import train

    config_data, out = job
    return train(RunConfig.model_validate(config_data), out, resume=True, progress=False)


def run_all(runs: list[Run], out: Path, workers: int, progress: bool = True) -> int:
    """Run what is not finished under out/runs/; returns how many runs were executed."""
    todo = [r for r in runs if not (out / "runs" / r.run_id / "result.json").exists()]
    if not todo:
        return 0
    # Long-budget runs first, so no worker is left with one long run at the end.
    todo.sort(key=lambda r: -total_steps(r.config))
    jobs = [(r.config.model_dump(mode="json"), str(out / "runs" / r.run_id)) for r in todo]
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="runs", disable=not progress)
    if workers <= 1:
        for job in jobs:
            _execute(job)
            bar.update(1)
    else:
        pool = mp.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_worker_init)
        try:
            for _ in pool.imap_unordered(_execute, jobs):
                bar.update(1)
            pool.close()
        except BaseException:
            pool.terminate()  # checkpoints are written atomically: a killed run resumes later
            raise
        finally:
            pool.join()
    bar.close()
    return len(todo)


def collect(runs: list[Run], out: Path) -> list[dict]:
    """One row per finished run: its result plus task/variant/seed/lr."""
    rows = []
    for r in runs:
        path = out / "runs" / r.run_id / "result.json"
        if path.exists():
            result = json.loads(path.read_text())
            rows.append({**result, "task": r.task, "mixer": r.variant, "seed": r.seed, "lr": r.lr})
    return rows


def select_lr(rows: list[dict]) -> list[dict]:
    """Per (task, mixer, seed) keep the run of best validation accuracy (ties: fewer steps,
    then the smaller lr). Test accuracy plays no part in the choice."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["task"], row["mixer"], row["seed"])
        rank = (-row["val_accuracy"], row["steps"], row["lr"])
        if key not in best or rank < best[key][0]:
            best[key] = (rank, row)
    return [row for _, row in best.values()]


def compare(
    preset: ComparePreset,
    out: Path,
    workers: int | None = None,
    seeds: int | None = None,
    overrides: list[str] = (),
    progress: bool = True,
) -> list[dict]:
    """Run the preset (skipping finished runs) and write results.csv, table.md, gaps.png."""
    from sandbox import report

    runs = expand(preset, overrides, seeds)
    out.mkdir(parents=True, exist_ok=True)
    run_all(runs, out, workers or os.cpu_count() or 1, progress)
    chosen = select_lr(collect(runs, out))
    report.write_all(chosen, preset, runs, out)
    return chosen
