"""Synthetic-language tasks for comparing sequence mixers.

Usage::

    task = tasks.build("associative_recall", vocab_size=10, seq_len=22)
    batch = task.generate(num_examples=5000, seed=0)
    splits = tasks.make_splits(task, num_train=5000, num_valid=500, num_test=500, seed=0)

Registered: the H3 paper's associative_recall and induction_head; mqar (zoology);
selective_copying (Mamba); noisy_recall, fuzzy_recall, memorization, compression (MAD).
``tasks.baselines``: no-recall baselines, guesses that beat ``random_accuracy`` without
matching the query to a key (AR, noisy recall, MQAR).
"""

from .base import (
    COPY,
    IGNORE_INDEX,
    NOOP,
    NUM_SPECIAL,
    Batch,
    Splits,
    Task,
    build,
    make_splits,
    names,
    not_in,
    register,
)
from .copying import Compression, SelectiveCopying
from .fuzzy_recall import FuzzyRecall
from .induction import InductionHead
from .memorization import Memorization
from .mqar import MultiQueryAssociativeRecall
from .noisy_recall import NoisyRecall
from .recall import AssociativeRecall

__all__ = [
    "COPY",
    "IGNORE_INDEX",
    "NOOP",
    "NUM_SPECIAL",
    "AssociativeRecall",
    "Batch",
    "Compression",
    "FuzzyRecall",
    "InductionHead",
    "Memorization",
    "MultiQueryAssociativeRecall",
    "NoisyRecall",
    "SelectiveCopying",
    "Splits",
    "Task",
    "build",
    "make_splits",
    "names",
    "not_in",
    "register",
]
