"""Optuna sweeps over layer variants and hyper-parameters: a sweep is a YAML search space.

    space = sweeps.load_space("sweeps/smoke.yaml")      # validated; errors name the entry
    study, out = sweeps.run_sweep("sweeps/smoke.yaml", n_trials=8, jobs=2, out="runs/sweeps/smoke")
    sweeps.write_report(study, out)   # trials.csv, best_config.yaml, figures (run_sweep did too)

See sweeps/space.py for the YAML schema and sweeps/runner.py for how workers share a study.
"""

from sweeps.report import load_sweep_study, write_report
from sweeps.runner import run_sweep
from sweeps.space import SweepSpace, load_space

__all__ = ["SweepSpace", "load_space", "load_sweep_study", "run_sweep", "write_report"]
