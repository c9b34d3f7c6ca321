"""`sandbox sweep`: worker processes that share one Optuna study in an RDB storage.

Every worker (local ones started by ``--jobs K``, or others on other machines given the same
``--storage`` and ``--study``) runs the same loop: claim a place in the study, train the trial
under ``OUT/trials/<n>/`` (a normal run directory), report each validation accuracy so the
pruner can stop it, and store the result. The objective is the run's validation accuracy
(`val_accuracy` of result.json: of the weights it tests, the best evaluation's under
train.restore_best); test accuracy is only stored as a user attribute.

Counting. The study ends with exactly ``n_trials`` finished (COMPLETE + PRUNED) trials. A
trial holds a place while it is finished, running or queued (WAITING); a trial failed by
the heartbeat check holds its place for the retry the callback queues for it. A new trial
that finds all places taken by trials ordered before it (ordered by the trial it repeats,
then by number) is failed at once, unrun, as "surplus": two workers that start the last
place's trial at the same moment never both run it.

Crash safety. Running trials send a heartbeat, at the interval stored with the study (one
for all its workers); a trial whose worker died (SIGKILL, power loss) is failed once the
heartbeat is ``GRACE_FACTOR`` intervals old, and the retry callback
queues a copy with the same parameters (up to ``MAX_RETRY`` times). The copy trains in the
directory of the trial it repeats, so it resumes from that run's last checkpoint. A worker
killed before its trial's first heartbeat (while Optuna creates the trial and samples its
relative parameters) leaves a trial the heartbeat check never sees; it is failed and queued
the same way once it has been running ``ORPHAN_S`` without one. A worker that stalled that
long (a laptop's sleep, a swap storm) and finds its trial failed so leaves it to the retry
and goes on; the retry waits up to the grace period for it to let go of the directory.
Ctrl-C (or SIGTERM, SIGHUP) queues the running trial in the same way, without counting
against MAX_RETRY; rerunning the command continues the study.

Errors. A trial whose training raises (out of memory, a device the machine lacks) is failed
with its error kept and gives its place to a new trial; the sweep stops, as a SweepError, once
MAX_ERRORS trials made since the command started have raised, rather than training on
through a bug.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from sandbox.config import ConfigError
from sandbox.io import atomic_write_text, make_dir, read_record, terms_as_interrupts
from sweeps.space import SweepSpace, load_space

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_RETRY = 3  # retries of one trial killed again and again (e.g. out of memory), then give up
MAX_ERRORS = 3  # trials whose training raised, then the sweep stops
GRACE_FACTOR = 3  # a running trial is stale after this many missed heartbeats
ORPHAN_S = 600.0  # a trial running this long that never sent a heartbeat was orphaned
POLL_S = 1.0  # how often an idle worker looks for queued retries while others finish
SPACE_ATTR = "sandbox_space"  # study user attribute: the space the study was created with
HEARTBEAT_ATTR = "sandbox_heartbeat_s"  # study user attribute: every worker's heartbeat (s)
DEFAULT_HEARTBEAT_S = 30
BEAT_ATTR = "sandbox_heartbeat"  # trial system attribute: its own number once it has a heartbeat

# One instance serves the storage (stale trials) and the objective (interrupted trials).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    RETRY = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)


class SweepError(RuntimeError):
    """A sweep that could not finish (a worker process failed)."""


class SkippedTrial(Exception):
    """A trial failed on purpose without training: surplus, or an invalid combination."""


class TrialError(Exception):
    """A trial whose training raised: failed, its error kept in the "error" attribute."""


@dataclass
class Sweep:
    space: SweepSpace
    study: optuna.Study
    n_trials: int
    out: Path
    grace_s: float
    worker: int = 0
    first_trial: int = 0  # the study's trial count when this worker started (_check_errors)


DEFAULT_STORAGE = "study.db in --out"  # sweep.json's name for default_storage(out)


def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def _sqlite_file(url: str) -> str | None:
    """The file of an SQLite URL; None for another database, an in-memory one, a "file:" URI
    (uri=true: SQLite reads its own options, such as mode=ro) or a URL that does not parse
    (SQLAlchemy then reports it)."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.query.get("uri") in ("true", "1"):
        return None
    return None if parsed.database in (None, "", ":memory:") else parsed.database


def _in_memory(url: str) -> bool:
    """Whether ``url`` is an in-memory SQLite database (one per process)."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return False
    uri = parsed.query.get("uri") in ("true", "1")
    return parsed.get_backend_name() == "sqlite" and not uri and not _sqlite_file(url)


def _safe_url(url: str) -> str:
    """The URL without its password, an SQLite file's path made absolute (the directory's
    owner record then names one database however the URL was written)."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return url
    if _sqlite_file(url):
        parsed = parsed.set(database=str(Path(parsed.database).resolve()))
    elif parsed.password is None:
        return url  # as given (rendering would quote "sqlite:///:memory:")
    return parsed.render_as_string(hide_password=True)


class SweepStorage(RDBStorage):
    """An RDBStorage that marks each trial's first heartbeat in the trial (BEAT_ATTR, its
    number: a retry inherits the system attributes of the trial it repeats). Written after
    the heartbeat, the mark means the heartbeat check covers the trial; fail_orphans takes
    care of the running trials without it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._beating: set[int] = set()  # trials of this process marked already

    def record_heartbeat(self, trial_id: int) -> None:
        super().record_heartbeat(trial_id)
        if trial_id in self._beating:
            return
        try:
            number = self.get_trial_number_from_id(trial_id)
            self.set_trial_system_attr(trial_id, BEAT_ATTR, number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # finished meanwhile: nothing to cover
        # Another error stops Optuna's heartbeat thread (this runs in it), as an error of the
        # heartbeat itself would: the heartbeat check then fails the trial.
        self._beating.add(trial_id)


def make_storage(url: str, heartbeat_s: int | None = None, create: bool = True) -> SweepStorage:
    """An RDB storage (any SQLAlchemy URL); with heartbeats when heartbeat_s is given. Without
    ``create``, an SQLite URL must name an existing file (opening one creates it: a mistyped
    path would leave an empty database behind that later commands take for a sweep's)."""
    import sqlalchemy

    sqlite = url.startswith("sqlite")
    if sqlite and not create and not Path(_sqlite_file(url) or ".").exists():
        raise ConfigError(f"--storage {_safe_url(url)}: no such database file")
    # SQLite: wait for the file lock instead of failing when several workers write at once.
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    heartbeat = {}
    if heartbeat_s is not None:
        heartbeat = {
            "heartbeat_interval": heartbeat_s,
            "grace_period": GRACE_FACTOR * heartbeat_s,
            "heartbeat_stale_trial_callback": RETRY,
        }
    try:
        if not create:
            # RDBStorage creates Optuna's tables in whatever database it opens: a reader
            # pointed at another application's database wrote 13 tables into it.
            engine = sqlalchemy.create_engine(url, **engine_kwargs)
            try:
                tables = set(sqlalchemy.inspect(engine).get_table_names())
            finally:
                engine.dispose()
            if "studies" not in tables:
                raise ConfigError(f"--storage {_safe_url(url)}: not an Optuna study database")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return SweepStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--storage {_safe_url(url)}: {first}") from None


def open_study(
    storage: RDBStorage,
    name: str,
    space: SweepSpace | None,
    worker: int = 0,
    n_trials: int | None = None,
) -> tuple[optuna.Study, SweepSpace]:
    """Create the study, or join it; a joining worker's space must be the study's own, but
    for its ``trials:`` when ``n_trials`` (--trials) says how many the study ends with."""
    stored, done = None, 0
    if name in optuna.get_all_study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        stored, done = study.user_attrs.get(SPACE_ATTR), len(study.get_trials(deepcopy=False))
        if stored is None:
            raise ConfigError(f"study {name!r} was not created by `sandbox sweep`")
        if space is not None and space.canonical() != stored:
            only_trials = {**space.canonical(), "trials": stored.get("trials")} == stored
            if only_trials and n_trials is None:
                raise ConfigError(
                    f"study {name!r} was created with trials: {stored.get('trials')}; give "
                    f"--trials {space.trials} to take it to {space.trials} (a study's space "
                    "does not change)"
                )
            if not only_trials:
                raise ConfigError(
                    f"study {name!r} was created with another space; "
                    "use another --study, or leave SPACE out to join it"
                )
        space = SweepSpace.model_validate(stored)
    elif space is None:
        raise ConfigError(f"study {name!r} not found in {_safe_url(storage.url)}; give SPACE")
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction=space.direction,
        sampler=space.make_sampler(worker, done),
        pruner=space.make_pruner(),
        load_if_exists=True,
    )
    if stored is None:
        study.set_user_attr(SPACE_ATTR, space.canonical())
    return study, space


def study_heartbeat(storage: RDBStorage, name: str, asked: int | None) -> int:
    """The heartbeat interval (s) of study ``name``: the one stored with it, or for a new study
    (or one made before it was stored) ``asked`` or DEFAULT_HEARTBEAT_S. Every worker must
    beat at one interval: a worker with a shorter one took the others' live trials for dead
    ones (stale after GRACE_FACTOR of its own intervals) and trained them again."""
    stored = None
    if name in optuna.get_all_study_names(storage):
        stored = optuna.load_study(study_name=name, storage=storage).user_attrs.get(HEARTBEAT_ATTR)
    if stored is not None and asked is not None and asked != stored:
        raise ConfigError(
            f"--heartbeat {asked}: study {name!r} beats every {stored} s, and its workers must "
            "share one interval; leave --heartbeat out"
        )
    return stored or asked or DEFAULT_HEARTBEAT_S


def origin(t: FrozenTrial) -> int:
    """The number of the trial that `t` repeats (its own number if it is no retry)."""
    return t.system_attrs.get("failed_trial", t.number)


def place_holders(
    trials: list[FrozenTrial], grace_s: float, now: datetime | None = None
) -> list[FrozenTrial]:
    """The trials that take one of the study's places: finished, running, queued, or failed
    by the heartbeat check a moment ago and about to be queued again by the retry callback
    (it adds the copy right after failing the trial; `grace_s` bounds that wait)."""
    now = now or datetime.now()
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}

    def holds(t: FrozenTrial) -> bool:
        if t.state in (*FINISHED, TrialState.RUNNING, TrialState.WAITING):
            return True
        return (
            t.state == TrialState.FAIL
            and t.number not in retried
            and not (t.user_attrs.get("skipped") or t.user_attrs.get("error"))  # by us
            and len(t.system_attrs.get("retry_history", [])) < MAX_RETRY
            and t.datetime_complete is not None
            and (now - t.datetime_complete).total_seconds() < grace_s
        )

    return [t for t in trials if holds(t)]


def fail_orphans(study: optuna.Study, now: datetime | None = None) -> None:
    """Fail the trials that have been running for ORPHAN_S or more without a heartbeat
    (SweepStorage marks the first), and queue them again through the retry callback, as the
    heartbeat check does for stale ones. Such a trial's worker died inside ``study.ask()``,
    before Optuna started its heartbeat: the heartbeat check skips a trial with none, and it
    would hold a place for ever."""
    storage = study._storage  # no public accessor; Optuna's fail_stale_trials reads it so
    if storage.get_heartbeat_interval() is None:
        return  # no heartbeats, no marks
    now = now or datetime.now()
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.system_attrs.get(BEAT_ATTR) == t.number or t.datetime_start is None:
            continue
        if (now - t.datetime_start).total_seconds() < ORPHAN_S:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first, and queued its retry
        RETRY(study, storage.get_trial(trial_id))


def is_surplus(trials: list[FrozenTrial], number: int, n_trials: int, grace_s: float) -> bool:
    """Whether trial `number` finds all n_trials places taken by trials ordered before it."""
    me = next(t for t in trials if t.number == number)
    rank = (origin(me), me.number)
    ahead = [t for t in place_holders(trials, grace_s) if (origin(t), t.number) < rank]
    return len(ahead) >= n_trials


class Objective:
    """One trial: claim a place, sample, train in OUT/trials/<origin>, return val accuracy."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep
        self.number: int | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        self.number = trial.number  # for work(), should another worker fail the trial
        try:
            return self._run(trial)
        except KeyboardInterrupt:
            # Wherever it lands (sampling, training, recording the result), the trial is
            # queued again: the next worker resumes its checkpoint, or takes a finished run's
            # result as it is, rather than the trial holding a place as a bare failure.
            sw = self.sweep
            trial.set_user_attr("error", "interrupted")
            frozen = next(t for t in sw.study.get_trials() if t.number == trial.number)
            _requeue(sw.study, frozen)
            raise

    def _run(self, trial: optuna.Trial) -> float:
        from sandbox.train import train

        sw = self.sweep
        for key in ("error", "skipped"):  # a retry starts with the user attributes it repeats
            if trial.user_attrs.get(key) is not None:
                trial.set_user_attr(key, None)
        trials = sw.study.get_trials(deepcopy=False)
        if is_surplus(trials, trial.number, sw.n_trials, sw.grace_s):
            trial.set_user_attr("skipped", "surplus")
            raise SkippedTrial(f"surplus: the study has its {sw.n_trials} trials")
        values = sw.space.suggest(trial)
        try:
            config = sw.space.config_for(values)
        except ValueError as e:
            trial.set_user_attr("skipped", f"invalid: {e}")
            raise SkippedTrial(f"invalid parameters: {e}") from None
        first = origin(next(t for t in trials if t.number == trial.number))
        run_dir = sw.out / "trials" / str(first)
        trial.set_user_attr("config", config.model_dump(mode="json"))
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        trial.set_user_attr("host", socket.gethostname())

        def on_eval(record: dict) -> None:
            with warnings.catch_warnings():
                # A resumed retry redoes the evaluations after its checkpoint, and some were
                # reported (and inherited) already: Optuna keeps the first, equal, value.
                warnings.filterwarnings("ignore", "The reported value is ignored")
                trial.report(record["val_accuracy"], record["step"])
            if trial.should_prune():
                trial.set_user_attr("steps", record["step"])
                trial.set_user_attr("wall_s", record["wall_s"])
                raise optuna.TrialPruned(f"val_accuracy {record['val_accuracy']:.4f}")

        try:
            # A stale trial's retry may find the stalled worker still holding the directory:
            # woken (a laptop's sleep makes every running trial look stale), it stops at its
            # next evaluation, when it finds its trial failed (see work).
            wait = sw.grace_s
            result = train(
                config, run_dir, resume=True, progress=False, on_eval=on_eval, lock_wait_s=wait
            )
        except (optuna.TrialPruned, optuna.exceptions.UpdateFinishedTrialError):
            raise  # pruned; or failed meanwhile by another worker (see work)
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            raise TrialError(f"{type(e).__name__}: {e}") from e
        for key in ("val_accuracy", "test_accuracy", "test_exact", "steps", "wall_s", "solved"):
            trial.set_user_attr(key, result[key])
        trial.set_user_attr("num_params", result["params"])
        return result["val_accuracy"]


def _requeue(study: optuna.Study, t: FrozenTrial) -> None:
    """Queue a copy of interrupted trial ``t`` that trains in its directory, as the retry
    callback does for a dead worker's trial but with no entry in its retry history: Ctrl-C
    is not a failure, and counted as one, a trial interrupted MAX_RETRY + 1 times was
    dropped and its run never resumed."""
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=t.params,
            distributions=t.distributions,
            user_attrs=t.user_attrs,
            system_attrs={**t.system_attrs, "failed_trial": origin(t)},
            intermediate_values=t.intermediate_values,
        )
    )


def _check_errors(trials: list[FrozenTrial]) -> None:
    """Stop once MAX_ERRORS of ``trials`` (those made since this worker started: a rerun
    after a fix must not stop on the old errors) have raised."""
    errors = [t for t in trials if t.user_attrs.get("error") not in (None, "interrupted")]
    if len(errors) >= MAX_ERRORS:
        raise SweepError(
            f"{len(errors)} trials raised, e.g. trial {errors[-1].number}: "
            f"{errors[-1].user_attrs['error']}"
        )


def _check_invalid(trials: list[FrozenTrial], n_trials: int) -> None:
    invalid = [t for t in trials if (t.user_attrs.get("skipped") or "").startswith("invalid")]
    if len(invalid) >= max(10, n_trials):
        raise ConfigError(
            f"{len(invalid)} sampled parameter combinations were invalid, e.g. trial "
            f"{invalid[-1].number}: {invalid[-1].user_attrs['skipped']}"
        )


def _announcer(sweep: Sweep):
    def announce(study: optuna.Study, t: FrozenTrial) -> None:
        if t.user_attrs.get("skipped") == "surplus":
            return
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        if t.state == TrialState.COMPLETE:
            what = f"val_accuracy {t.value:.4f}, test_accuracy {t.user_attrs['test_accuracy']:.4f}"
        elif t.state == TrialState.PRUNED:
            what = f"at step {t.user_attrs.get('steps')}"
        else:
            what = t.user_attrs.get("skipped") or t.user_attrs.get("error", "")
        retry = f" (retry of {origin(t)})" if origin(t) != t.number else ""
        print(
            f"worker {sweep.worker}: trial {t.number}{retry} {t.state.name.lower()}: {what}; "
            f"{finished}/{sweep.n_trials} finished",
            flush=True,
        )

    return announce


def work(sweep: Sweep) -> None:
    """Run trials until the study holds n_trials finished ones. While all places are taken
    the worker waits: a place whose worker died comes back as a queued retry."""
    objective, announce = Objective(sweep), _announcer(sweep)
    while True:
        optuna.storages.fail_stale_trials(sweep.study)
        fail_orphans(sweep.study)
        trials = sweep.study.get_trials(deepcopy=False)
        if sum(t.state in FINISHED for t in trials) >= sweep.n_trials:
            return
        _check_invalid(trials, sweep.n_trials)
        _check_errors([t for t in trials if t.number >= sweep.first_trial])
        queued = any(t.state == TrialState.WAITING for t in trials)
        if queued or len(place_holders(trials, sweep.grace_s)) < sweep.n_trials:
            catch = (SkippedTrial, TrialError)
            objective.number = None
            try:
                sweep.study.optimize(objective, n_trials=1, catch=catch, callbacks=[announce])
            except ValueError:
                # Optuna's "Cannot tell a FAIL trial": ours was failed as stale by another
                # worker (this one stalled for GRACE_FACTOR heartbeats) and queued again.
                # That worker's retry holds the place: go on with another trial.
                if not _taken_over(sweep.study, objective.number):
                    raise
                print(
                    f"worker {sweep.worker}: trial {objective.number} was failed as stale by "
                    "another worker (its heartbeat was late) and queued again; going on",
                    flush=True,
                )
        else:
            time.sleep(POLL_S)


def _taken_over(study: optuna.Study, number: int | None) -> bool:
    """Whether trial ``number``, which this worker ran, is failed: not by this worker, which
    leaves that to Optuna's tell after the objective returns, so by another one."""
    return number is not None and any(
        t.number == number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    )


def _launch(argv: list[str], jobs: int, first_worker: int) -> None:
    """Start `jobs` worker processes running `sandbox sweep ARGV --jobs 1 --worker-index i`."""
    cmd = [sys.executable, "-m", "sandbox.cli", "sweep", *argv, "--jobs", "1", "--no-report"]
    # Own sessions: a terminal's Ctrl-C reaches this process only, which passes exactly one
    # SIGTERM on to each worker (a second one could cut short the queueing of its trial).
    # SIGTERM, not SIGINT: a command started with SIGINT ignored (`cmd &` in a script) hands
    # that on to its workers, which then trained on.
    procs = [
        subprocess.Popen([*cmd, "--worker-index", str(first_worker + i)], start_new_session=True)
        for i in range(jobs)
    ]
    # SIGTERM and SIGHUP, taken as Ctrl-C by run_sweep, are passed on to the workers too.
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        i, code = failed[0]
        raise SweepError(f"worker {first_worker + i} exited with status {code}")


def _claim_out_dir(out: Path, url: str, study_name: str, claim: bool) -> None:
    """OUT/trials/<n> belongs to one study: refuse to mix another study's runs into it. With
    ``claim``, once the study has opened, write the owner if none is: a command that fails
    on its storage or study name must not tie the directory to them."""

    def storage(url: str) -> str:
        # The default database by its place in OUT, not its absolute path, so that a moved or
        # copied sweep directory goes on (sweep.json files written before kept the path).
        safe = _safe_url(url)
        return DEFAULT_STORAGE if safe == _safe_url(default_storage(out)) else safe

    owner = {"storage": storage(url), "study": study_name}
    path = out / "sweep.json"
    if not path.exists():
        if claim:
            atomic_write_text(path, json.dumps(owner, indent=2) + "\n")
        return
    saved = read_record(path, ("storage", "study"), "; it says which study --out belongs to")
    saved["storage"] = storage(saved.get("storage", ""))
    if saved != owner:
        raise ConfigError(f"--out {out} holds the trials of another study ({path}); use another")


def run_sweep(
    space_path: str | None,
    n_trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    jobs: int = 1,
    out: str | Path | None = None,
    worker: int = 0,
    heartbeat_s: int | None = None,
    report: bool = True,
) -> tuple[optuna.Study, Path]:
    """Create or join the study and work on it (in `jobs` processes) until it holds its
    trials; then write the report into `out`. Returns the study and `out`. ``heartbeat_s``
    None: the study's (study_heartbeat). SIGTERM and SIGHUP stop it as Ctrl-C does (the
    running trial queued again at once, KeyboardInterrupt raised)."""
    if space_path is None and study_name is None:
        raise ConfigError("give a SPACE file, or --study (and --storage) to join a study")
    for flag, value in (("--trials", n_trials), ("--jobs", jobs), ("--heartbeat", heartbeat_s)):
        if value is not None and value < 1:  # --trials None: the space's number
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if worker < 0:
        raise ConfigError(f"--worker-index must be >= 0, got {worker}")
    space = load_space(space_path) if space_path else None
    study_name = study_name or Path(space_path).stem
    out = Path(out) if out else Path("runs") / "sweeps" / study_name
    url = storage or default_storage(out)
    in_memory = _in_memory(url)
    if jobs > 1 and in_memory:
        raise ConfigError(f"--storage {url}: --jobs {jobs} needs a database its processes share")
    make_dir(out)
    _claim_out_dir(out, url, study_name, claim=False)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # workers print their own lines
    with warnings.catch_warnings(), terms_as_interrupts():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        heartbeat_s = study_heartbeat(
            make_storage(url, create=space is not None), study_name, heartbeat_s
        )
        rdb = make_storage(url, heartbeat_s)
        study, space = open_study(rdb, study_name, space, worker, n_trials)
        if study.user_attrs.get(HEARTBEAT_ATTR) is None:
            study.set_user_attr(HEARTBEAT_ATTR, heartbeat_s)
        _claim_out_dir(out, url, study_name, claim=not in_memory)
        n = n_trials or space.trials
        if jobs > 1:
            argv = ["--storage", url, "--study", study_name, "--out", str(out)]
            argv += ["--trials", str(n), "--heartbeat", str(heartbeat_s)]
            _launch(argv, jobs, worker)
        else:
            first = len(study.get_trials(deepcopy=False))
            work(Sweep(space, study, n, out, GRACE_FACTOR * heartbeat_s, worker, first))
    if report:
        from sweeps.report import write_report

        write_report(study, out)
    return study, out
