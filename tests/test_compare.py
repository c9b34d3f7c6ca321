"""sandbox compare: preset resolution, lr selection, writers, skipping finished runs, end to end."""

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import tasks
from sandbox import report
from sandbox.cli import main
from sandbox.compare import PRESET_DIR, compare, expand, load_preset, preset_names, select_lr
from sandbox.config import ConfigError
from tasks.baselines import no_recall_accuracy


def test_shipped_presets_expand():
    assert "h3-table2" in preset_names()
    preset = load_preset("h3-table2")
    runs = expand(preset)
    assert len(runs) == len(preset.tasks) * len(preset.variants) * preset.seeds
    by_key = {(r.task, r.variant): r.config for r in runs}
    ih_h3 = by_key[("induction_head", "h3")]
    assert ih_h3.model.mixer == "h3" and ih_h3.model.n_layers == 2
    assert ih_h3.task.params == {"vocab_size": 20, "seq_len": 31}
    assert by_key[("associative_recall", "attention")].task.params == {
        "vocab_size": 10,
        "seq_len": 22,
    }
    assert len(expand(preset, seeds=3)) == 3 * len(runs)
    assert all(r.config.train.max_steps == 7 for r in expand(preset, ["train.max_steps=7"]))


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_expands(name):
    runs = expand(load_preset(name))
    assert runs and all(r.config.model.n_layers >= 1 for r in runs)


def test_paper_loss_preset_changes_only_the_loss_budget_and_lr():
    # h3-ih-paper-loss is h3-table2's IH row with the all-token loss, a longer cap and the lr
    # its README table was measured with.
    base = {
        r.variant: r.config for r in expand(load_preset("h3-table2")) if r.task == "induction_head"
    }
    long = {r.variant: r.config for r in expand(load_preset("h3-ih-paper-loss"))}
    assert long.keys() == base.keys()
    for variant, config in long.items():
        assert config.train.loss_on == "all" and config.train.max_steps == 15000
        changed = {"loss_on": "answers", "max_steps": 5000, "eval_every": 100, "lr": 5e-4}
        assert (
            config.model_copy(update={"train": config.train.model_copy(update=changed)})
            == (base[variant])
        )


def test_preset_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tasks": {"t": {}}, "variants": {"v": {}}, "seedz": 2}))
    with pytest.raises(ConfigError, match="'seedz'"):
        load_preset(str(bad))
    for empty in ("tasks", "variants"):  # exit 0, and "results written to ... gaps.png"
        bad.write_text(yaml.safe_dump({"tasks": {"t": {}}, "variants": {"v": {}}, empty: {}}))
        with pytest.raises(ConfigError, match=f"'{empty}'"):
            load_preset(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"tasks": {"t": {}}, "variants": {"v": {"modle": {}}}}))
    with pytest.raises(ConfigError, match=r"t/v: config field 'modle'"):
        expand(load_preset(str(typo)))


@pytest.mark.parametrize(
    "update, overrides, match",
    [
        # Directory names keep to [\w.-]: both variants would train into one directory.
        ({"variants": {"attn x": {}, "attn-x": {}}}, [], "would share the run directory"),
        ({"lr_grid": [1e-3, 1e-3]}, [], "make the lr_grid values distinct"),
        # The grid would replace the override's lr in every run.
        ({"lr_grid": [1e-3, 3e-3]}, ["train.lr=0.05"], "train.lr: this preset's runs take"),
        ({"lr_grid": [1e-3, 3e-3]}, ["train={lr: 0.05}"], "train.lr: this preset's runs take"),
    ],
)
def test_preset_grid_errors(update, overrides, match):
    """Mistakes in a preset's grid are errors before anything trains, not runs sharing a
    directory, a silently dropped override or a paper figure that never shows."""
    preset = load_preset("h3-table2")
    variants = update.pop("variants", None)
    if variants:
        update["variants"] = {name: preset.variants["attention"] for name in variants}
        update["paper"] = {}  # its cells name the shipped variants
    with pytest.raises(ConfigError, match=match):
        expand(preset.model_copy(update=update), overrides)


@pytest.mark.parametrize(
    "paper, match",
    [
        ({"associative_recal": {"h3": 99.8}}, "paper: 'associative_recal' is not a task row"),
        ({"associative_recall": {"H3": 99.8}}, r"paper.associative_recall: \['H3'\] are not"),
    ],
)
def test_preset_paper_cells_name_rows_and_variants(tmp_path, paper, match):
    """A misspelt row or variant in a preset's own paper: is an error as it loads (its figure
    was silently left out of the table); inherited cells need not match (see test_extends)."""
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"extends": "h3-table2", "paper": paper}))
    with pytest.raises(ConfigError, match=match):
        load_preset(str(path))


def test_lr_grid_expands_and_selection_ignores_test():
    preset = load_preset("h3-table2").model_copy(update={"lr_grid": [1e-4, 1e-3]})
    assert {r.lr for r in expand(preset)} == {1e-4, 1e-3}
    rows = [
        {
            "task": "t",
            "mixer": "m",
            "seed": 0,
            "lr": 1e-4,
            "val_accuracy": 0.9,
            "steps": 50,
            "test_accuracy": 1.0,
        },
        {
            "task": "t",
            "mixer": "m",
            "seed": 0,
            "lr": 1e-3,
            "val_accuracy": 0.95,
            "steps": 90,
            "test_accuracy": 0.5,
        },
        {
            "task": "t",
            "mixer": "m",
            "seed": 1,
            "lr": 1e-4,
            "val_accuracy": 1.0,
            "steps": 80,
            "test_accuracy": 0.7,
        },
        {
            "task": "t",
            "mixer": "m",
            "seed": 1,
            "lr": 1e-3,
            "val_accuracy": 1.0,
            "steps": 40,
            "test_accuracy": 0.6,
        },
    ]

    def row(seed, lr, val, steps, test):
        keys = ("task", "mixer", "seed", "lr", "val_accuracy", "steps", "test_accuracy")
        return dict(zip(keys, ("t", "m", seed, lr, val, steps, test)))

    rows += [
        row(2, 1e-4, 0.8, 50, 0.9),  # best validation listed first, at the smaller lr, with
        row(2, 1e-3, 0.7, 10, 0.1),  # the higher test accuracy (seed 0: the lower one)
        row(3, 1e-3, 1.0, 40, 0.2),  # validation and steps tied: the smaller lr
        row(3, 1e-4, 1.0, 40, 0.1),
    ]
    chosen = {r["seed"]: r["lr"] for r in select_lr(rows)}
    # best validation; tie broken by fewer steps, then the smaller lr
    assert chosen == {0: 1e-3, 1: 1e-3, 2: 1e-4, 3: 1e-4}


def _row(task, mixer, seed, acc, steps=10, solved=True):
    return {
        "task": task,
        "mixer": mixer,
        "seed": seed,
        "test_accuracy": acc,
        "test_exact": acc / 2,  # three different figures, so that no column can stand in
        "val_accuracy": acc - 0.05,  # for another unnoticed
        "lr": 1e-3,
        "steps": steps,
        "steps_to_solve": steps,
        "wall_s": 1.5,
        "params": 100,
        "solved": solved,
    }


def test_csv_and_markdown_writers():
    rows = [_row("ar", "h3", 0, 0.9, 10), _row("ar", "h3", 1, 1.0, 30), _row("ar", "s4d", 0, 0.5)]
    parsed = list(csv.DictReader(io.StringIO(report.results_csv(rows))))
    assert [r["mixer"] for r in parsed] == ["h3", "h3", "s4d"]
    assert list(parsed[0]) == report.CSV_COLUMNS
    assert float(parsed[1]["test_accuracy"]) == 1.0
    assert (float(parsed[1]["test_exact"]), float(parsed[1]["val_accuracy"])) == (0.5, 0.95)

    summary = report.summarize(rows)
    assert summary[("ar", "h3")]["mean"] == pytest.approx(95.0)
    assert summary[("ar", "h3")]["sd"] == pytest.approx(7.0710678)  # sample sd of 90 and 100
    assert summary[("ar", "h3")]["steps"] == 20
    skewed = [_row("ar", "h3", seed, 0.5, steps) for seed, steps in enumerate((10, 20, 90))]
    assert report.summarize(skewed)[("ar", "h3")]["steps"] == 20  # the median, not the mean 40

    preset = load_preset("h3-table2").model_copy(
        update={
            "tasks": {"ar": {}},
            "variants": {"h3": {}, "s4d": {}, "gss": {}},
            "paper": {"ar": {"random": 25.0, "h3": 99.8}},
        }
    )
    header, table = report.table_rows(summary, preset, {"ar": 25.0})
    md = report.markdown(header, table).splitlines()
    assert md[0] == "| mixer | ar (ours) | ar (paper) | ar steps |"
    assert md[2] == "| random | 25.0 | 25.0 | - |"
    assert md[3] == "| h3 | 95.0 ± 7.1 | 99.8 | 20 |"
    assert md[4] == "| s4d | 50.0 | - | 10 |"
    assert md[5] == "| gss | - | - | - |"  # no runs yet
    # The no-recall baseline's row, where a task row has one ("-" for one without).
    preset = preset.model_copy(update={"tasks": {"ar": {}, "ih": {}}, "paper": {}})
    summary = {("ar", "h3"): summary[("ar", "h3")]}
    _, table = report.table_rows(summary, preset, {"ar": 25.0, "ih": 5.0}, {"ar": 60.2, "ih": None})
    assert table[:2] == [["random", "25.0", "-", "5.0", "-"], ["no recall", "60.2", "-", "-", "-"]]
    _, table = report.table_rows(summary, preset, {"ar": 25.0, "ih": 5.0}, {"ih": None})
    assert [row[0] for row in table] == ["random", "h3", "s4d", "gss"]


def _tiny_preset(tmp_path):
    preset = {
        "description": "tiny",
        "base": {
            "threads": 1,
            "task": {"num_train": 64, "num_valid": 32, "num_test": 32},
            "model": {"d_model": 16, "mixer_params": {}},
            "train": {"max_steps": 6, "eval_every": 3, "batch_size": 16},
        },
        "tasks": {"ar": {"task": {"name": "associative_recall"}}},
        "variants": {
            "h3": {"model": {"mixer": "h3", "mixer_params": {"d_state": 8}}},
            "attention": {"model": {"mixer": "attention"}},
        },
        "paper": {"ar": {"random": 25.0, "h3": 99.8, "attention": 100.0}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(preset, sort_keys=False))
    return path


def test_tiny_compare_end_to_end_and_rerun_skips(tmp_path):
    preset = load_preset(str(_tiny_preset(tmp_path)))
    out = tmp_path / "out"
    chosen = compare(preset, out, workers=2, progress=False)
    assert sorted(r["mixer"] for r in chosen) == ["attention", "h3"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["task"], r["mixer"], r["seed"]) for r in rows] == [
        ("ar", "h3", "0"),
        ("ar", "attention", "0"),
    ]
    assert all(int(r["steps"]) <= 6 for r in rows)
    table = (out / "table.md").read_text()
    assert "| h3 |" in table and "| attention |" in table
    # AR's no-recall baseline, measured on the row's own task setting (tasks.baselines).
    ar = tasks.build("associative_recall")
    no_recall = 100 * max(no_recall_accuracy(ar).values())
    assert f"| no recall | {no_recall:.1f} | - | - |" in table
    assert (out / "gaps.png").read_bytes()[:4] == b"\x89PNG"

    results = sorted(out.glob("runs/*/result.json"))
    stamps = {p: p.stat().st_mtime_ns for p in results}
    again = compare(preset, out, workers=2, progress=False)
    assert {p: p.stat().st_mtime_ns for p in results} == stamps  # nothing re-trained
    assert json.dumps(again, sort_keys=True) == json.dumps(chosen, sort_keys=True)


def _state(pid: str) -> str | None:
    """A process's state letter (R, S, Z, ...), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("kill", ["parent", "worker"])
def test_sigterm_to_compare_with_workers_stops_them_quietly(tmp_path, kill):
    """SIGTERM (a timeout, a job scheduler) ended the parent alone and its pool's workers
    trained on, beside a rerun; and every interrupt left the resource tracker warning of a
    leaked semaphore per worker (tqdm's lock, made in each worker). A worker killed on its own
    (the OOM killer) was replaced by the pool and its run lost: the command waited for ever."""
    preset = yaml.safe_load(_tiny_preset(tmp_path).read_text())
    preset["base"]["train"]["max_steps"] = 100_000  # runs long enough to be cut
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(preset, sort_keys=False))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sandbox.cli", "compare", "--preset", str(path)]
    proc = subprocess.Popen([*cmd, "--out", str(out), "--workers", "2"], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(out.glob("runs/*/metrics.jsonl"))) < 2 and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) >= 2  # the two workers (and the resource tracker)
    workers = [
        pid
        for pid in children
        if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == 2
    if kill == "parent":
        proc.send_signal(signal.SIGTERM)
        code, message = 130, "interrupted; rerun the same command"
    else:
        os.kill(int(workers[0]), signal.SIGKILL)
        code, message = 1, "a worker process died (killed, or out of memory) while training"
    try:
        assert proc.wait(timeout=120) == code
        err = proc.stderr.read().decode()
        assert message in err and "leaked" not in err and "Traceback" not in err, err[-3000:]
        for pid in workers:  # gone, or a zombie about to be reaped by init
            assert _state(pid) in (None, "Z"), pid
        # The resource tracker ends once it reads its pipe's end: give it a moment.
        deadline = time.time() + 30
        while any(_state(pid) not in (None, "Z") for pid in children) and time.time() < deadline:
            time.sleep(0.1)
        assert all(_state(pid) in (None, "Z") for pid in children)
    except BaseException:
        proc.kill()
        for pid in children:  # no orphan left training for 100k steps
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
        raise


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_to_compare_with_one_worker_exits_130(tmp_path, signum):
    """With --workers 1 (the default on a one-CPU machine) the runs train in the parent, which
    SIGTERM and SIGHUP ended silently (exit 143, 129) instead of as documented (130 and the
    line to rerun)."""
    preset = yaml.safe_load(_tiny_preset(tmp_path).read_text())
    preset["base"]["train"]["max_steps"] = 100_000  # long enough to be cut
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(preset, sort_keys=False))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sandbox.cli", "compare", "--preset", str(path), "--quiet"]
    proc = subprocess.Popen([*cmd, "--out", str(out), "--workers", "1"], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list(out.glob("runs/*/metrics.jsonl")) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 130
        err = proc.stderr.read().decode()
        assert "interrupted; rerun the same command" in err and "Traceback" not in err, err
    finally:
        proc.kill()


def test_cli_compare_bad_preset_exits_2(capsys):
    assert main(["compare", "--preset", "h3-tabel2"]) == 2
    assert "unknown preset 'h3-tabel2'" in capsys.readouterr().err


def test_extends_replaces_fields_and_merges_base(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(
        yaml.safe_dump(
            {
                "extends": "h3-table2",
                "base": {"train": {"max_steps": 5}},
                "variants": {"only": {"model": {"mixer": "h3"}}},
            }
        )
    )
    parent, preset = load_preset("h3-table2"), load_preset(str(child))
    assert list(preset.variants) == ["only"]  # replaced, not merged
    assert preset.tasks == parent.tasks and preset.paper == parent.paper
    assert preset.base["train"]["max_steps"] == 5
    assert preset.base["train"]["lr"] == parent.base["train"]["lr"]  # base merged key by key
    loop = tmp_path / "loop.yaml"
    loop.write_text(yaml.safe_dump({"extends": str(loop), "tasks": {}, "variants": {}}))
    with pytest.raises(ConfigError, match="cycle"):
        load_preset(str(loop))
    # Spelled with "..", each turn's path was longer than the last: "File name too long".
    (tmp_path / "d").mkdir()
    dotted = tmp_path / "d" / "dotted.yaml"
    dotted.write_text(yaml.safe_dump({"extends": "../d/dotted.yaml", "tasks": {}}))
    with pytest.raises(ConfigError, match="'extends' cycle through"):
        load_preset(str(dotted))
    # A relative path is the preset file's neighbour, whatever the working directory.
    (tmp_path / "sub").mkdir()
    grandchild = tmp_path / "sub" / "grandchild.yaml"
    grandchild.write_text(yaml.safe_dump({"extends": "../child.yaml"}))
    assert load_preset(str(grandchild)).variants == preset.variants


def test_a_task_row_whose_train_is_not_a_mapping_is_named(tmp_path):
    """Was a TypeError traceback (train: 5), or for a string read as setting lr."""
    path = tmp_path / "p.yaml"
    data = yaml.safe_load((PRESET_DIR / "h3-table2.yaml").read_text())
    data["tasks"]["associative_recall"]["train"] = 5
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="config field 'train'"):
        expand(load_preset(str(path)))


@pytest.mark.parametrize("flag", [["--seeds", "0"], ["--workers", "-1"], ["--seeds", "two"]])
def test_cli_compare_bad_counts_exit_2(flag):
    with pytest.raises(SystemExit) as e:
        main(["compare", *flag])
    assert e.value.code == 2


def test_expand_refuses_what_training_would_refuse_or_overwrite(tmp_path):
    """Caught before any run trains, naming the task row and variant: a layer setting the
    model refuses (it stopped the grid in a worker, after other runs had trained, without
    saying which variant), and a preset's own seed or, with lr_grid, train.lr (both were
    replaced silently, where the same override on the command line is refused)."""
    preset = load_preset("h3-table2")
    bad_head = {"model": {"mixer": "h3", "mixer_params": {"head_dim": 3}}}
    broken = preset.model_copy(update={"variants": {**preset.variants, "h3bad": bad_head}})
    with pytest.raises(ConfigError, match=r"^induction_head/h3bad: .*head_dim=3 must divide"):
        expand(broken)
    seeded = preset.model_copy(update={"base": {**preset.base, "seed": 7}})
    with pytest.raises(ConfigError, match="/.*: seed: a preset's runs take seeds 0 .. n-1"):
        expand(seeded)
    # Base's train.lr is the default the grid replaces; a task row's own is refused.
    rows = {**preset.tasks}
    rows["induction_head"] = {**rows["induction_head"], "train": {"lr": 0.05}}
    gridded = preset.model_copy(update={"lr_grid": [1e-4, 1e-3], "tasks": rows})
    with pytest.raises(ConfigError, match="^induction_head/.*: train.lr: this preset's runs"):
        expand(gridded)
    # Counts a task row's example space cannot fill (AR of length 4: one pair and a query).
    tiny = {"task": {"name": "associative_recall", "params": {"vocab_size": 6, "seq_len": 4}}}
    small = preset.model_copy(update={"tasks": {**preset.tasks, "tiny": tiny}})
    with pytest.raises(ConfigError, match="^tiny/.*: make_splits: found only .* too small"):
        expand(small)
    # A run directory that is a file is named as such (it was "made with another config").
    runs = expand(preset)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / runs[0].run_id).write_text("")
    with pytest.raises(ValueError, match=f"run {runs[0].run_id}: .*") as refused:
        compare(preset, tmp_path, workers=1, progress=False)
    assert "another config" not in str(refused.value)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_stop_pool_ends_its_own_workers_only():
    """stop_pool terminates the pool's workers, not every multiprocessing child of the process:
    compare runs in-process in a notebook, beside the user's own processes. (Read from /proc:
    exitcode and is_alive rely on waitpid, which another test's reaper may have done.)"""
    import multiprocessing

    from sandbox.pools import stop_pool, worker_pool

    other = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    other.start()
    try:
        pool = worker_pool(1)
        pool.submit(time.sleep, 0.01).result()
        (worker,) = pool.context.started
        stop_pool(pool)
        deadline = time.time() + 10
        while _state(worker.pid) not in (None, "Z") and time.time() < deadline:
            time.sleep(0.1)
        assert _state(worker.pid) in (None, "Z")  # the pool's worker is gone
        assert _state(other.pid) not in (None, "Z")  # the other child is left alone
    finally:
        other.terminate()
        other.join()


def test_heldout_split_excludes_validation_examples_too(tmp_path):
    """heldout_test's split leaves out every example equal to one of the run's training or
    validation examples. AR at vocab 6, seq_len 6 has so few distinct examples that a
    32-example test stream certainly repeats some of the 4 validation ones; test_params that
    keep the task as it is make the held-out split the task's own test stream, less those."""
    from sandbox.compare import Run, heldout_test
    from sandbox.config import build_config
    from sandbox.io import save_checkpoint
    from sandbox.train import WEIGHTS, build_model, build_task

    params = {"vocab_size": 6, "seq_len": 6}
    config = build_config(
        {
            "seed": 0,
            "task": {
                "name": "associative_recall",
                "params": params,
                "num_train": 8,
                "num_valid": 4,
                "num_test": 32,
            },
            "model": {"mixer": "attention", "d_model": 8, "n_layers": 1},
        }
    )
    save_checkpoint(tmp_path / WEIGHTS, build_model(config, build_task(config)))
    held = heldout_test(
        Run("ar", "attention", 0, config.train.lr, config), tmp_path, {"seq_len": 6}
    )

    def rows(batch):  # examples as (inputs, scored targets), by brute force
        triples = zip(batch.inputs.tolist(), batch.targets.tolist(), batch.answer_mask.tolist())
        return [(tuple(x), tuple(y for y, m in zip(t, mm) if m)) for x, t, mm in triples]

    task = tasks.build("associative_recall", **params)
    seen = tasks.make_splits(task, 8, 4, 0, seed=0)
    test = tasks.make_splits(task, 0, 0, 32, seed=0).test
    assert set(rows(seen.valid)) & set(rows(test)), "the setting must exercise the check"
    excluded = set(rows(seen.train)) | set(rows(seen.valid))
    assert held["num_test"] == sum(r not in excluded for r in rows(test))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_pool_workers_exit_when_their_parent_is_killed():
    """kill -9 of compare's (or prepare-data's) parent: its workers exit within seconds rather
    than train on holding their runs' locks (the rerun was refused) and then wait for ever."""
    script = (
        "import time\n"
        "from sandbox.pools import worker_pool\n"
        "pool = worker_pool(1)\n"
        "pool.submit(time.sleep, 0).result()\n"
        "print(pool.context.started[0].pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = proc.stdout.readline().strip()
        assert _state(worker) not in (None, "Z")
        proc.kill()
        proc.wait()
        deadline = time.time() + 20
        while _state(worker) not in (None, "Z") and time.time() < deadline:
            time.sleep(0.2)
        assert _state(worker) in (None, "Z"), "an orphaned pool worker lives on"
    finally:
        proc.kill()
        if worker:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(worker), signal.SIGKILL)


def _two_variant_preset(tmp_path, variants: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(
        "base: {threads: 1, task: {num_train: 64, num_valid: 16, num_test: 16},\n"
        "       model: {d_model: 8, n_layers: 1}, train: {max_steps: 2, eval_every: 1}}\n"
        "tasks: {ar: {task: {name: associative_recall}}}\n" + variants
    )
    return path


@pytest.mark.parametrize("name", ["random", "no recall", "''", "' '"])
def test_compare_refuses_variant_names_of_the_table_rows_or_empty(tmp_path, capsys, name):
    """table.md's baseline rows are "random" and "no recall" (the paper's chance keyed by
    "random"): a variant so named gave a second such row, one with the paper's chance."""
    preset = _two_variant_preset(tmp_path, f"variants: {{{name}: {{model: {{mixer: h3}}}}}}\n")
    out = tmp_path / "c"
    assert main(["compare", "--preset", str(preset), "--out", str(out), "--quiet"]) == 2
    assert "a variant may not be named" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "override", ["model.mixer=gss", "model={mixer: gss}", "model.mixer_params={}", "task.name=x"]
)
def test_compare_refuses_an_override_of_what_the_rows_or_variants_set(tmp_path, capsys, override):
    """Applied to every run, model.mixer=gss trained one model under every variant's name."""
    variants = (
        "variants: {h3: {model: {mixer: h3, mixer_params: {head_dim: 8}}},\n"
        "           s4d: {model: {mixer: s4d}}}\n"
    )
    preset = _two_variant_preset(tmp_path, variants)
    out = tmp_path / "c"
    assert main(["compare", "--preset", str(preset), "--out", str(out), "--quiet", override]) == 2
    assert "set by the preset's rows or variants" in capsys.readouterr().err
    assert not out.exists()
