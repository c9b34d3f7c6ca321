"""`sandbox compare`: a grid of (task x variant x seed [x lr]) training runs, and its table.

A preset (configs/compare/NAME.yaml) gives a base run config, the tasks (rows of the paper's
table), the variants (mixers or layer settings), seeds, an optional learning-rate grid and
the paper's numbers. The learning rate of each (task, variant, seed) is chosen on the
validation split, never the test split (every run reports its test accuracy; the table takes
the chosen run's).
Runs are independent processes; finished runs are skipped when the same --out is reused, and
interrupted runs resume from their last checkpoint.

Two optional preset fields serve the difficulty grids (configs/compare/mqar.yaml, ...):
`figures` picks the figures written beside the table (see sandbox.report.FIGURES), and
`test_params` gives a task row a test split drawn from a variant of its task (other task
parameters, same vocabulary and length): fuzzy recall is trained on keys of mixed length and
tested on its longest keys. The run itself is untouched (its result.json keeps the test
accuracy on its own split); compare evaluates the saved weights on the other split once and
caches the figures in the run directory as heldout.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, field_validator
from tqdm.auto import tqdm

import tasks
from sandbox.config import (
    PRESET_DIR,
    ConfigError,
    RunConfig,
    Strict,
    apply_override,
    build_config,
    deep_merge,
    preset_names,
    read_yaml,
)
from sandbox.io import (
    atomic_write_text,
    load_checkpoint,
    load_model_weights,
    make_dir,
    read_record,
    terms_as_interrupts,
)
from sandbox.model import LanguageModel
from sandbox.pools import WorkerDied, stop_pool, worker_pool
from sandbox.report import BASELINE_ROWS
from sandbox.train import (
    WEIGHTS,
    RunDirError,
    build_model,
    build_task,
    check_run_data,
    check_run_dir,
    evaluate,
    read_result,
    total_steps,
)


class ComparePreset(Strict):
    description: str = ""
    extends: str | None = None  # a preset whose fields this one starts from
    base: dict[str, Any] = Field(default_factory=dict)  # RunConfig fields shared by every run
    # Row name -> RunConfig fields (the task section), column name -> RunConfig fields (the
    # model section); at least one of each (an empty grid "wrote" a gaps.png it never drew).
    tasks: dict[str, dict[str, Any]] = Field(min_length=1)
    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    seeds: int = Field(1, ge=1)
    # Learning rates to run, each chosen on validation; they replace base's train.lr (a task row
    # or variant may not set one then). Empty: each run's train.lr only.
    lr_grid: list[float] = Field(default_factory=list)
    paper: dict[str, dict[str, float]] = Field(default_factory=dict)  # task -> variant -> %
    paper_note: str = ""
    # Figures written beside table.md, each as out/<kind>.png (sandbox.report.FIGURES).
    figures: list[Literal["gaps", "width", "heatmap", "length"]] = Field(
        default_factory=lambda: ["gaps"]
    )
    # task row -> task params that replace the row's for its test split only.
    test_params: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("variants")
    @classmethod
    def _names_of_columns(cls, variants: dict) -> dict:
        # The table's baseline rows have these names, and the paper's cells key chance by
        # "random": a variant so named printed a second "random" row with the paper's chance.
        for name in variants:
            if not name.strip() or name in BASELINE_ROWS:
                raise ValueError(f"a variant may not be named {name!r} (empty, or a row of "
                                 f"the table: {', '.join(BASELINE_ROWS)}); rename it")  # fmt: skip
        return variants


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


def _preset_file(name_or_path: str) -> Path:
    """The file of a preset given by name (PRESET_DIR/NAME.yaml) or by path."""
    path = Path(name_or_path)
    return path if path.suffix else PRESET_DIR / f"{name_or_path}.yaml"


def _read_preset(name_or_path: str, seen: tuple[str, ...] = ()) -> tuple[dict, str]:
    """Raw preset data with `extends` resolved: the child's top-level fields replace the
    parent's, except `base`, which is merged key by key."""
    path = _preset_file(name_or_path)
    if not Path(name_or_path).suffix and not path.exists():
        raise ConfigError(f"unknown preset {name_or_path!r}; available: {preset_names()}")
    data = read_yaml(path, "preset file")
    # The files read so far, resolved: spelled with ".." or through a link, a cycle's path
    # only grew, until the OS refused it as too long.
    seen = (*seen, str(path.resolve()))
    own_paper = isinstance(data, dict) and "paper" in data
    parent_name = data.get("extends")
    if parent_name:
        if not isinstance(parent_name, str):
            raise ConfigError(f"preset {path.name}: 'extends' must be a preset name or path")
        if Path(parent_name).suffix:  # a path: relative to this preset's file, not the cwd
            parent_name = str(path.parent / parent_name)
        if str(_preset_file(parent_name).resolve()) in seen:
            raise ConfigError(f"preset {path.name}: 'extends' cycle through {parent_name!r}")
        parent, _ = _read_preset(parent_name, seen)
        bases = [parent.get("base", {}), data.get("base", {})]
        if not all(isinstance(b, dict) for b in bases):
            raise ConfigError(f"preset {path.name}: 'base' must be a mapping")
        data = {**parent, **data, "base": deep_merge(*bases)}
    if own_paper:
        _check_paper(data, path.name)
    return data, path.name


def _check_paper(data: dict, name: str) -> None:
    """A preset file's own paper cells must name its task rows and variants (or "random"): a
    typo would leave the cell silently without its figure. Not inherited ones: a preset that
    extends another with other variants keeps the parent's figures for those it shares."""
    rows, variants = data.get("tasks"), data.get("variants")
    if not all(isinstance(x, dict) for x in (data["paper"], rows, variants)):
        return  # a wrong type: the preset's validation names it
    for task, cells in data["paper"].items():
        if task not in rows:
            raise ConfigError(f"preset {name}: paper: {task!r} is not a task row {list(rows)}")
        unknown = set(cells) - set(variants) - {"random"} if isinstance(cells, dict) else ()
        if unknown:
            raise ConfigError(
                f"preset {name}: paper.{task}: {sorted(unknown)} are not variants "
                f"{list(variants)} (or 'random')"
            )


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
    unknown = set(preset.test_params) - set(preset.tasks)
    if unknown:
        raise ConfigError(f"test_params: {sorted(unknown)} are not task rows {list(preset.tasks)}")
    overridden: dict = {}  # the overrides' fields, however written
    for override in overrides:
        apply_override(overridden, override)
    override_keys = _leaf_keys(overridden)
    _refuse_overrides_of_the_grid(override_keys, preset)
    runs, split_checked = [], set()
    for task, task_fields in preset.tasks.items():
        for variant, variant_fields in preset.variants.items():
            data = deep_merge(deep_merge(preset.base, task_fields), variant_fields)
            try:
                # A seed, or with lr_grid a task row's or variant's own lr, would be replaced
                # below without a word (base's train.lr is the default the grid replaces), as
                # would the same given as an override.
                own = [
                    f
                    for f in (task_fields, variant_fields)
                    if isinstance(f.get("train"), dict) and "lr" in f["train"]
                ]
                given = ["seed"] * ("seed" in data) + ["train.lr"] * bool(own) + override_keys
                for key in given:
                    _refuse_what_compare_sets(key, preset)
                for override in overrides:
                    apply_override(data, override)
                config = build_config(data)
                _check_buildable(config)
                lrs = preset.lr_grid or [config.train.lr]
                for seed in range(seeds or preset.seeds):
                    for lr in lrs:
                        config = build_config(deep_merge(data, {"seed": seed, "train": {"lr": lr}}))
                        _check_splits(config, split_checked)
                        runs.append(Run(task, variant, seed, lr, config))
            except ConfigError as e:
                raise ConfigError(f"{task}/{variant}: {e}") from None
    # Checked now, not when the grid has trained: a typo there would cost every run.
    by_id: dict[str, Run] = {}
    for run in runs:
        if run.task in preset.test_params:
            heldout_tasks(run, preset.test_params[run.task])
        other = by_id.setdefault(run.run_id, run)
        if other is not run:  # two runs would train into one directory
            raise ConfigError(
                f"{other.task}/{other.variant} (lr {other.lr}) and {run.task}/{run.variant} "
                f"(lr {run.lr}) would share the run directory {run.run_id}: rename one, or "
                "make the lr_grid values distinct"
            )
    return runs


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    """The dotted paths of a nested dict's leaves (``train.lr`` of {"train": {"lr": 1}})."""
    keys = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _refuse_overrides_of_the_grid(keys: list[str], preset: ComparePreset) -> None:
    """A ConfigError for an override (its dotted ``keys``) of a field a task row or variant
    sets (model.mixer, task.name, ...): every run would take the one value, and the table
    would print the same model under each variant's name."""
    set_by: dict[str, list[str]] = {}
    for names in (preset.tasks, preset.variants):
        for name, fields in names.items():
            for key in _leaf_keys(fields):
                set_by.setdefault(key, []).append(name)
    for key in keys:
        for field, names in set_by.items():
            if field == key or field.startswith(key + ".") or key.startswith(field + "."):
                raise ConfigError(
                    f"{key}: set by the preset's rows or variants ({', '.join(names)}), so an "
                    "override would give every run one value; edit the preset, or use "
                    "`sandbox train` for a single run"
                )


def _refuse_what_compare_sets(key: str, preset: ComparePreset) -> None:
    """A ConfigError for a field compare sets per run, so that a value given for it would be
    replaced without a word: seed, and with an lr_grid train.lr."""
    if key == "seed":
        raise ConfigError("seed: a preset's runs take seeds 0 .. n-1; use --seeds")
    if key == "train.lr" and preset.lr_grid:
        raise ConfigError(
            f"train.lr: this preset's runs take the lrs of its lr_grid {preset.lr_grid}; "
            "edit lr_grid instead"
        )


def _check_buildable(config: RunConfig) -> None:
    """Build the run's task and, on the meta device (shapes only), its model: the task's and
    the layers' own checks (a head_dim that does not divide d_model, ...) run in each worker's
    train(), where they stopped the grid after the runs before had trained."""
    try:
        task = build_task(config)
        with torch.device("meta"):
            LanguageModel(config.model, vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_splits(config: RunConfig, checked: set[str]) -> None:
    """Draw the run's data splits once per task setting and seed (``checked`` holds those
    done): counts the task's example space cannot fill raised in train(), after the runs
    before had trained, and named no task row."""
    key = json.dumps([config.task.model_dump(mode="json"), config.seed], sort_keys=True)
    if key in checked:
        return
    checked.add(key)
    counts = (config.task.num_train, config.task.num_valid, config.task.num_test)
    try:
        tasks.make_splits(build_task(config), *counts, seed=config.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_saved_configs(runs: list[Run], out: Path) -> None:
    """Runs under out/runs (finished or not) must have been made with the configs they would
    get now: a finished one is not run again, and its result must not pass for that of an
    edited preset or other overrides."""
    for r in runs:
        try:
            check_run_dir(out / "runs" / r.run_id, r.config, resume=True)
            check_run_data(out / "runs" / r.run_id, r.config)
        except RunDirError as e:
            if not e.differences:  # not a config change: a file in its place, no readable config
                raise RunDirError(f"--out {out}: run {r.run_id}: {e}") from None
            raise RunDirError(
                f"--out {out}: run {r.run_id} was made with another config (the preset or the "
                f"overrides changed: {e.differences}); choose another --out"
            ) from None


def _worker_init() -> None:
    # tqdm's default lock is a multiprocessing RLock, registered with the resource tracker the
    # pool shares; a worker killed by stop_pool() never unregisters it, and the tracker
    # warned of a leaked semaphore per worker after every Ctrl-C. Workers draw no bars.
    tqdm.set_lock(threading.RLock())


def _execute(job: tuple[dict, str]) -> dict:
    from sandbox.train import train

    config_data, out = job
    return train(RunConfig.model_validate(config_data), out, resume=True, progress=False)


def _budget_tokens(config: RunConfig) -> int:
    """Tokens a run may train on, a proxy of its cost: steps x batch size x seq_len."""
    seq_len = build_task(config).seq_len
    return total_steps(config) * config.train.batch_size * seq_len


def run_all(runs: list[Run], out: Path, workers: int, progress: bool = True) -> int:
    """Run what is not finished under out/runs/; returns how many runs were executed."""
    todo = [r for r in runs if not (out / "runs" / r.run_id / "result.json").exists()]
    if not todo:
        return 0
    # Long-budget runs first (the most tokens to train on: steps x batch x seq_len), so no
    # worker is left with one long run at the end.
    todo.sort(key=lambda r: -_budget_tokens(r.config))
    jobs = [(r.config.model_dump(mode="json"), str(out / "runs" / r.run_id)) for r in todo]
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="runs", disable=not progress)
    # SIGTERM and SIGHUP as Ctrl-C: exit 130 with the line to rerun (killed outright, a
    # parent would leave its workers training on, beside a rerun).
    with terms_as_interrupts():
        if workers <= 1:
            for job in jobs:
                _execute(job)
                bar.update(1)
        else:
            _run_in_pool(jobs, min(workers, len(jobs)), bar)
    bar.close()
    return len(todo)


def _run_in_pool(jobs: list[tuple[dict, str]], workers: int, bar) -> None:
    """Run the jobs in ``workers`` spawned processes, in order, ticking ``bar`` per finished
    one. A process pool executor rather than a multiprocessing Pool: a Pool replaces a worker
    that died (the OOM killer, a kill) and loses its job, so the grid waited for ever; here the
    pool breaks and the remaining jobs fail with it."""
    pool = worker_pool(workers, initializer=_worker_init)
    try:
        for done in as_completed([pool.submit(_execute, job) for job in jobs]):
            done.result()  # a run's own error, raised here as it was in the worker
            bar.update(1)
    except BaseException as e:
        stop_pool(pool)  # runs in flight resume from their checkpoints (written atomically)
        if isinstance(e, BrokenProcessPool):
            raise WorkerDied(
                "a worker process died (killed, or out of memory) while training; finished "
                "runs are kept: rerun the same command to train the others"
            ) from None
        raise
    pool.shutdown(wait=True)


def heldout_tasks(run: Run, params: dict[str, Any]) -> tuple[tasks.Task, tasks.Task]:
    """(the run's task, its task with test_params ``params`` on top); ConfigError when those
    are not valid task parameters or change the vocabulary or length the model is built for."""
    config = run.config
    task = build_task(config)
    try:
        test_task = tasks.build(config.task.name, **{**config.task.params, **params})
    except ValueError as e:
        raise ConfigError(f"test_params of {run.task!r}: {e}") from None
    if (test_task.vocab_size, test_task.seq_len) != (task.vocab_size, task.seq_len):
        raise ConfigError(
            f"test_params of {run.task!r} change the vocabulary or length the model was built for"
        )
    return task, test_task


def heldout_test(run: Run, run_dir: Path, params: dict[str, Any]) -> dict:
    """Test figures of a finished run's weights on a split of its task with `params` on top.

    The split is the test stream (seed, "test") of the changed task, less any example equal
    to one of the run's training or validation examples. Cached in run_dir/heldout.json.
    """
    cache = run_dir / "heldout.json"
    keys = ("params", "test_accuracy", "test_exact", "num_test")
    with contextlib.suppress(FileNotFoundError, ValueError):  # damaged: computed again
        cached = read_record(cache, keys)
        if cached["params"] == params:
            return cached
    config = run.config
    task, test_task = heldout_tasks(run, params)
    n = config.task.num_test
    test = tasks.make_splits(test_task, 0, 0, n, seed=config.seed).test
    seen = tasks.make_splits(task, config.task.num_train, config.task.num_valid, 0, config.seed)
    fresh = tasks.not_in(test, tasks.Batch.cat([seen.train, seen.valid]))
    if not fresh.any():
        raise ConfigError(f"test_params of {run.task!r}: every test example is a training one")
    model = build_model(config, task)
    load_model_weights(model, load_checkpoint(run_dir / WEIGHTS)["model"])
    figures = evaluate(model, test[fresh], config.train.eval_batch_size)
    result = {
        "params": params,
        "test_accuracy": figures["accuracy"],
        "test_exact": figures["exact"],
        "num_test": int(fresh.sum()),
    }
    atomic_write_text(cache, json.dumps(result, indent=2))
    return result


def collect(runs: list[Run], out: Path) -> list[dict]:
    """One row per finished run: its result plus task/variant/seed/lr and, for the figures,
    the run's layer (model.mixer), d_model and seq_len."""
    rows = []
    for r in runs:
        path = out / "runs" / r.run_id / "result.json"
        if path.exists():
            result = read_result(path.parent)
            rows.append(
                {
                    **result,
                    "task": r.task,
                    "mixer": r.variant,
                    "seed": r.seed,
                    "lr": r.lr,
                    "layer": r.config.model.mixer,
                    "d_model": r.config.model.d_model,
                    "seq_len": build_task(r.config).seq_len,
                }
            )
    return rows


def apply_test_params(
    rows: list[dict], runs: list[Run], out: Path, test_params: dict[str, dict]
) -> list[dict]:
    """Rows of the task rows in test_params get the test figures of their held-out split
    (heldout_test) as test_accuracy and test_exact; the run's own are kept as
    run_test_accuracy and run_test_exact. Other rows are returned as they are."""
    by_key = {(r.task, r.variant, r.seed, r.lr): r for r in runs}
    updated = []
    for row in rows:
        if row["task"] in test_params:
            run = by_key[(row["task"], row["mixer"], row["seed"], row["lr"])]
            held = heldout_test(run, out / "runs" / run.run_id, test_params[run.task])
            row = dict(row)
            for key in ("test_accuracy", "test_exact"):
                row[f"run_{key}"], row[key] = row[key], held[key]
        updated.append(row)
    return updated


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
    """Run the preset (skipping finished runs) and write results.csv, table.md and the
    preset's figures (gaps.png by default)."""
    from sandbox import report

    runs = expand(preset, overrides, seeds)
    _check_saved_configs(runs, out)
    make_dir(out)
    run_all(runs, out, workers or os.cpu_count() or 1, progress)
    # Held-out splits are evaluated for the chosen runs only (selection reads validation only).
    chosen = apply_test_params(select_lr(collect(runs, out)), runs, out, preset.test_params)
    report.write_all(chosen, preset, runs, out)
    return chosen
