"""Optuna sweeps: spaces, worker processes sharing a study (SQLite and PostgreSQL), crash
recovery with a real SIGKILL, the report, and re-training the exported best config."""

import csv
import datetime
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from sandbox.cli import main
from sandbox.config import load_config
from sweeps.runner import (
    BEAT_ATTR,
    FINISHED,
    SPACE_ATTR,
    default_storage,
    is_surplus,
    make_storage,
    origin,
)
from sweeps.space import load_space

REPO = Path(__file__).resolve().parents[1]

SPACE = {
    "base": {
        "seed": 1,
        "threads": 1,
        "task": {"name": "associative_recall", "num_train": 128, "num_valid": 64, "num_test": 64},
        "model": {"mixer": "h3", "d_model": 16, "mixer_params": {"d_state": 8}},
        "train": {"batch_size": 32, "epochs": 3, "eval_every": 4},
    },
    "trials": 6,
    "sampler": "tpe",
    "seed": 0,
    "pruner": "median",
    "pruner_options": {"n_startup_trials": 2},
    "params": {
        "model.mixer_params.first_ssm": {"type": "categorical", "choices": ["shift", "diag"]},
        "train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
    },
}


def write_space(path: Path, **changes) -> Path:
    data = json.loads(json.dumps(SPACE))
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def sweep_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "sandbox.cli", "sweep", *map(str, args)]


def load(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(storage))


def check_exact(study: optuna.Study, n: int) -> list[FrozenTrial]:
    """n finished trials, one per place (no trial repeated), numbers 0..M-1, and every failed
    trial either a surplus one (never run) or one whose retry finished."""
    trials = study.get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == n
    assert [t.number for t in trials] == list(range(len(trials)))
    assert len({origin(t) for t in finished}) == n
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("skipped") != "surplus":
            assert t.number in {origin(f) for f in finished}, f"trial {t.number} was lost"
        assert t.state != TrialState.RUNNING and t.state != TrialState.WAITING
    return finished


@pytest.fixture(scope="module")
def sqlite_sweep(tmp_path_factory):
    """The tiny space swept end to end by `sandbox sweep --jobs 2` (two worker processes)."""
    tmp = tmp_path_factory.mktemp("sweep")
    space = write_space(tmp / "tiny.yaml")
    out = tmp / "out"
    t0 = time.perf_counter()
    proc = subprocess.run(
        sweep_cmd(space, "--jobs", 2, "--out", out), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"two-worker SQLite sweep: {time.perf_counter() - t0:.1f} s")
    return {"space": space, "out": out, "stdout": proc.stdout, "storage": default_storage(out)}


def test_two_workers_share_a_sqlite_study_with_exact_count(sqlite_sweep):
    out = sqlite_sweep["out"]
    study = load(sqlite_sweep["storage"], "tiny")
    finished = check_exact(study, SPACE["trials"])
    assert "worker 0:" in sqlite_sweep["stdout"] and "worker 1:" in sqlite_sweep["stdout"]
    for t in finished:
        run = Path(t.user_attrs["run_dir"])
        assert run == (out / "trials" / str(origin(t))).resolve()
        assert (run / "config.yaml").exists() and (run / "metrics.jsonl").exists()
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        # Every evaluation was reported to Optuna: the pruner saw the validation curve.
        assert t.intermediate_values == {r["step"]: r["val_accuracy"] for r in records}
        if t.state == TrialState.COMPLETE:
            result = json.loads((run / "result.json").read_text())
            assert t.value == result["val_accuracy"]  # the objective: validation, not test
            assert t.user_attrs["test_accuracy"] == result["test_accuracy"]
    for name in ("trials.csv", "best_config.yaml", "history.png", "variants.png"):
        assert (out / name).stat().st_size > 0
    lines = (out / "trials.csv").read_text().splitlines()
    assert len(lines) == 1 + len(study.trials)
    assert "train.lr" in lines[0] and "test_accuracy" in lines[0]


def test_best_config_retrains_to_the_same_validation_accuracy(sqlite_sweep, tmp_path):
    best = load(sqlite_sweep["storage"], "tiny").best_trial
    path = sqlite_sweep["out"] / "best_config.yaml"
    config = load_config(path)  # what `sandbox train` reads, unchanged
    assert config.train.lr == best.params["train.lr"]
    assert main(["train", str(path), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    result = json.loads((tmp_path / "again" / "result.json").read_text())
    assert result["val_accuracy"] == best.value
    assert result["test_accuracy"] == best.user_attrs["test_accuracy"]


def test_sweep_report_command_and_joining_checks(sqlite_sweep, tmp_path, capsys, monkeypatch):
    out, storage = sqlite_sweep["out"], sqlite_sweep["storage"]
    report = tmp_path / "report"
    assert main(["sweep-report", "--storage", storage, "--out", str(report)]) == 0
    assert {p.name for p in report.iterdir()} >= {"trials.csv", "best_config.yaml", "history.png"}
    # The study is full: a worker joining it (no SPACE needed) has nothing to do.
    args = ["--storage", storage, "--study", "tiny", "--out", str(out), "--no-report"]
    assert main(["sweep", *args]) == 0
    # The same database by a relative path is the same owner of --out.
    monkeypatch.chdir(out.parent)
    relative = ["--storage", f"sqlite:///{out.name}/study.db", *args[2:]]
    assert main(["sweep", *relative]) == 0, capsys.readouterr().err
    monkeypatch.undo()
    # A worker with a different space may not join the study.
    other = write_space(tmp_path / "other.yaml", seed=1)
    capsys.readouterr()
    assert main(["sweep", str(other), *args]) == 2
    assert "another space" in capsys.readouterr().err
    # One with more trials is told how to extend the study (was "another space" too).
    more = write_space(tmp_path / "more.yaml", trials=9)
    assert main(["sweep", str(more), *args]) == 2
    assert "created with trials: 6; give --trials 9" in capsys.readouterr().err
    # Given --trials, that file joins (the advice was refused again for its trials: 9). With
    # --trials 6 the study is full already: nothing to train.
    assert main(["sweep", str(more), *args, "--trials", "6"]) == 0, capsys.readouterr().err
    # Its heartbeat is the study's: another one would fail live trials as stale ones.
    assert main(["sweep", *args, "--heartbeat", "5"]) == 2
    assert "beats every 30 s" in capsys.readouterr().err
    assert main(["sweep-report", "--out", str(tmp_path / "nothing")]) == 2
    assert "no study database" in capsys.readouterr().err
    # OUT/trials/<n> belongs to one study.
    assert main(["sweep", str(sqlite_sweep["space"]), "--study", "other", "--out", str(out)]) == 2
    assert "another study" in capsys.readouterr().err
    # A command that fails on its study name leaves a fresh --out unclaimed, and no empty
    # database that a later sweep-report would take for the sweep's.
    fresh = tmp_path / "fresh"
    assert main(["sweep", "--study", "tinyy", "--out", str(fresh)]) == 2
    assert "no such database file" in capsys.readouterr().err
    assert not (fresh / "sweep.json").exists() and not (fresh / "study.db").exists()
    assert main(["sweep", "--storage", storage, "--study", "tinyy", "--out", str(fresh)]) == 2
    assert "study 'tinyy' not found" in capsys.readouterr().err
    typo = tmp_path / "typo.db"
    assert main(["sweep-report", "--storage", f"sqlite:///{typo}", "--out", str(report)]) == 2
    assert "no such database file" in capsys.readouterr().err and not typo.exists()
    read_only = f"sqlite:///file:{out / 'study.db'}?mode=ro&uri=true"  # SQLite's own URI form
    assert main(["sweep-report", "--storage", read_only, "--out", str(report)]) == 0
    # A negative worker index named (was numpy's "expected non-negative integer").
    assert main(["sweep", *args, "--worker-index", "-1"]) == 2
    assert "--worker-index must be >= 0, got -1" in capsys.readouterr().err


def test_killed_worker_trial_is_retried_and_study_completes(tmp_path, capsys):
    # Longer trials (80 steps, an evaluation every 4) so the kill lands mid-trial.
    base = json.loads(json.dumps(SPACE["base"]))
    base["train"]["epochs"] = 20
    space = write_space(
        tmp_path / "kill.yaml", base=base, trials=3, pruner="none", pruner_options={}
    )
    out = tmp_path / "out"
    args = [space, "--out", out, "--heartbeat", 1, "--no-report"]
    proc = subprocess.Popen(sweep_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "trials" / "0" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "trials" / "0" / "result.json").exists(), "trial 0 ended before the kill"
    storage = default_storage(out)
    killed = load(storage, "kill").trials[0]
    assert killed.state == TrialState.RUNNING  # the dead worker could not say anything

    t0 = time.perf_counter()
    assert main(["sweep", *map(str, args)]) == 0
    print(f"restart after SIGKILL: {time.perf_counter() - t0:.1f} s")
    study = load(storage, "kill")
    finished = check_exact(study, 3)
    assert [t.number for t in study.trials if t.state == TrialState.FAIL] == [0]
    (retry,) = [t for t in finished if origin(t) == 0]
    assert retry.number > 0 and retry.params == killed.params
    # The retry resumed the killed run from its checkpoint, in the same run directory.
    assert retry.user_attrs["run_dir"] == str((out / "trials" / "0").resolve())
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(4, 81, 4))
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert retry.intermediate_values == {r["step"]: r["val_accuracy"] for r in records}


def _trial(number, state, *, failed=None, user=None, ago=0.0, history=()):
    now = datetime.datetime.now()
    system = {} if failed is None else {"failed_trial": failed, "retry_history": list(history)}
    done = None if state in (TrialState.RUNNING, TrialState.WAITING) else now
    if done is not None:
        done -= datetime.timedelta(seconds=ago)
    value = 0.5 if state in FINISHED else None
    return FrozenTrial(number, state, value, now, done, {}, {}, user or {}, system, {}, number)


def test_variants_and_trials_csv_keep_a_none_choice_apart_from_not_sampled(tmp_path):
    from sweeps.report import variant_points, write_report

    # The space a YAML `choices: [null, true]` makes, and an integer parameter.
    dists = {
        "model.pos_emb": CategoricalDistribution([None, True]),
        "model.n_layers": IntDistribution(1, 8),
    }
    specs = {
        "model.pos_emb": {"type": "categorical", "choices": [None, True]},
        "model.n_layers": {"type": "int", "low": 1, "high": 8},
    }
    study = optuna.create_study(direction="maximize")
    study.set_user_attr(SPACE_ATTR, {"params": specs})
    C, P, F, W = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.WAITING
    for state, value, params in [
        (C, 0.5, {"model.pos_emb": None, "model.n_layers": 1}),
        (C, 0.75, {"model.pos_emb": True, "model.n_layers": 8}),
        (P, 0.25, {"model.pos_emb": None, "model.n_layers": 2}),
        (F, None, {"model.pos_emb": None}),  # failed after sampling: not finished
        (W, None, {}),  # queued: samples nothing yet
    ]:
        used = {p: dists[p] for p in params}
        # The run config the runner stores: write_report exports the best trial's.
        config = {"task": {"name": "associative_recall"}}
        study.add_trial(
            create_trial(
                state=state,
                value=value,
                params=params,
                distributions=used,
                user_attrs={"config": config},
            )
        )

    points = variant_points(study, "model.pos_emb")
    assert points.values.tolist() == [
        [0, "COMPLETE", 0.5, "None"],
        [1, "COMPLETE", 0.75, "True"],
        [2, "PRUNED", 0.25, "None"],
    ]
    # The queued trial without the parameter does not turn 1 into the label "1.0".
    assert variant_points(study, "model.n_layers")["model.n_layers"].tolist() == ["1", "8", "2"]

    written = write_report(study, tmp_path)
    assert tmp_path / "variants.png" in written
    with open(tmp_path / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["model.pos_emb"] for row in rows] == ["None", "True", "None", "None", ""]
    # An integer parameter some trials lack stays integer ("8", not "8.0": pasted back as an
    # override, 8.0 was refused).
    assert [row["model.n_layers"] for row in rows] == ["1", "8", "2", "", ""]


def test_places_ordering_decides_surplus_trials():
    C, R, F, W = TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING
    # Two workers start trials 1 and 2 for the last place: only the earlier one runs.
    trials = [_trial(0, C), _trial(1, R), _trial(2, R)]
    assert not is_surplus(trials, 1, 2, grace_s=5) and is_surplus(trials, 2, 2, grace_s=5)
    # Trial 1 just failed by the heartbeat check: its place waits for its retry.
    trials = [_trial(0, C), _trial(1, F), _trial(2, R)]
    assert is_surplus(trials, 2, 2, grace_s=5)
    # The retry (trial 3, repeating 1) ranks as trial 1 did, ahead of newer trials.
    skipped = {"skipped": "surplus"}
    trials = [_trial(0, C), _trial(1, F), _trial(2, F, user=skipped), _trial(3, R, failed=1)]
    trials[3].system_attrs["retry_history"] = [1]
    assert not is_surplus(trials, 3, 2, grace_s=5)
    trials.append(_trial(4, R))
    assert is_surplus(trials, 4, 2, grace_s=5)
    # A failure that was not followed by a retry in time (or failed by us) frees its place.
    trials = [_trial(0, C), _trial(1, F, ago=60), _trial(2, R)]
    assert not is_surplus(trials, 2, 2, grace_s=5)
    trials = [_trial(0, C), _trial(1, F, user={"error": "ValueError: x"}), _trial(2, W)]
    assert not is_surplus(trials, 2, 2, grace_s=5)


BAD_ENTRIES = [
    ({"params": {"train.lrr": {"type": "float", "low": 0.1, "high": 1}}}, "params['train.lrr']"),
    (
        {"params": {"model.mixer_params.head_dimm": {"type": "int", "low": 1, "high": 2}}},
        "params['model.mixer_params.head_dimm']",
    ),
    ({"params": {"train.lr": {"type": "float", "low": 1, "high": 0.1}}}, "params['train.lr']"),
    (
        {"params": {"train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}},
        "params['train.lr']",
    ),
    (
        {"params": {"train.lr": {"type": "float", "low": 0.1, "high": 1, "lgo": True}}},
        "params['train.lr'] field 'lgo'",
    ),
    ({"params": {"train.lr": {"type": "uniform", "low": 0.1}}}, "params['train.lr']"),
    (
        {"params": {"model.mixer_params.init": {"type": "categorical", "choices": ["lin", "x"]}}},
        "params['model.mixer_params.init'] = 'x'",
    ),
    (
        {
            "params": {
                "train.lr": {
                    "type": "float",
                    "low": 0.001,
                    "high": 0.01,
                    "condition": {"model.mixer": "h3"},
                }
            }
        },
        "params['train.lr']: condition on 'model.mixer'",
    ),
    ({"trails": 5}, "field 'trails': unknown key"),
    # Whole-number ends of a float range pass an integer field; the values between do not.
    (
        {"params": {"model.d_model": {"type": "float", "low": 16, "high": 32}}},
        "params['model.d_model']",
    ),
    # A condition value that cannot be hashed (the choices are named) was a TypeError.
    (
        {
            "params": {
                "model.mixer_params.first_ssm": {"type": "categorical", "choices": {"s": "shift"}},
                "train.lr": {
                    "type": "float",
                    "low": 0.001,
                    "high": 0.01,
                    "condition": {"model.mixer_params.first_ssm": {"x": 1}},
                },
            }
        },
        "condition model.mixer_params.first_ssm={'x': 1} is not a choice",
    ),
    ({"seed": -1}, "field 'seed'"),
    ({"pruner": "asha"}, "field 'pruner'"),
    ({"pruner": "none"}, "pruner_options: NopPruner"),
    # Options the constructors keep and use only later: TPE's after its start-up trials,
    # Hyperband's at the first report. They failed the study midway, its space stored.
    ({"sampler_options": {"n_startup_trials": 1, "n_ei_candidates": 0}}, "sampler_options: "),
    ({"pruner": "hyperband", "pruner_options": {"reduction_factor": 1}}, "pruner_options: "),
    (
        {
            "params": {
                **SPACE["params"],
                "train.batch_size": {  # after the condition's parameter in the sorted YAML
                    "type": "categorical",
                    "choices": [16, 32],
                    "condition": {"model.mixer_params.first_ssm": []},
                },
            }
        },
        "condition on 'model.mixer_params.first_ssm' allows no value",
    ),
    ({"base": {"model": {"d_modle": 8}}}, "base: config field 'model.d_modle'"),
    # Wrong choices were named by pydantic's union branches ("Input should be a valid boolean").
    (
        {"params": {"model.attn_layers": {"type": "categorical", "choices": [[], [0]]}}},
        "params['model.attn_layers'] field 'choices': choice 0 ([]) is not a scalar",
    ),
    (
        {"params": {"model.mixer_params.head_dim": {"type": "categorical", "choices": {1: 1}}}},
        "params['model.mixer_params.head_dim'] field 'choices': named choices need string names",
    ),
    # Conditions that can never all hold: init only with a diagonal first SSM, and the batch
    # size with a shift one and init. It parsed and was never sampled.
    (
        {
            "params": {
                "model.mixer_params.first_ssm": {
                    "type": "categorical",
                    "choices": ["shift", "diag"],
                },
                "model.mixer_params.init": {
                    "type": "categorical",
                    "choices": ["lin", "inv"],
                    "condition": {"model.mixer_params.first_ssm": "diag"},
                },
                "train.batch_size": {  # after both in the sorted YAML
                    "type": "categorical",
                    "choices": [16, 32],
                    "condition": {
                        "model.mixer_params.first_ssm": "shift",
                        "model.mixer_params.init": "inv",
                    },
                },
            }
        },
        "params['train.batch_size']: its conditions can never all hold: "
        "model.mixer_params.first_ssm must be in ['shift'] and in ['diag']",
    ),
]


@pytest.mark.parametrize("changes, entry", BAD_ENTRIES)
def test_bad_space_entries_exit_2_naming_the_entry(tmp_path, capsys, changes, entry):
    space = write_space(tmp_path / "bad.yaml", **changes)
    assert main(["sweep", str(space), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert entry in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "study.db").exists()


def test_shipped_spaces_load():
    smoke = load_space(REPO / "sweeps" / "smoke.yaml")
    assert len(smoke.params) == 2 and smoke.base["model"]["d_model"] <= 32
    ablation = load_space(REPO / "sweeps" / "h3_ablation.yaml")
    assert set(ablation.params["task"].choices) == {"associative_recall", "induction_head"}
    assert ablation.base["task"]["num_train"] == 5000  # from configs/h3_ar.yaml
    config = ablation.config_for({"task": "induction_head", "model.mixer_params.head_dim": 8})
    assert config.task.name == "induction_head" and config.task.params["vocab_size"] == 20
    assert config.task.num_train == 5000 and config.model.mixer_params["head_dim"] == 8
    # Induction head trains on the answer, as configs/h3_ih.yaml does; AR on every token.
    assert ablation.active("train.loss_on", {"task": "induction_head"})
    assert not ablation.active("train.loss_on", {"task": "associative_recall"})
    ih = ablation.config_for({"task": "induction_head", "train.loss_on": "answers"})
    assert ih.train.loss_on == "answers" == load_config(REPO / "configs/h3_ih.yaml").train.loss_on
    assert ablation.config_for({"task": "associative_recall"}).train.loss_on == "all"
    # The diagonal-SSM knobs are sampled whenever either SSM is diagonal (they were tied to the
    # second SSM only, so diag + shift always ran with the defaults).
    pairs = {"shift+diag": True, "diag+shift": True, "shift+shift": False, "none+shift": False}
    for pair, diagonal in pairs.items():
        assert ablation.active("model.mixer_params.init", {"model.mixer_params": pair}) == diagonal
    knobs = {"model.mixer_params.init": "inv", "model.mixer_params.discretization": "zoh"}
    config = ablation.config_for({"model.mixer_params": "diag+shift", **knobs})
    assert config.model.mixer_params == {
        "head_dim": 8,  # from configs/h3_ar.yaml
        "first_ssm": "diag",
        "second_ssm": "shift",
        "init": "inv",
        "discretization": "zoh",
    }


# --- PostgreSQL: a private server on 127.0.0.1, started and stopped by the test -----------


def _pg_bin() -> Path | None:
    dirs = [os.environ.get("PG_BIN", "")]
    dirs += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))[
        ::-1
    ]
    if shutil.which("initdb"):
        dirs.append(str(Path(shutil.which("initdb")).parent))
    for d in dirs:
        if d and (Path(d) / "initdb").exists() and (Path(d) / "postgres").exists():
            return Path(d)
    return None


def _server_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: use the `postgres` account (made by the Debian
    package), or make a system account for the purpose."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "sandbox-pg"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "sandbox-pg"],
        check=True,
    )
    return pwd.getpwnam("sandbox-pg")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    psycopg2 = pytest.importorskip("psycopg2")
    user = _server_user()
    as_user = (
        {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    )
    # Outside pytest's tmp_path: its parent is private to root, and the server runs as `user`.
    root = Path(tempfile.mkdtemp(prefix="sandbox-pg-"))
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    data, port = root / "data", _free_port()
    subprocess.run(
        [bin_dir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-locale"],
        cwd=root,
        check=True,
        capture_output=True,
        **as_user,
    )
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(
        [bin_dir / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", root]
        + ["-c", "fsync=off", "-c", "synchronous_commit=off"],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        **as_user,
    )
    try:
        deadline = time.time() + 60
        while True:
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
                break
            except psycopg2.OperationalError:
                assert time.time() < deadline, "PostgreSQL did not start in 60 s"
                time.sleep(0.2)
        # The server is ours: the pid it wrote is the process we started.
        assert int((data / "postmaster.pid").read_text().split()[0]) == server.pid
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        server.send_signal(signal.SIGINT)  # "fast" shutdown, by its own pid
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_postgres_study(postgres_url, tmp_path):
    space = write_space(tmp_path / "pg.yaml", trials=4)
    out = tmp_path / "out"
    args = ["--storage", postgres_url, "--study", "pg-tiny", "--jobs", 2, "--out", out]
    proc = subprocess.run(sweep_cmd(space, *args), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker 0:" in proc.stdout and "worker 1:" in proc.stdout
    check_exact(load(postgres_url, "pg-tiny"), 4)
    assert not (out / "study.db").exists()
    for name in ("trials.csv", "best_config.yaml", "history.png"):
        assert (out / name).exists()
    load_config(out / "best_config.yaml")


def test_variant_ticks_of_an_integer_parameter_are_in_numeric_order(tmp_path, monkeypatch):
    """Were in order of first appearance: 8, 2, 16, 4."""
    import sweeps.report as report

    study = optuna.create_study(direction="maximize")
    spec = {"model.n_layers": {"type": "int", "low": 1, "high": 16}}
    study.set_user_attr(SPACE_ATTR, {"params": spec})
    for n_layers, value in [(8, 0.5), (2, 0.6), (16, 0.7), (4, 0.4)]:
        study.add_trial(
            create_trial(
                value=value,
                params={"model.n_layers": n_layers},
                distributions={"model.n_layers": IntDistribution(1, 16)},
            )
        )
    ticks = []
    monkeypatch.setattr(
        report,
        "_save",
        lambda fig, path: ticks.extend(t.get_text() for t in fig.axes[0].get_xticklabels()),
    )
    assert report._variants(study, tmp_path / "variants.png")
    assert ticks == ["2", "4", "8", "16"]
    # The helper notebook 04 orders its strip plots with, for any study's distributions.
    points = report.variant_points(study, "model.n_layers")
    assert report.tick_order(points, "model.n_layers", None) == ["2", "4", "8", "16"]
    assert report.tick_order(points, "model.n_layers", [16, 8]) == ["16", "8"]


def test_a_dotted_parameter_beats_a_mapping_choice_whatever_the_order(tmp_path):
    """A task choice (a mapping with seq_len 20) listed after task.params.seq_len used to
    overwrite it: the trial recorded seq_len 30 and trained with 20."""
    ar = {"name": "associative_recall", "params": {"vocab_size": 10, "seq_len": 20}}
    params = {
        "task.params.seq_len": {"type": "categorical", "choices": [20, 30]},
        "task": {"type": "categorical", "choices": {"ar": ar}},
    }
    for order in (params, dict(reversed(params.items()))):
        space = load_space(write_space(tmp_path / "order.yaml", params=order))
        config = space.config_for({"task.params.seq_len": 30, "task": "ar"})
        assert config.task.params == {"vocab_size": 10, "seq_len": 30}


def _processes_with(text: str) -> list[int]:
    """Pids whose command line contains `text` (Linux /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return pids


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `cmd &` in a script starts cmd


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("jobs", [1, 2])
def test_sigterm_stops_a_sweep_and_queues_its_trials(tmp_path, jobs):
    """SIGTERM (timeout, kill, a scheduler) ended a one-worker sweep outright, its trial left
    running until three heartbeats had passed; with --jobs it ended the parent alone (its
    workers ran on as orphans beside the next run of the command), and the parent's SIGINT to
    its workers did nothing when the command had been started with SIGINT ignored: they
    trained the whole study while the parent said "interrupted"."""
    base = json.loads(json.dumps(SPACE["base"]))
    base["train"]["epochs"] = 20  # trials long enough to be cut
    space = write_space(tmp_path / "term.yaml", base=base, trials=4)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        sweep_cmd(space, "--jobs", jobs, "--out", out, "--no-report"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_ignore_sigint,
    )
    deadline = time.time() + 120
    while len(list(out.glob("trials/*/metrics.jsonl"))) < jobs and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    workers = [pid for pid in _processes_with(str(out)) if pid != proc.pid]
    assert len(workers) == (jobs if jobs > 1 else 0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, proc.stderr.read().decode()[-3000:]
    assert "interrupted" in proc.stderr.read().decode()
    assert _processes_with(str(out)) == []
    trials = load(default_storage(out), "term").get_trials()
    assert sum(t.state in FINISHED for t in trials) < 4
    # Every trial that was running is queued again at once, for the rerun to resume (a worker
    # between two trials at the signal has none).
    assert 1 <= sum(t.state == TrialState.WAITING for t in trials) <= jobs
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.parametrize("where", ["sampling", "recording"])
def test_an_interrupt_anywhere_in_a_trial_queues_it_again(tmp_path, monkeypatch, where):
    """Ctrl-C outside train() (while sampling, or recording a finished run's result) left a
    bare failed trial holding a place, and its finished run was trained again."""
    from sweeps.runner import Objective, Sweep, open_study

    space = load_space(write_space(tmp_path / "int.yaml", trials=2))
    study, space = open_study(make_storage(default_storage(tmp_path)), "int", space)
    sweep = Sweep(space, study, 2, tmp_path / "out", grace_s=60)
    if where == "sampling":

        def suggest(self, trial):
            raise KeyboardInterrupt

        monkeypatch.setattr(type(space), "suggest", suggest)  # a pydantic model's class
    else:
        record = optuna.Trial.set_user_attr

        def set_user_attr(trial, key, value):
            if key == "num_params":  # after train() returned
                raise KeyboardInterrupt
            record(trial, key, value)

        monkeypatch.setattr(optuna.Trial, "set_user_attr", set_user_attr)
    # Five times: Ctrl-C is no failure and takes nothing from the MAX_RETRY = 3 budget of
    # crashed workers' trials (the fourth interrupt dropped the trial and its run).
    for _ in range(5):
        with pytest.raises(KeyboardInterrupt):
            study.optimize(Objective(sweep), n_trials=1)
    *failed, queued = study.get_trials()
    assert len(failed) == 5
    assert {(t.state, t.user_attrs["error"]) for t in failed} == {(TrialState.FAIL, "interrupted")}
    assert queued.state == TrialState.WAITING and origin(queued) == 0


def test_a_trial_that_raises_gives_its_place_and_three_stop_the_sweep(tmp_path, monkeypatch):
    """A training error (out of memory, say) fails that trial only, with its error kept, and
    the sweep goes on to its count; the third error stops the sweep."""
    import sandbox.train
    from sweeps.runner import MAX_ERRORS, Sweep, SweepError, open_study, work

    calls = []

    def train(config, run_dir, **kwargs):
        calls.append(config.train.lr)
        if len(calls) == 2 or fail_all:
            raise RuntimeError("out of memory")
        keys = ("val_accuracy", "test_accuracy", "test_exact", "wall_s")
        return {**dict.fromkeys(keys, config.train.lr), "steps": 1, "solved": False, "params": 1}

    monkeypatch.setattr(sandbox.train, "train", train)
    space = load_space(write_space(tmp_path / "err.yaml", trials=3))
    fail_all = False
    study, space = open_study(make_storage(default_storage(tmp_path)), "err", space)
    work(Sweep(space, study, 3, tmp_path / "out", grace_s=60))
    trials = study.get_trials()
    states = [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert [t.state for t in trials] == states
    assert trials[1].user_attrs["error"] == "RuntimeError: out of memory"
    assert [t.value for t in trials if t.value is not None] == [calls[0], calls[2], calls[3]]

    fail_all = True
    (tmp_path / "b").mkdir()
    study, space = open_study(make_storage(default_storage(tmp_path / "b")), "err", space)
    with pytest.raises(SweepError, match=f"{MAX_ERRORS} trials raised, e.g. trial 2: Runtime"):
        work(Sweep(space, study, 3, tmp_path / "b" / "out", grace_s=60))
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL] * MAX_ERRORS
    # A rerun (the cause fixed) counts only its own errors: the old ones stopped the study
    # for good, whatever --trials said.
    fail_all = False
    args = ["sweep", "--storage", default_storage(tmp_path / "b"), "--study", "err"]
    assert main([*args, "--out", str(tmp_path / "b"), "--no-report"]) == 0
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 3


def test_a_worker_whose_trial_was_failed_as_stale_goes_on(tmp_path, monkeypatch, capsys):
    """A worker that stalled past the grace period finds its trial failed by another worker
    (which queued a retry): it died with Optuna's "Cannot tell a FAIL trial." (exit 2)."""
    import sandbox.train
    from sweeps.runner import RETRY, Sweep, open_study, work

    storage = make_storage(default_storage(tmp_path), heartbeat_s=30)
    study, space = open_study(storage, "stale", load_space(write_space(tmp_path / "s.yaml")))
    taken = []

    waits = []

    def train(config, run_dir, on_eval, lock_wait_s, **kwargs):
        waits.append(lock_wait_s)
        if not taken:  # what another worker's heartbeat check does to a stalled trial
            (running,) = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            taken.append(running.number)
            storage.set_trial_state_values(running._trial_id, state=TrialState.FAIL)
            RETRY(study, storage.get_trial(running._trial_id))
            on_eval({"val_accuracy": 0.5, "step": 4, "wall_s": 1.0})  # reports: refused
        keys = ("val_accuracy", "test_accuracy", "test_exact", "wall_s")
        return {**dict.fromkeys(keys, config.train.lr), "steps": 1, "solved": False, "params": 1}

    monkeypatch.setattr(sandbox.train, "train", train)
    work(Sweep(space, study, 2, tmp_path / "out", grace_s=90))
    assert f"trial {taken[0]} was failed as stale by another worker" in capsys.readouterr().out
    # Each run waits up to the grace period for a directory a stalled worker still holds.
    assert waits == [90, 90, 90]
    trials = study.get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    assert any(origin(t) == taken[0] and t.state == TrialState.COMPLETE for t in trials)


def test_sweep_report_of_a_plain_optuna_study_and_bad_outputs(tmp_path, capsys):
    """sweep-report on a study that `sandbox sweep` did not make raised KeyError: 'config'; an
    --out that is a file gave a traceback; trials.csv wrote trial numbers as 2.0; and an
    in-memory storage with --jobs 2 failed in its workers and claimed --out for nothing."""
    storage = f"sqlite:///{tmp_path / 'plain.db'}"
    study = optuna.create_study(storage=storage, study_name="plain", direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_int("n", 1, 3), n_trials=4)
    study.add_trial(  # a retry of trial 0 with sandbox's attributes (counts, run numbers)
        create_trial(
            state=TrialState.PRUNED,
            value=0.1,
            params=study.trials[0].params,
            distributions=study.trials[0].distributions,
            user_attrs={"num_params": 8416, "steps": 40},
            system_attrs={"failed_trial": 0},
        )
    )
    out = tmp_path / "report"
    assert main(["sweep-report", "--storage", storage, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"trials.csv", "history.png"}
    assert not (out / "best_config.yaml").exists()  # no run config to export
    with open(out / "trials.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert (last["retry_of"], last["num_params"], last["steps"]) == ("0", "8416", "40")
    (tmp_path / "afile").write_text("")
    capsys.readouterr()
    assert main(["sweep-report", "--storage", storage, "--out", str(tmp_path / "afile")]) == 2
    assert "cannot make the directory" in capsys.readouterr().err
    space = write_space(tmp_path / "mem.yaml")
    args = [str(space), "--storage", "sqlite:///:memory:", "--jobs", "2", "--out", str(out)]
    assert main(["sweep", *args]) == 2
    err = capsys.readouterr().err
    assert "--storage sqlite:///:memory:: --jobs 2 needs a database its processes share" in err
    assert not (out / "sweep.json").exists()


def test_a_moved_sweep_directory_goes_on(sqlite_sweep, tmp_path, capsys):
    """sweep.json held the default database's absolute path, so a copied or moved sweep
    directory was refused as "the trials of another study"."""
    moved = tmp_path / "moved"
    shutil.copytree(sqlite_sweep["out"], moved)
    owner = json.loads((moved / "sweep.json").read_text())
    assert owner == {"storage": "study.db in --out", "study": "tiny"}
    assert main(["sweep", str(sqlite_sweep["space"]), "--out", str(moved), "--no-report"]) == 0
    assert len(load(default_storage(moved), "tiny").get_trials()) == len(
        load(sqlite_sweep["storage"], "tiny").get_trials()
    )  # nothing more to run
    # A sweep.json written before, with the absolute path, is still read as the default.
    owner["storage"] = default_storage(moved)
    (moved / "sweep.json").write_text(json.dumps(owner))
    assert main(["sweep", str(sqlite_sweep["space"]), "--out", str(moved), "--no-report"]) == 0
    owner["study"] = "other"
    (moved / "sweep.json").write_text(json.dumps(owner))
    capsys.readouterr()
    assert main(["sweep", str(sqlite_sweep["space"]), "--out", str(moved), "--no-report"]) == 2
    assert "holds the trials of another study" in capsys.readouterr().err
    # A damaged sweep.json is named (a bare JSON error; a traceback for a list).
    for damaged, why in (("{", "is not valid JSON"), ("[1]", "holds no JSON object")):
        (moved / "sweep.json").write_text(damaged)
        assert main(["sweep", str(sqlite_sweep["space"]), "--out", str(moved), "--no-report"]) == 2
        assert f"{moved / 'sweep.json'} {why}" in capsys.readouterr().err


def test_a_trial_orphaned_before_its_first_heartbeat_is_queued_again(tmp_path, monkeypatch):
    """A worker killed inside study.ask() (the trial made, its heartbeat not yet begun) left a
    running trial that the heartbeat check never fails: with every place taken, the other
    workers waited for it for ever."""
    import sandbox.train
    import sweeps.runner as runner
    from sweeps.runner import Sweep, fail_orphans, open_study, work

    space = load_space(write_space(tmp_path / "orphan.yaml", trials=1))
    storage = make_storage(default_storage(tmp_path), heartbeat_s=1)
    study, space = open_study(storage, "orphan", space)
    orphan = study.ask()  # and the worker dies here
    beating = study.ask()
    storage.record_heartbeat(beating._trial_id)  # what Optuna's heartbeat thread does first
    later = datetime.datetime.now() + datetime.timedelta(seconds=runner.ORPHAN_S + 1)
    fail_orphans(study)  # too young yet
    assert {t.state for t in study.get_trials()} == {TrialState.RUNNING}
    fail_orphans(study, now=later)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert origin(trials[2]) == orphan.number
    # The one with a heartbeat is left to the heartbeat check (test_killed_worker_trial_...).
    assert trials[1].system_attrs[BEAT_ATTR] == beating.number

    # End to end: one place, taken by an orphan; the worker retries it rather than waiting.
    def train(config, run_dir, **kwargs):
        keys = ("val_accuracy", "test_accuracy", "test_exact", "wall_s")
        return {**dict.fromkeys(keys, 0.5), "steps": 1, "solved": False, "params": 1}

    class Clock:  # time.sleep for work(): no waiting for ever
        calls = 0

        @classmethod
        def sleep(cls, s):
            cls.calls += 1
            assert cls.calls < 50, "the worker waited for the orphan"
            time.sleep(s)

    monkeypatch.setattr(sandbox.train, "train", train)
    monkeypatch.setattr(runner, "time", Clock)
    monkeypatch.setattr(runner, "ORPHAN_S", 2.0)
    monkeypatch.setattr(runner, "POLL_S", 0.1)
    (tmp_path / "b").mkdir()
    rdb = make_storage(default_storage(tmp_path / "b"), heartbeat_s=30)
    study, space = open_study(rdb, "orphan", space)
    study.ask()
    work(Sweep(space, study, 1, tmp_path / "b" / "out", grace_s=90))
    orphaned, retry = study.get_trials()
    assert (orphaned.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert origin(retry) == 0  # (the orphan died before sampling: no params to repeat)
    assert retry.user_attrs["run_dir"] == str((tmp_path / "b" / "out" / "trials" / "0").resolve())


def test_workers_and_late_joiners_get_their_own_random_draws():
    """README: a worker's sampler is seeded from the sweep's seed, its index and the trials
    done when it joins: --jobs 2 workers do not sample the same start-up parameters, nor does a
    worker restarted on a study that moved on replay its first draws."""
    from sweeps.space import SweepSpace

    def first_lr(space, worker, done):
        study = optuna.create_study(direction="maximize", sampler=space.make_sampler(worker, done))
        return study.ask().suggest_float("train.lr", 1e-4, 1e-2, log=True)

    lr = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    for sampler in ("random", "tpe"):
        space = SweepSpace.model_validate({"sampler": sampler, "seed": 0, "params": lr})
        assert first_lr(space, 0, 0) == first_lr(space, 0, 0)
        assert first_lr(space, 0, 0) != first_lr(space, 1, 0)  # another worker index
        assert first_lr(space, 0, 0) != first_lr(space, 0, 5)  # joined after 5 trials
        assert first_lr(space, 0, 0) != first_lr(space.model_copy(update={"seed": 1}), 0, 0)


def test_the_space_check_of_a_large_n_startup_trials_is_bounded(tmp_path, monkeypatch):
    """n_startup_trials 1e6 (a way to say "never prune"): the dry run of the pruner stops
    past the study's own trials (it ran a million fake trials, a hang)."""
    runs, real = [], optuna.Study.optimize

    def optimize(study, objective, n_trials=None, **kwargs):
        runs.append(n_trials)
        assert n_trials <= 1000, f"a dry run of {n_trials} fake trials"  # fail, do not hang
        return real(study, objective, n_trials=n_trials, **kwargs)

    monkeypatch.setattr(optuna.Study, "optimize", optimize)
    params = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}
    path = write_space(tmp_path / "s.yaml", params=params)
    data = yaml.safe_load(path.read_text())
    data["pruner_options"] = {"n_startup_trials": 1_000_000}
    path.write_text(yaml.safe_dump(data))
    space = load_space(path)
    assert runs and max(runs) <= space.trials + 2


@pytest.mark.parametrize("argv", [["sweep-report"], ["sweep", "--study", "x"]])
def test_reading_commands_leave_a_foreign_database_alone(tmp_path, argv):
    """sweep-report, and sweep joining a study, open an existing storage: one that holds no
    Optuna study is refused without Optuna's tables being created in it."""
    import sqlite3

    db = tmp_path / "other.db"
    con = sqlite3.connect(db)
    con.execute("create table users(id int)")
    con.commit()
    con.close()
    extra = ["--out", str(tmp_path / "o")] if argv[0] == "sweep" else []
    assert main([*argv, "--storage", f"sqlite:///{db}", *extra]) == 2
    con = sqlite3.connect(db)
    try:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    finally:
        con.close()
    assert tables == {"users"}
