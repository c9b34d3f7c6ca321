"""Shared machinery for synthetic tasks: the Batch container, the Task base class,
the registry behind ``tasks.build`` and the hold-out split helper.

Sequence convention: a task samples full token sequences S of shape [N, T + 1]
(T = seq_len); the model sees ``inputs = S[:, :-1]`` and is trained to predict
``targets = S[:, 1:]`` (every next token, the paper protocol); ``answer_mask``
marks the positions that are scored. MQAR is the one exception: as in zoology, a query's
target is its answer while the next input is a filler, so the answers are never inputs.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import numbers
import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

NOOP = 0  # "." filler token
COPY = 1  # "=>" copy / query prefix
NUM_SPECIAL = 2  # ordinary tokens are ids NUM_SPECIAL .. vocab_size - 1
MAX_SIZE = 2**31 - 1  # the largest integer parameter (sizes, counts) check_int takes
IGNORE_INDEX = -100  # target value for positions without a label (torch cross_entropy default)


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous; compare fields explicitly
class Batch:
    """A batch of examples.

    inputs:      int64 [N, T] token ids.
    targets:     int64 [N, T] next-token labels: the next input, except at MQAR's queries
                 (their answer, which the next input does not show). Every position has one;
                 tasks never emit IGNORE_INDEX, the loss applies it where answer_mask is
                 False if asked to.
    answer_mask: bool  [N, T] positions that are scored.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    answer_mask: torch.Tensor

    def __post_init__(self):
        shape = self.inputs.shape
        if len(shape) != 2 or self.targets.shape != shape or self.answer_mask.shape != shape:
            raise ValueError(
                "Batch: inputs, targets and answer_mask must share one [N, T] shape, got "
                f"{tuple(shape)}, {tuple(self.targets.shape)}, {tuple(self.answer_mask.shape)}"
            )

    @classmethod
    def from_sequences(cls, sequences: torch.Tensor, answer_mask: torch.Tensor) -> Batch:
        """Split full sequences [N, T + 1] into inputs/targets [N, T]; answer_mask is [N, T]."""
        # Own copies, so editing inputs in place can never change targets (clone, not
        # contiguous(): with N = 1 both slices count as contiguous and would stay views).
        return cls(sequences[:, :-1].clone(), sequences[:, 1:].clone(), answer_mask)

    @classmethod
    def cat(cls, batches: list[Batch]) -> Batch:
        """Concatenate batches of equal T along the example dimension."""
        lengths = sorted({b.inputs.shape[1] for b in batches})
        if len(lengths) > 1:
            raise ValueError(f"Batch.cat: batches must share one seq_len, got {lengths}")
        return cls(
            torch.cat([b.inputs for b in batches]),
            torch.cat([b.targets for b in batches]),
            torch.cat([b.answer_mask for b in batches]),
        )

    def to(self, device: torch.device | str) -> Batch:
        """The same examples on ``device``."""
        return Batch(self.inputs.to(device), self.targets.to(device), self.answer_mask.to(device))

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, idx) -> Batch:
        """Sub-batch by a slice, an index or bool tensor, or an integer (a Python, numpy or 0-d
        torch one: a one-example Batch)."""
        # A bool is an Integral, so batch[True] would silently mean example 1.
        if isinstance(idx, bool) or (
            isinstance(idx, torch.Tensor) and idx.dtype == torch.bool and idx.ndim == 0
        ):
            raise TypeError("Batch index: a single bool is not an index; use a bool tensor [N]")
        if isinstance(idx, numbers.Integral) or (isinstance(idx, torch.Tensor) and idx.ndim == 0):
            idx = torch.tensor([int(idx)])  # keep the [N, T] rank so a Batch is always 2-D
        return Batch(self.inputs[idx], self.targets[idx], self.answer_mask[idx])


def final_answer_mask(num_examples: int, seq_len: int) -> torch.Tensor:
    """bool [N, T] that scores only the last input position (the answer after the final "=>")."""
    mask = torch.zeros(num_examples, seq_len, dtype=torch.bool)
    mask[:, -1] = True
    return mask


class Task(ABC):
    """Base class of a synthetic task.

    A subclass takes its parameters as keyword arguments of ``__init__`` (validated there;
    the signature is the list of accepted parameters), sets ``vocab_size`` and ``seq_len``,
    and implements ``_sample`` and ``random_accuracy``.
    """

    name: ClassVar[str]
    # Raised whenever a change to the generator changes the examples a (params, seed) pair
    # gives; a run directory records it, so results on other data are never mixed in.
    layout: ClassVar[int] = 1
    vocab_size: int  # total vocabulary including special tokens (what the model embeds)
    seq_len: int  # T, the number of input positions

    @classmethod
    def parameter_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @property
    def params(self) -> dict:
        """The task's parameters: ``build(task.name, **task.params)`` rebuilds it."""
        return {p: getattr(self, p) for p in self.parameter_names()}

    @property
    @abstractmethod
    def random_accuracy(self) -> float:
        """Accuracy of the best guess from the answers' marginal distribution alone, blind to
        the context: the most frequent answer's share (1 / n for answers uniform over n)."""

    def generate(self, num_examples: int, seed: int) -> Batch:
        """Sample ``num_examples`` examples; deterministic in (params, seed).

        Uses a private torch.Generator, so the global RNG is neither read nor advanced.
        """
        num_examples = check_int(self.name, "num_examples", num_examples, minimum=0)
        generator = torch.Generator().manual_seed(check_seed(self.name, "seed", seed))
        return self._sample(num_examples, generator)

    @abstractmethod
    def _sample(self, n: int, generator: torch.Generator) -> Batch:
        """Sample n examples, drawing only from ``generator``. Most tasks build the Batch with
        ``Batch.from_sequences`` (targets are the next inputs); a task whose answers are never
        fed back as inputs (MQAR) builds inputs and targets apart."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args})"


def check_int(
    owner: str,
    param: str,
    value,
    minimum: int | None = None,
    why: str = "",
    maximum: int | None = None,
) -> int:
    """Validate an integer parameter; ValueError names the parameter and the limit. Without a
    ``maximum``, 2^31 - 1: torch takes no larger size (a TypeError naming none)."""
    if isinstance(value, bool):  # bool is an int subclass, but True is never a meant size
        raise ValueError(f"{owner}: {param} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{owner}: {param} must be an integer, got {value!r}") from None
    reason = f" ({why})" if why else ""
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: {param} must be >= {minimum}{reason}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{owner}: {param} must be <= {maximum}{reason}, got {value}")
    if maximum is None and value > MAX_SIZE:
        raise ValueError(f"{owner}: {param} must be <= {MAX_SIZE}, got {value}")
    return value


def check_seed(owner: str, param: str, value) -> int:
    """Validate a generator seed: an integer in [0, 2**64 - 1], what torch.Generator takes."""
    return check_int(owner, param, value, minimum=0, maximum=2**64 - 1)


def check_float(
    owner: str, param: str, value, low: float, high: float, low_open: bool = False
) -> float:
    """Validate a real parameter in [low, high] (or (low, high] with low_open); an infinite
    high means any finite value. ValueError names the parameter and the interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}: {param} must be a real number, got {value!r}")
    close = "]" if math.isfinite(high) else ")"
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{close}"
    try:
        value = float(value)
    except OverflowError:  # an integer beyond any float (YAML reads long digit strings so)
        raise ValueError(
            f"{owner}: {param} must be in {interval}, got an integer beyond float range"
        ) from None
    above = value > low if low_open else value >= low
    below = value <= high if math.isfinite(high) else math.isfinite(value)
    if not (above and below):  # NaN fails both comparisons
        raise ValueError(f"{owner}: {param} must be in {interval}, got {value}")
    return value


def check_bool(owner: str, param: str, value) -> bool:
    """Validate a flag: only True or False (1, "yes" and friends are rejected, not guessed)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {param} must be a bool, got {value!r}")
    return value


_REGISTRY: dict[str, type[Task]] = {}


def register(name: str):
    """Class decorator that registers a Task subclass under ``name``."""

    def decorator(cls: type[Task]) -> type[Task]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"task name {name!r} is already registered to {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def names() -> list[str]:
    """Sorted names of the registered tasks."""
    return sorted(_REGISTRY)


def build(name: str, /, **params) -> Task:
    """Construct the task registered as ``name``; unknown or invalid params raise ValueError
    (``name`` is positional-only, so a parameter called "name" is one of them)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered tasks: {names()}")
    cls = _REGISTRY[name]
    expected = cls.parameter_names()
    for param in params:
        if param not in expected:
            raise ValueError(f"{name}: unknown parameter {param!r}; expected one of {expected}")
    return cls(**params)


@dataclass(frozen=True)
class Splits:
    train: Batch
    valid: Batch
    test: Batch


MAX_ROUNDS = 5  # top-up rounds before declaring the example space too small


def split_seed(seed: int, split: str, round_: int = 0) -> int:
    """A 64-bit generator seed derived from (seed, split, round) by hashing.

    Distinct splits and rounds get unrelated seeds, so their random streams never coincide
    (unlike seed + offset schemes, where train of seed 1 can equal valid of seed 0).
    """
    digest = hashlib.blake2b(f"{seed}/{split}/{round_}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _row_parts(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int64 [N, T] x 3: what identifies an example: its inputs, its scored targets (an
    unscored target, such as MQAR's random final filler, is not part of it: two examples that
    differ only there leak the same answers) and its answer mask."""
    scored = batch.targets.masked_fill(~batch.answer_mask, IGNORE_INDEX)
    return batch.inputs, scored, batch.answer_mask.long()


def _row_keys(batch: Batch) -> torch.Tensor:
    """int64 [N, 3T]: the identifying parts side by side, one row per example."""
    return torch.cat(_row_parts(batch), dim=1)


def _row_hashes(batch: Batch) -> torch.Tensor:
    """int64 [N]: a fixed random linear hash of each example's row key.

    Integer sums wrap mod 2**64 in any order, so equal rows always get equal hashes.
    Computed per tensor with matrix-vector products to avoid materialising the row keys.
    """
    generator = torch.Generator().manual_seed(0)
    weights = torch.randint(-(2**62), 2**62, (3, batch.inputs.shape[1]), generator=generator)
    return sum(part @ w for part, w in zip(_row_parts(batch), weights, strict=True))


def not_in(candidates: Batch, excluded: Batch) -> torch.Tensor:
    """bool [N]: examples of candidates that equal no example of excluded (inputs, scored
    targets and answer mask compared)."""
    if candidates.inputs.shape[1] != excluded.inputs.shape[1]:
        raise ValueError(
            f"not_in: candidates have seq_len {candidates.inputs.shape[1]}, excluded "
            f"{excluded.inputs.shape[1]}; examples of different lengths cannot be compared"
        )
    # Only hash matches can be duplicates; those few rows are compared exactly.
    cand_hash, excl_hash = _row_hashes(candidates), _row_hashes(excluded)
    suspect = torch.isin(cand_hash, excl_hash)
    rivals = _row_keys(excluded[torch.isin(excl_hash, cand_hash[suspect])])
    suspects = _row_keys(candidates[suspect])
    _, ids = torch.unique(torch.cat([rivals, suspects]), dim=0, return_inverse=True)
    keep = ~suspect
    keep[suspect] = ~torch.isin(ids[len(rivals) :], ids[: len(rivals)])
    return keep


def _held_out(task: Task, count: int, split: str, seed: int, excluded: Batch) -> Batch:
    """``count`` examples from the split's own seed stream, none equal to an excluded one."""
    kept: list[Batch] = []
    found = drawn = fresh_drawn = 0
    for round_ in range(MAX_ROUNDS):
        # Oversample 2x so a few collisions rarely cost a second round; grow 4x per round so
        # that spaces where most draws collide still fill up in a few rounds.
        need = count - found
        candidates = task.generate(2 * 4**round_ * need, split_seed(seed, split, round_))
        keep = not_in(candidates, excluded)
        drawn, fresh_drawn = drawn + len(candidates), fresh_drawn + int(keep.sum())
        kept.append(candidates[keep][:need])
        found += len(kept[-1])
        if found == count:
            return Batch.cat(kept)
        # Give up early when even an optimistic fresh rate (3 more fresh draws than seen,
        # about a 95% upper bound when none was) cannot fill the rest in the rounds left:
        # otherwise a hopeless request draws up to 682x count examples before failing.
        left = sum(2 * 4**r for r in range(round_ + 1, MAX_ROUNDS)) * (count - found)
        if (fresh_drawn + 3) / drawn * left < count - found:
            break
    raise ValueError(
        f"make_splits: found only {found} of num_{split}={count} {split} examples distinct "
        f"from the earlier splits in {drawn} draws; the example space of {task!r} is too "
        "small for these counts"
    )


def make_splits(task: Task, num_train: int, num_valid: int, num_test: int, seed: int = 0) -> Splits:
    """Train / valid / test batches from disjoint seed streams.

    No valid or test example equals a training example and none is shared between valid
    and test (inputs, scored targets and answer mask compared: see ``_row_parts``).
    Duplicates within one split are kept: they follow the task's own distribution and leak
    nothing.
    """
    counts = {"train": num_train, "valid": num_valid, "test": num_test}
    counts = {s: check_int("make_splits", f"num_{s}", n, minimum=0) for s, n in counts.items()}
    seed = check_seed("make_splits", "seed", seed)
    train = task.generate(counts["train"], split_seed(seed, "train"))
    valid = _held_out(task, counts["valid"], "valid", seed, excluded=train)
    test = _held_out(task, counts["test"], "test", seed, excluded=Batch.cat([train, valid]))
    return Splits(train, valid, test)
