"""Optuna sweeps over layer variants and hyper-parameters (see the sweeps issue)."""
