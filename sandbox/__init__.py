"""h3-sandbox engine: configs, the language model, training and evaluation, the CLI.

The heavy names (they import torch) load on first use, so `sandbox --help`, data-preparation
workers and config validation start without importing torch.
"""

from importlib import import_module

from sandbox.config import ConfigError, RunConfig, build_config, load_config

_LAZY = {
    "LanguageModel": "sandbox.model",
    "evaluate": "sandbox.train",
    "train": "sandbox.train",
}

__all__ = ["ConfigError", "RunConfig", "build_config", "load_config", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
