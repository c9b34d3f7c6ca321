"""Typed pretraining configuration: data, the model (the synthetic runs' ``ModelConfig``, as is)
and the training recipe. Same rules as :mod:`sandbox.config`: unknown keys are errors,
``a.b=value`` overrides, one-line :class:`ConfigError` naming the field.

A YAML file may name a ``base: other.yaml`` (relative to itself): the file is merged on top of
its base key by key (nested sections merge, lists and scalars replace), so the size presets in
configs/pretrain/ share one recipe. A saved run's config.yaml is fully resolved (no base).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from sandbox.config import (
    Betas,
    ConfigError,
    ModelConfig,
    RunConfig,
    Seed,
    Size,
    Strict,
    Threads,
    TrainConfig,
    deep_merge,
    read_yaml,
    validate,
)
from sandbox.data.tokenizer import GPT2_EOT, ByteTokenizer

# Vocabulary of each tokenizer, known without building it (the GPT-2 one reads files).
TOKENIZER_VOCAB = {"gpt2": GPT2_EOT + 1, "bytes": ByteTokenizer.vocab_size}


class DataConfig(Strict):
    dir: str = "data/pile"  # a `sandbox prepare-data` output directory (relative to the cwd)
    tokenizer: Literal["gpt2", "bytes"] = "gpt2"  # must be the one the directory was made with
    seq_len: Size = 2048
    # The embedding gets a multiple of this many rows (GPT-2's 50257 -> 50264) for fast matmuls.
    pad_vocab_multiple: Size = 8


class PretrainTrainConfig(Strict):
    lr: float = Field(6e-4, gt=0.0)
    min_lr_frac: float = Field(0.1, ge=0.0, le=1.0)  # the cosine ends at min_lr_frac * lr
    warmup_frac: float = Field(0.01, ge=0.0, le=1.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0.0)
    betas: Betas = (0.9, 0.999)
    ssm_lr: float = Field(1e-3, gt=0.0)  # SSM dt/A/B get min(ssm_lr, lr) and no weight decay
    grad_clip: float | None = Field(1.0, gt=0.0)
    # Tokens per optimizer step over all processes: seq_len x micro_batch_size x gradient
    # accumulation x world size (the accumulation is derived, so it must divide exactly).
    global_batch_tokens: int = Field(256 * 2048, ge=1)
    micro_batch_size: int = Field(8, ge=1)  # sequences per forward pass per process
    # The run ends at whichever comes first; at least one must be set.
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    eval_every: int | None = Field(1000, ge=1)  # steps between validations; None = never
    eval_tokens: int = Field(2**20, ge=1)  # validation tokens per evaluation (fixed windows)
    checkpoint_every: int = Field(1000, ge=1)  # steps; a multiple of log_every
    log_every: int = Field(10, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on cuda only
    fsdp: bool = False  # shard parameters and optimizer state (FSDP2) instead of DDP
    peak_tflops: float | None = Field(None, gt=0.0)  # per device, for MFU; None: MFU not logged

    @model_validator(mode="after")
    def _check(self) -> PretrainTrainConfig:
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("set train.max_steps or train.max_tokens (or both)")
        # The train loss is logged as a mean over log_every steps; a checkpoint at a log step
        # carries no half-summed mean, so a resumed run logs exactly what an uninterrupted one does.
        if self.checkpoint_every % self.log_every:
            raise ValueError("train.checkpoint_every must be a multiple of train.log_every")
        return self


class PretrainConfig(Strict):
    seed: Seed = 0
    device: Literal["cpu", "cuda", "auto"] = "auto"
    # torch CPU threads; None leaves torch's default
    threads: Threads | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: PretrainTrainConfig = Field(default_factory=PretrainTrainConfig)

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.train.eval_every and self.train.eval_tokens < self.data.seq_len:
            raise ValueError(
                f"train.eval_tokens ({self.train.eval_tokens}) must be at least data.seq_len "
                f"({self.data.seq_len}): validation reads whole windows"
            )
        return self


def vocab_size(data: DataConfig) -> int:
    """The model's vocabulary: the tokenizer's, rounded up to data.pad_vocab_multiple."""
    m = data.pad_vocab_multiple
    return math.ceil(TOKENIZER_VOCAB[data.tokenizer] / m) * m


def total_steps(train: PretrainTrainConfig) -> int:
    """Optimizer steps of the run (the schedule's length)."""
    limits = [train.max_steps] if train.max_steps is not None else []
    if train.max_tokens is not None:
        limits.append(max(1, train.max_tokens // train.global_batch_tokens))
    return min(limits)


def read_with_base(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping with its ``base:`` chain merged underneath."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config file {str(path)!r}: base files form a cycle")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {str(path)!r}: base must be a file name")
    return deep_merge(read_with_base(path.parent / base, (*_seen, path)), data)


def load_pretrain_config(path: str | Path, overrides: list[str] = ()) -> PretrainConfig:
    """Read a pretraining YAML file (and its base files) into a PretrainConfig."""
    return validate(PretrainConfig, read_with_base(path), overrides)


def load_any_config(path: str | Path, overrides: list[str] = ()) -> PretrainConfig | RunConfig:
    """A pretraining config or a synthetic run config, read as `sandbox pretrain` or `sandbox
    train` would read it: a pretraining config is one with a ``data`` section, a ``base`` file
    (run configs have none) or a train key only pretraining has (``max_tokens``, ...). By the
    ``data`` key alone, such a config without one was refused, and a run config naming a base
    file passed where `sandbox train` refuses it. A run config has a ``task`` section or a
    train key only run configs have (``epochs``, ...); a file with neither kind of key is
    refused as ambiguous (it was counted as a run config, 25x off for a pretraining one)."""
    raw = read_yaml(path)
    train = set(raw["train"]) if isinstance(raw.get("train"), dict) else set()
    pretrain_keys, run_keys = set(PretrainTrainConfig.model_fields), set(TrainConfig.model_fields)
    if "data" in raw or "base" in raw or train & (pretrain_keys - run_keys):
        return validate(PretrainConfig, read_with_base(path), overrides)
    if "task" not in raw and not train & (run_keys - pretrain_keys):
        # Valid as either, with vocabularies 5000x apart (a task's against GPT-2's).
        raise ConfigError(
            f"config file {str(path)!r} reads as a run config and as a pretraining config: "
            "give it a task section (sandbox train) or a data section (sandbox pretrain)"
        )
    return validate(RunConfig, raw, overrides)
