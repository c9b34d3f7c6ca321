"""The mixer contract, the registry behind ``layers.build``, SSM-parameter flags and the
argument checks every mixer shares.

A mixer maps x [B, L, D] -> y [B, L, D] causally (``forward``) and also runs one position at
a time (``init_state`` / ``step``), the two agreeing position by position; ``prefill`` runs
the parallel pass and also returns the state after its last position, so that generation
reads a prompt in parallel and then steps. A recurrent state is a dict of tensors; ``step``
returns a new dict and never modifies the one it was given, so a caller may keep old states
(beam search, rollback).
"""

from __future__ import annotations

import inspect
import numbers
import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

State = dict[str, torch.Tensor]


class Mixer(nn.Module, ABC):
    """Base class of a sequence mixer; subclasses are registered with :func:`register`.

    A subclass takes its parameters as keyword arguments of ``__init__`` (the signature is the
    list of parameters ``build`` accepts) and validates them with ``self._int`` and friends,
    so a bad value raises ValueError naming the mixer and the parameter. It implements
    ``forward``, ``step`` and ``_zero_state`` (the state ``init_state`` returns once it has
    checked the batch size), and may override ``prefill``.
    """

    name: ClassVar[str]

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = self._int("d_model", d_model)

    @classmethod
    def parameter_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] -> y [B, L, D]; y[:, t] depends on x[:, :t + 1] only."""

    def init_state(self, batch_size: int) -> State:
        """The state before the first position of ``batch_size`` sequences, on the mixer's
        device and dtype; a batch_size that is no integer >= 0 is a ValueError naming it."""
        return self._zero_state(self._int("batch_size", batch_size, 0))

    @abstractmethod
    def _zero_state(self, batch_size: int) -> State:
        """init_state's state, its batch_size checked."""

    @abstractmethod
    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """x_t [B, D] -> (y_t [B, D], next state); equals ``forward`` at that position."""

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        """x [B, L, D] -> (``forward(x)``, the state ``step`` reaches after x[:, L - 1]).

        Generation reads a prompt with it, then steps. Every shipped mixer computes the state
        in parallel; this fallback for a new mixer steps through x, L calls.
        """
        state = self.init_state(x.shape[0])
        for t in range(x.shape[1]):
            _, state = self.step(x[:, t], state)
        return self(x), state

    def _int(self, param: str, value, minimum: int = 1) -> int:
        return check_int(self.name, param, value, minimum)

    def _choice(self, param: str, value, choices: Sequence[str]) -> str:
        return check_choice(self.name, param, value, choices)

    def _bool(self, param: str, value) -> bool:
        return check_bool(self.name, param, value)

    def _divides(self, param: str, divisor: int, what: str) -> None:
        if self.d_model % divisor:
            raise ValueError(
                f"{self.name}: {param}={divisor} must divide d_model={self.d_model} ({what})"
            )


# ---------------------------------------------------------------------------------------------
# Registry


_REGISTRY: dict[str, type[Mixer]] = {}


def register(name: str):
    """Class decorator that registers a Mixer subclass under ``name``."""

    def decorator(cls: type[Mixer]) -> type[Mixer]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"mixer name {name!r} is already registered to {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def names() -> list[str]:
    """Sorted names of the registered mixers."""
    return sorted(_REGISTRY)


def build(name: str, /, **params) -> Mixer:
    """Construct the mixer registered as ``name``; unknown or invalid params raise ValueError
    (``name`` is positional-only, so a parameter called "name" is one of them)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {names()}")
    cls = _REGISTRY[name]
    expected = cls.parameter_names()
    for param in params:
        if param not in expected:
            raise ValueError(f"{name}: unknown parameter {param!r}; expected one of {expected}")
    for param, spec in inspect.signature(cls).parameters.items():
        if spec.default is inspect.Parameter.empty and param not in params:  # was a TypeError
            raise ValueError(f"{name}: missing parameter {param!r}")
    return cls(**params)


# ---------------------------------------------------------------------------------------------
# SSM parameters: the optimizer gives them lr min(1e-3, lr) and no weight decay (S4/H3 recipe).
# The flag is the parameter's name, kept on the module that owns it, not an attribute of the
# Parameter object: copy.deepcopy and FSDP's sharding make new Parameters (which lost such an
# attribute, so a deep-copied model was decayed like weight matrices), but both keep a module's
# attributes and register the new Parameters under the same names.


def mark_ssm(module: nn.Module, *names: str) -> None:
    """Flag the parameters ``module.<name>`` as SSM parameters (dt, A, B of an SSM kernel)."""
    for name in names:
        if not isinstance(getattr(module, name, None), nn.Parameter):
            raise ValueError(f"mark_ssm: {type(module).__name__} has no parameter {name!r}")
    module._ssm_names = (*getattr(module, "_ssm_names", ()), *names)


def ssm_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The flagged parameters of ``module`` and its submodules, in ``module.parameters()``
    order (each once, also where a wrapper such as DDP holds the model)."""
    flagged = {
        id(getattr(m, name)) for m in module.modules() for name in getattr(m, "_ssm_names", ())
    }
    return [p for p in module.parameters() if id(p) in flagged]


def factory_kwargs(module: nn.Module) -> dict:
    """device and dtype of the module's parameters, for tensors it creates (states)."""
    p = next(module.parameters())
    return {"device": p.device, "dtype": p.dtype}


# ---------------------------------------------------------------------------------------------
# Argument checks (also used by the SSM submodules, which are not mixers).


def check_int(owner: str, param: str, value, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
    # bool is an int subclass, but True is never a meant size.
    if isinstance(value, bool):
        raise ValueError(f"{owner}: {param} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{owner}: {param} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{owner}: {param} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{owner}: {param} must be <= {maximum}, got {value}")
    return value


def check_float(owner: str, param: str, value, low: float, high: float) -> float:
    """A real number in [low, high)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}: {param} must be a number, got {value!r}")
    if not low <= value < high:  # also rejects NaN
        raise ValueError(f"{owner}: {param} must be in [{low}, {high}), got {value}")
    return float(value)


def check_bool(owner: str, param: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {param} must be true or false, got {value!r}")
    return value


def check_choice(owner: str, param: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: {param} must be one of {list(choices)}, got {value!r}")
    return value
