"""Typed run configuration: pydantic models that reject unknown keys, loaded from YAML.

A config is ``RunConfig(task=..., model=..., train=...)``. Overrides are ``a.b=value``
strings whose value is parsed as YAML (``train.lr=3e-4``, ``model.mixer_params.head_dim=8``).
Every problem becomes a :class:`ConfigError` with one line naming the field.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.base import MAX_SIZE


class ConfigError(ValueError):
    """A bad config: the message is one line naming the field."""


# An AdamW beta: torch raises on others, but only once a run has started writing.
Beta = Annotated[float, Field(ge=0.0, lt=1.0, strict=True)]
# A pair of them, from a YAML list (strict mode would take only a Python tuple).
Betas = Annotated[tuple[Beta, Beta], Field(strict=False)]
# A seed torch.manual_seed (and numpy's SeedSequence) takes.
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]
# A size or count: >= 1, and at most MAX_SIZE (2^31 - 1): torch takes no larger one (a
# TypeError naming nothing, from deep inside).
Size = Annotated[int, Field(ge=1, le=MAX_SIZE)]
# torch CPU threads: 100000 crashed the process (a segfault in the OpenMP runtime at the
# first parallel op, after the run directory was made); no machine has more than this.
MAX_THREADS = 1024
Threads = Annotated[int, Field(ge=1, le=MAX_THREADS)]


class Strict(BaseModel):
    """Unknown keys and wrong types are errors: no true -> 1 or 8.0 -> 8 (an int is still a
    float), and no infinite values."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False
    )


S = TypeVar("S", bound=BaseModel)


class TaskConfig(Strict):
    name: str = "associative_recall"
    params: dict[str, Any] = Field(default_factory=dict)  # checked by tasks.build
    num_train: Size = 5000
    num_valid: Size = 500
    num_test: Size = 500


class ModelConfig(Strict):
    mixer: str = "h3"
    mixer_params: dict[str, Any] = Field(default_factory=dict)  # checked by layers.build
    d_model: Size = 64
    n_layers: Size = 2
    mlp_ratio: int = Field(4, ge=0)  # 0 drops the MLP
    # Learned absolute positions; None = only when some layer is attention (the paper's setup).
    pos_emb: bool | None = None
    # Layers (0-based) that use attention instead of `mixer`: hybrid models such as H3 + attention.
    attn_layers: list[int] = Field(default_factory=list)
    attn_params: dict[str, Any] = Field(default_factory=dict)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm_eps: float = Field(1e-5, gt=0.0)
    # "gpt2": the H3 release's init (every Linear and embedding N(0, 0.02), zero biases, residual
    # output projections scaled by 1/sqrt(2 n_layers)); "default" keeps the mixers' own inits.
    init: Literal["default", "gpt2"] = "default"

    @model_validator(mode="after")
    def _sections_used(self) -> ModelConfig:
        # A section no layer reads is never checked by layers.build: a typo there, or params
        # meant for the other section, must not pass silently. (sandbox.model: mixer_params
        # go to the layers of kind `mixer`, every layer when it is "attention"; attn_params
        # to the attn_layers of another mixer.)
        if self.mixer_params and self.mixer != "attention":
            if set(range(self.n_layers)) <= set(self.attn_layers):
                raise ValueError("model.mixer_params: set, but every layer is in attn_layers")
        if self.attn_params and self.mixer == "attention":
            raise ValueError(
                "model.attn_params: set, but with mixer attention every layer reads mixer_params"
            )
        if self.attn_params and not self.attn_layers:
            raise ValueError("model.attn_params: set, but model.attn_layers is empty")
        return self


class TrainConfig(Strict):
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    ssm_lr: float = Field(1e-3, gt=0.0)  # SSM dt/A/B get min(ssm_lr, lr) and no weight decay
    betas: Betas = (0.9, 0.999)
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(400, ge=1)
    max_steps: int | None = Field(
        None, ge=1
    )  # a hard cap on optimizer steps (the schedule's length)
    warmup_frac: float = Field(0.1, ge=0.0, le=1.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_frac: float = Field(0.0, ge=0.0, le=1.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    loss_on: Literal["all", "answers"] = "all"
    eval_every: int | None = Field(None, ge=1)  # steps between validations; None = once per epoch
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0)  # early stop on validation accuracy
    restore_best: bool = True  # test the weights of the best validation accuracy, not the last
    eval_batch_size: int = Field(500, ge=1)


class RunConfig(Strict):
    seed: Seed = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # torch CPU threads; None leaves torch's default
    threads: Threads | None = None
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"config field {field!r}: unknown key"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if first["type"] == "value_error":  # a validator's own message, which names its fields
        return f"config: {first['ctx']['error']}{more}"
    return f"config field {field!r}: {first['msg']}{more}"


def deep_merge(base: dict, extra: dict) -> dict:
    """A new dict: ``base`` with ``extra`` on top, nested dicts merged key by key, except that
    an empty mapping replaces its section (``mixer_params: {}`` clears a base's head_dim: merged,
    nothing could ever drop a key of a free-form section). It shares nothing with either (an
    override written into it must not reach a preset's base)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(data: dict, override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML. A mapping value is
    merged into a section already there (``train={lr: 0.1}`` sets train.lr, as a preset's
    variant merges into its base): put in its place, it dropped the section's other fields.
    An empty one clears the section (``model.mixer_params={}``), as in deep_merge."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key")
    try:
        value = load_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e})") from None
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    last = parts[-1]
    if isinstance(value, dict) and value and isinstance(node.get(last), dict):
        value = deep_merge(node[last], value)
    node[last] = value


def validate(schema: type[S], data: dict | None = None, overrides: list[str] = ()) -> S:
    """Validate a nested dict (plus overrides) into ``schema``, or raise ConfigError."""
    data = copy.deepcopy(data or {})  # overrides must not write into the caller's dicts
    for override in overrides:
        apply_override(data, override)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def build_config(data: dict | None = None, overrides: list[str] = ()) -> RunConfig:
    """Validate a nested dict (plus overrides) into a RunConfig, or raise ConfigError."""
    return validate(RunConfig, data, overrides)


class _Loader(yaml.SafeLoader):
    """safe_load with YAML 1.2's numbers (the core schema): PyYAML follows YAML 1.1, where
    1e-4 (no dot) is a string, 010 is octal 8 and 1:30 is base-60 90. Typed fields would
    convert such text or take the surprise number, and the free-form sections
    (model.mixer_params, task.params) would hand it to the layer or task as it came. A key
    given twice in one mapping is an error: PyYAML keeps the last one without a word."""

    def construct_mapping(self, node, deep=False):
        seen = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may repeat
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.append(key)
        return super().construct_mapping(node, deep)


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {  # YAML 1.1's number rules out, 1.2's in below
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)


def _construct_int(loader: yaml.SafeLoader, node) -> int:
    """A YAML 1.2 integer: decimal (a leading 0 too), 0o octal or 0x hexadecimal."""
    text = loader.construct_scalar(node)
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    return int(text[2:] if base != 10 else text, base)


_Loader.add_constructor(_INT, _construct_int)


class _Dumper(yaml.SafeDumper):
    """safe_dump that quotes a string _Loader would read as something else ("1e5", "010"):
    PyYAML decides quoting by its own YAML 1.1 rules, and wrote "1e5" plain, read back as
    the number 100000.0."""


_Dumper.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers


def load_yaml(text: str) -> Any:
    """Parse YAML text as safe_load does, but with YAML 1.2 numbers (see _Loader)."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary Python objects
    except yaml.YAMLError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        # An explicit tag PyYAML cannot build (!!bool maybe, !!timestamp x, !!float with no
        # value) raises a plain exception: made a YAMLError, every caller names its source.
        raise yaml.constructor.ConstructorError(
            None, None, f"a tagged value cannot be built ({type(e).__name__}: {e})"
        ) from None


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML file's top-level mapping (load_yaml), or ConfigError naming ``what`` and the
    path."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} not found") from None
    except OSError as e:  # a directory, no permission, ...
        raise ConfigError(f"{what} {str(path)!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:  # its own message names the byte, not the file
        raise ConfigError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
            f"offset {e.start})"
        ) from None
    except yaml.YAMLError as e:
        line = str(e).replace("\n", " ")
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {line}") from None
    # No document at all (an empty file, or only comments) is almost surely a mistake, such as
    # a config written by a failed step: taken as {} it would run every default for hours.
    # An explicit {} still means "all defaults".
    if data is None:
        raise ConfigError(f"{what} {str(path)!r} is empty (no settings, only blanks or comments)")
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r}: top level must be a mapping")
    return data


# `sandbox compare` presets. Here, not in sandbox.compare, so that the CLI lists them in its
# help without importing torch.
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "compare"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file (safe_load) into a RunConfig."""
    return build_config(read_yaml(path), overrides)


def dump_config(config: BaseModel) -> str:
    """The fully resolved config as YAML (round-trips through load_config)."""
    return yaml.dump(config.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False)
