"""No-recall baselines: guesses that read a sequence's statistics but never match the query
to a key. ``Task.random_accuracy`` is the best guess blind to the context; on some tasks these
do far better (AR's four values collide, MQAR's answers are the context's values), and a mixer
above chance but not above them has not shown recall.

A guess gives a set of candidate tokens per scored position; its accuracy is the expected one
of a uniform pick among them (ties split evenly). ``python3 -m tasks.baselines`` prints the
table of docs/grids.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from tasks.base import COPY, NUM_SPECIAL, Batch, Task, build

# (task, inputs of one sequence, its scored positions in order) -> the candidate tokens at
# each scored position. One call per sequence, so that a guess reading the prefix keeps
# running counts: per position, AR at length 1024 cost time quadratic in the length.
Guess = Callable[[Task, list[int], list[int]], list[set[int]]]


def _value_range(task: Task) -> range:
    """The value tokens of associative_recall, noisy_recall and fuzzy_recall."""
    if task.name == "noisy_recall":
        return range(task.first_value, task.first_noise)
    if task.name == "fuzzy_recall":
        return range(task.first_value, task.vocab_size)
    return range(NUM_SPECIAL + task.num_keys, task.vocab_size)


def _most_common(counts: Counter) -> set[int]:
    """The tokens of the highest count in ``counts``."""
    top = max(counts.values())
    return {t for t, c in counts.items() if c == top}


def most_frequent_value(task: Task, x: list[int], scored: list[int]) -> list[set[int]]:
    """The value tokens seen most often up to each scored position (all of them before any
    is seen)."""
    values = _value_range(task)
    counts: Counter = Counter()
    out, seen = [], 0
    for j in scored:
        counts.update(t for t in x[seen : j + 1] if t in values)
        seen = j + 1
        out.append(_most_common(counts) if counts else set(values))
    return out


def context_value(task: Task, x: list[int], scored: list[int]) -> list[set[int]]:
    """MQAR: any value of the key-value block (keys at even positions, values at odd)."""
    return [set(x[1 : 2 * task.num_kv_pairs : 2])] * len(scored)


def pair_value(task: Task, x: list[int], scored: list[int]) -> list[set[int]]:
    """fuzzy_recall: any value token of the key-value pairs before the queries. Key and value
    tokens are disjoint ranges, so the sequence after its padding is alternating runs of
    each, key first: the pairs' values are value runs 1, 3, ... 2P - 1 (counting from 0)."""
    values = _value_range(task)
    runs: list[list[int]] = []
    for t in x:
        if t < NUM_SPECIAL:
            continue  # the leading padding
        if runs and (t in values) == (runs[-1][0] in values):
            runs[-1].append(t)
        else:
            runs.append([t])
    return [{t for run in runs[1 : 2 * task.num_kv_pairs : 2] for t in run}] * len(scored)


def uncopied_token(task: Task, x: list[int], scored: list[int]) -> list[set[int]]:
    """selective_copying: the data tokens of the context seen most often, less those copied
    already. The order of the data tokens is the one thing it ignores: the next one is a
    uniform draw from the ones not copied yet, so this is the best order-blind guess."""
    copy_at = x.index(COPY)
    left = Counter(t for t in x[:copy_at] if t >= NUM_SPECIAL)
    out, seen = [], copy_at + 1
    for j in scored:
        left.subtract(x[seen : j + 1])
        seen = j + 1
        out.append(_most_common(left))
    return out


GUESSES: dict[str, dict[str, Guess]] = {
    "associative_recall": {"most frequent value so far": most_frequent_value},
    "noisy_recall": {"most frequent value so far": most_frequent_value},
    "fuzzy_recall": {
        "most frequent value token so far": most_frequent_value,
        "any value token of the pairs": pair_value,
    },
    "selective_copying": {"most frequent data token not copied yet": uncopied_token},
    "mqar": {"any context value": context_value},
}


def guess_accuracy(task: Task, batch: Batch, guess: Guess) -> float:
    """Expected accuracy of ``guess`` over the scored positions of ``batch``."""
    hits = total = 0.0
    for x, y, m in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.answer_mask.tolist()):
        scored = [j for j, on in enumerate(m) if on]
        for j, candidates in zip(scored, guess(task, x, scored), strict=True):
            hits += (y[j] in candidates) / len(candidates)
            total += 1
    return hits / total


def no_recall_accuracy(task: Task, num_examples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Each no-recall guess of the task (none for most tasks) -> its accuracy on a generated
    batch of ``num_examples``."""
    guesses = GUESSES.get(task.name, {})
    if not guesses:
        return {}
    batch = task.generate(num_examples, seed)
    return {name: guess_accuracy(task, batch, guess) for name, guess in guesses.items()}


# The settings of the tables in README.md and docs/grids.md.
SETTINGS = [
    ("associative_recall", {"vocab_size": 10, "seq_len": 22}),
    ("noisy_recall", {"vocab_size": 32, "seq_len": 64, "num_kv_pairs": 4}),
    ("fuzzy_recall", {"vocab_size": 32, "seq_len": 64, "num_kv_pairs": 4, "key_len": 3}),
    ("selective_copying", {"vocab_size": 16, "seq_len": 64, "num_tokens_to_copy": 8}),
    ("mqar", {"vocab_size": 256, "seq_len": 64, "num_kv_pairs": 4}),
    ("mqar", {"vocab_size": 256, "seq_len": 128, "num_kv_pairs": 8}),
    ("mqar", {"vocab_size": 256, "seq_len": 256, "num_kv_pairs": 16}),
]


def main() -> None:
    print("| task | setting | chance | no-recall guess | its accuracy |\n|---|---|---|---|---|")
    for name, params in SETTINGS:
        task = build(name, **params)
        setting = ", ".join(f"{k} {v}" for k, v in params.items())
        for guess, accuracy in no_recall_accuracy(task).items():
            print(f"| {name} | {setting} | {task.random_accuracy:.1%} | {guess} | {accuracy:.1%} |")


if __name__ == "__main__":
    main()
