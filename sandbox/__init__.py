"""h3-sandbox engine: configs, the language model, training and evaluation, the CLI."""

from sandbox.config import ConfigError, RunConfig, build_config, load_config
from sandbox.model import LanguageModel
from sandbox.train import evaluate, train

__all__ = [
    "ConfigError",
    "LanguageModel",
    "RunConfig",
    "build_config",
    "evaluate",
    "load_config",
    "train",
]
