"""Search spaces: a base run config plus parameters by dotted path, read from YAML.

A space file (unknown keys are errors, like every config here)::

    description: free text
    base_config: ../configs/h3_ar.yaml   # optional run config, relative to this file
    base: {train: {epochs: 20}}          # RunConfig fields merged over base_config
    trials: 20              # finished trials (complete + pruned) the study ends with
    direction: maximize     # the objective, validation accuracy, is maximised
    sampler: tpe            # tpe | random
    sampler_options: {}     # keyword arguments of optuna's TPESampler / RandomSampler
    seed: 0                 # sampler seed (mixed with the worker index); null: unseeded
    pruner: median          # median | hyperband | none
    pruner_options: {}      # keyword arguments of MedianPruner / HyperbandPruner
    params:                 # dotted path into the run config -> distribution
      train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      model.d_model: {type: int, low: 16, high: 64, step: 16}
      model.mixer_params.second_ssm: {type: categorical, choices: [diag, shift]}
      model.mixer_params.init:          # only sampled when second_ssm is diag
        {type: categorical, choices: [lin, inv], condition: {model.mixer_params.second_ssm: diag}}
      task:                             # named choices: the value is merged at the path
        type: categorical
        choices:
          associative_recall: {name: associative_recall, params: {vocab_size: 10}}
          induction_head: {name: induction_head, params: {vocab_size: 20}}

Categorical choices are a list of scalars, or a mapping name -> value where Optuna sees the
name and the run config gets the value (a mapping value is merged into the section at the
path). A ``condition`` maps earlier categorical parameters to a value (or a list of values);
the parameter is sampled only when all of them match, and is left at the base otherwise.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import optuna
from pydantic import Field, ValidationError

from sandbox.config import (
    ConfigError,
    RunConfig,
    Seed,
    Strict,
    build_config,
    deep_merge,
    load_config,
    read_yaml,
)

Scalar = None | bool | int | float | str


class _Param(Strict):
    # Earlier categorical parameter path -> the value (or list of values) it must have.
    condition: dict[str, Any] = Field(default_factory=dict)

    def config_value(self, value: Any) -> Any:
        """What the run config gets for the value Optuna sampled."""
        return value


class CategoricalParam(_Param):
    type: Literal["categorical"]
    choices: list[Scalar] | dict[str, Any] = Field(min_length=1)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        return optuna.distributions.CategoricalDistribution(list(self.choices))

    def samples(self) -> list:
        return list(self.choices)

    def suggest(self, trial: optuna.Trial, path: str) -> Any:
        return trial.suggest_categorical(path, list(self.choices))

    def config_value(self, value: Any) -> Any:
        return self.choices[value] if isinstance(self.choices, dict) else value


class IntParam(_Param):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    def distribution(self) -> optuna.distributions.BaseDistribution:
        return optuna.distributions.IntDistribution(self.low, self.high, self.log, self.step)

    def samples(self) -> list:
        return [self.low, self.distribution().high]  # high as rounded down onto the step grid

    def suggest(self, trial: optuna.Trial, path: str) -> Any:
        return trial.suggest_int(path, self.low, self.high, step=self.step, log=self.log)


class FloatParam(_Param):
    type: Literal["float"]
    low: float
    high: float
    step: float | None = Field(None, gt=0)
    log: bool = False

    def distribution(self) -> optuna.distributions.BaseDistribution:
        return optuna.distributions.FloatDistribution(self.low, self.high, self.log, self.step)

    def samples(self) -> list:
        # Besides the ends, a value between them: whole-number ends would pass for an integer
        # field, and then nearly every trial would be invalid.
        high = self.distribution().high
        inside = self.low + self.step if self.step else math.nextafter(self.low, high)
        return [self.low, min(inside, high), high]

    def suggest(self, trial: optuna.Trial, path: str) -> Any:
        return trial.suggest_float(path, self.low, self.high, step=self.step, log=self.log)


Param = Annotated[CategoricalParam | IntParam | FloatParam, Field(discriminator="type")]


class SweepSpace(Strict):
    description: str = ""
    base_config: str | None = None  # resolved into `base` by load_space
    base: dict[str, Any] = Field(default_factory=dict)
    trials: int = Field(20, ge=1)
    direction: Literal["maximize"] = "maximize"
    sampler: Literal["tpe", "random"] = "tpe"
    sampler_options: dict[str, Any] = Field(default_factory=dict)
    seed: Seed | None = 0
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_options: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Param] = Field(min_length=1)

    def active(self, path: str, values: dict[str, Any]) -> bool:
        """Whether `path` is sampled given the values of the parameters before it."""
        return all(
            path_ in values and _matches(values[path_], want)
            for path_, want in self.params[path].condition.items()
        )

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample (or, for a queued retry, read back) the active parameters, in file order."""
        values: dict[str, Any] = {}
        for path, param in self.params.items():
            if self.active(path, values):
                values[path] = param.suggest(trial, path)
        return values

    def config_data(self, values: dict[str, Any]) -> dict:
        """The base with each sampled value set (or merged, for a mapping) at its path.

        Shorter paths first: a value at `task.params.seq_len` beats a `task` choice's mapping
        whatever their order in the file, so the value a trial records is the one it trains.
        """
        data = copy.deepcopy(self.base)
        for path, value in sorted(values.items(), key=lambda item: item[0].count(".")):
            nested = functools.reduce(
                lambda inner, key: {key: inner},
                reversed(path.split(".")),
                self.params[path].config_value(value),
            )
            data = deep_merge(data, nested)
        return data

    def config_for(self, values: dict[str, Any]) -> RunConfig:
        """The run config of one trial, checked down to the task and mixer parameters."""
        config = build_config(self.config_data(values))
        check_buildable(config)
        return config

    def make_sampler(self, worker: int = 0, done: int = 0) -> optuna.samplers.BaseSampler:
        """The sampler of worker `worker` joining the study when it has `done` trials: the
        seed is drawn from (seed, worker, done), so parallel workers, and a worker restarted
        on a study that moved on, do not replay each other's random draws."""
        seed = None
        if self.seed is not None:
            seed = int(np.random.SeedSequence([self.seed, worker, done]).generate_state(1)[0])
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed, **self.sampler_options)
        # Constant liar: running trials count as bad guesses, so parallel workers spread out.
        options = {"constant_liar": True, **self.sampler_options}
        return optuna.samplers.TPESampler(seed=seed, **options)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        kinds = {
            "median": optuna.pruners.MedianPruner,
            "hyperband": optuna.pruners.HyperbandPruner,
            "none": optuna.pruners.NopPruner,
        }
        return kinds[self.pruner](**self.pruner_options)

    def canonical(self) -> dict:
        """JSON-able form stored with the study; workers joining it must match it."""
        return self.model_dump(mode="json", exclude={"base_config", "description"})


def _matches(value: Any, want: Any) -> bool:
    return value in want if isinstance(want, list) else value == want


def check_buildable(config: RunConfig) -> None:
    """Build the task and the model once, so bad task or mixer parameters (free-form dicts in
    RunConfig) fail here with their own ValueError instead of inside a trial."""
    from sandbox.train import build_model, build_task

    build_model(config, build_task(config))


def _choices_message(choices: Any) -> str | None:
    """What is wrong with a categorical parameter's ``choices`` (pydantic's own message names
    a branch of its union: "Input should be a valid boolean" for a list among the choices)."""
    if isinstance(choices, list):
        for i, choice in enumerate(choices):
            if not (choice is None or isinstance(choice, bool | int | float | str)):
                return (
                    f"choice {i} ({choice!r}) is not a scalar (null, bool, number or string); "
                    "give such values as named choices, {name: value}"
                )
    elif isinstance(choices, dict):
        for name in choices:
            if not isinstance(name, str):
                return f"named choices need string names, got {name!r}"
    else:
        return "must be a list of scalars or a mapping of names to values"
    return None


def _validation_message(err: ValidationError, data: dict) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    if (
        len(loc) >= 4
        and (loc[0], loc[2], loc[3]) == ("params", "categorical", "choices")
        and isinstance(data["params"][loc[1]], dict)
    ):
        message = _choices_message(data["params"][loc[1]].get("choices"))
        if message is not None:
            return f"params[{loc[1]!r}] field 'choices': {message}"
    if loc[:1] == ["params"] and len(loc) > 1:
        # ('params', 'train.lr', 'float', 'low'): name the entry, then the field inside it.
        inner = ".".join(loc[3:])
        where = f"params[{loc[1]!r}]" + (f" field {inner!r}" if inner else "")
    else:
        where = f"field {'.'.join(loc) or '<root>'!r}"
    msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    return f"{where}: {msg}"


def parse_space(data: Any, name: str, root: Path | None = None) -> SweepSpace:
    """Validate a space mapping: schema, distributions, conditions, and every parameter path
    (each sample value is built into a full run config, task and model)."""
    if not isinstance(data, dict):
        raise ConfigError(f"space {name}: top level must be a mapping")
    try:
        space = SweepSpace.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"space {name}: {_validation_message(e, data)}") from None
    if space.base_config is not None:
        path = Path(space.base_config)
        path = path if path.is_absolute() or root is None else root / path
        try:
            base = load_config(path).model_dump(mode="json")
        except ConfigError as e:
            raise ConfigError(f"space {name}: base_config: {e}") from None
        space = space.model_copy(update={"base": deep_merge(base, space.base), "base_config": None})
    for field, make in (("sampler", space.make_sampler), ("pruner", space.make_pruner)):
        try:
            make()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"space {name}: {field}_options: {e}") from None
    try:
        check_buildable(build_config(space.base))
    except ValueError as e:
        raise ConfigError(f"space {name}: base: {e}") from None

    seen: list[str] = []
    for path, param in space.params.items():
        entry = f"space {name}: params[{path!r}]"
        try:
            param.distribution()
        except ValueError as e:
            raise ConfigError(f"{entry}: {e}") from None
        for other, want in param.condition.items():
            if other not in seen:
                raise ConfigError(f"{entry}: condition on {other!r}, not an earlier parameter")
            choices = space.params[other]
            if not isinstance(choices, CategoricalParam):
                raise ConfigError(f"{entry}: condition on {other!r}, which is not categorical")
            if want == []:
                raise ConfigError(f"{entry}: condition on {other!r} allows no value (empty list)")
            for value in want if isinstance(want, list) else [want]:
                if value not in list(choices.choices):  # == rather than hashing
                    raise ConfigError(f"{entry}: condition {other}={value!r} is not a choice")
        seen.append(path)
        try:
            conditions = _condition_values(space, path)
        except ValueError as e:
            raise ConfigError(f"{entry}: {e}") from None
        for value in param.samples():
            values = {**conditions, path: value}
            try:
                space.config_for(values)
            except ValueError as e:  # ConfigError included
                raise ConfigError(f"{entry} = {value!r}: {e}") from None
    for field in ("sampler", "pruner"):
        if not getattr(space, f"{field}_options"):  # the defaults need no trying (0.3 s)
            continue
        try:
            _dry_run(space, field)
        except Exception as e:  # whatever an option the constructor took fails with later
            raise ConfigError(f"space {name}: {field}_options: {type(e).__name__}: {e}") from None
    return space


def _dry_run(space: SweepSpace, field: str) -> None:
    """Run the space's sampler (field "sampler") or pruner ("pruner") on fake trials in memory,
    past their start-up trials. Their constructors keep options they only use later (TPE's
    gamma once n_startup_trials have finished, Hyperband's reduction_factor at the first
    report): unchecked, such an option failed a study after its start-up trials had trained,
    with the bad space already stored in it."""
    options = space.sampler_options if field == "sampler" else space.pruner_options
    startup = options.get("n_startup_trials", 10 if field == "sampler" else 5)
    sampler = space.make_sampler() if field == "sampler" else optuna.samplers.RandomSampler(0)
    pruner = space.make_pruner() if field == "pruner" else optuna.pruners.NopPruner()

    def objective(trial: optuna.Trial) -> float:
        space.suggest(trial)
        fake = (trial.number * 0.618) % 1  # distinct values, so medians and ranks are defined
        for step in range(1, 4):
            trial.report(fake * step / 3, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return fake

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # no trial lines, failures raise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. TPE's experimental-option warnings
            study = optuna.create_study(direction=space.direction, sampler=sampler, pruner=pruner)
            # Past the start-up trials, but never past the study's own length: a start-up
            # count of 1e6 (random search, or never prune) ran a million fake trials.
            study.optimize(objective, n_trials=min(int(startup), space.trials) + 2)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _condition_values(space: SweepSpace, path: str) -> dict[str, Any]:
    """Values of the earlier parameters that make `path` active: for each parameter its
    conditions name, followed up the chain, the first value that every condition on it
    allows. ValueError when none does: conditions that can never all hold (`path` would
    never be sampled)."""
    allowed: dict[str, list] = {}

    def collect(p: str) -> None:
        for other, want in space.params[p].condition.items():
            wants = want if isinstance(want, list) else [want]
            both = [v for v in allowed.get(other, wants) if _matches(v, wants)]
            if not both:
                raise ValueError(
                    f"its conditions can never all hold: {other} must be in "
                    f"{allowed[other]!r} and in {wants!r}, so it is never sampled"
                )
            allowed[other] = both
            collect(other)

    collect(path)
    return {other: values[0] for other, values in allowed.items()}


def load_space(path: str | Path) -> SweepSpace:
    """Read and validate a space YAML file; errors are one-line ConfigErrors."""
    path = Path(path)
    return parse_space(read_yaml(path, "space file"), path.name, path.parent)
