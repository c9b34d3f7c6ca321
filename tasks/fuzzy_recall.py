"""Fuzzy associative recall (MAD): keys and values are runs of several tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .base import NOOP, NUM_SPECIAL, Batch, Task, check_int, register
from .sampling import scatter_valid, uniform


def prefix_clashes(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """bool [r, p]: keys that are a prefix of (or equal to) another key of their row.

    tokens [r, p, k] (ids > NOOP), lengths [r, p]. Sorted lexicographically with "ended"
    below every token, a key that is a prefix of any other is a prefix of its successor
    (everything sorted between a key and its extension extends it too), so comparing
    neighbours finds them all. Of two equal keys, the one sorted first is reported.
    """
    r, p, k = tokens.shape
    digits = torch.where(torch.arange(k) < lengths[..., None], tokens, NOOP)
    order = torch.arange(p).expand(r, p)
    for t in reversed(range(k)):  # least significant digit first; stable sorts keep ties
        column = digits[..., t].gather(1, order)
        order = order.gather(1, column.sort(dim=1, stable=True).indices)
    ordered = digits.gather(1, repeat(order, "r p -> r p k", k=k))
    head, tail = ordered[:, :-1], ordered[:, 1:]
    clash = torch.zeros(r, p, dtype=torch.bool)
    clash[:, :-1] = ((head == tail) | (head == NOOP)).all(-1)
    return torch.empty_like(clash).scatter_(1, order, clash)


@register("fuzzy_recall")
class FuzzyRecall(Task):
    """Multi-token key/value pairs, then every key queried once, followed by its value.

    Vocabulary: ordinary ids split into key tokens (the first half) and value tokens (the
    rest), so the key/value boundary is visible. Per example, num_kv_pairs keys of
    1 .. max_key_len tokens and values of 1 .. max_value_len tokens (lengths and tokens
    uniform). Keys are prefix-free within an example -- no key equals or begins another --
    so a query is complete exactly when its last token arrives: a clashing key (the
    shorter one) is redrawn, lengths included, until none clashes, which makes short keys
    somewhat rarer than 1 / max_key_len.

    Sequence S (length seq_len + 1; K_i, V_i the token runs of pair i):
        "." padding | K_1 V_1 ... K_P V_P | K_q1 V_q1 ... K_qP V_qP
    with q a uniform permutation (each key queried once) and leading no-ops filling up to
    seq_len + 1 tokens. Scored positions: the inputs whose targets are the value tokens
    of a query, i.e. a query's last key token and all but the last of its value tokens.

    key_len: None draws each key's length uniformly from 1 .. max_key_len (training);
    an integer fixes every key's length. Held-out prompts use the longest keys:
    ``task.longest_keys()`` is this task with key_len = max_key_len, e.g.
    ``make_splits(task.longest_keys(), 0, 0, num_test)`` for a longest-key test split
    (its seed stream differs from training's, as in every split).
    """

    def __init__(
        self,
        vocab_size: int = 32,
        seq_len: int = 128,
        num_kv_pairs: int = 8,
        max_key_len: int = 3,
        max_value_len: int = 3,
        key_len: int | None = None,
    ):
        name = self.name
        self.num_kv_pairs = check_int(name, "num_kv_pairs", num_kv_pairs, 1)
        self.max_key_len = check_int(name, "max_key_len", max_key_len, 1)
        self.max_value_len = check_int(name, "max_value_len", max_value_len, 1)
        self.key_len = key_len
        if key_len is not None:
            why = "key lengths run 1 .. max_key_len; None draws them at random"
            self.key_len = check_int(name, "key_len", key_len, 1, why, self.max_key_len)
        pairs = self.num_kv_pairs
        why_vocab = f"2 special tokens, >= {pairs} key tokens and >= 2 value tokens"
        min_vocab = NUM_SPECIAL + max(2 * pairs, 3)  # key tokens: half, rounded down
        self.vocab_size = check_int(name, "vocab_size", vocab_size, min_vocab, why_vocab)
        longest = 2 * pairs * (self._longest_key + self.max_value_len)
        why_len = f"{pairs} pairs and {pairs} queries at their longest: {longest} tokens"
        self.seq_len = check_int(name, "seq_len", seq_len, longest - 1, why_len)
        self.num_key_tokens = (self.vocab_size - NUM_SPECIAL) // 2
        self.first_value = NUM_SPECIAL + self.num_key_tokens
        self.num_values = self.vocab_size - self.first_value

    @property
    def _longest_key(self) -> int:
        return self.max_key_len if self.key_len is None else self.key_len

    @property
    def random_accuracy(self) -> float:
        # Every scored target is a value token drawn uniformly and independently.
        return 1.0 / self.num_values

    def longest_keys(self) -> FuzzyRecall:
        """This task with every key max_key_len tokens long (the held-out prompts)."""
        return type(self)(**{**self.params, "key_len": self.max_key_len})

    def _keys(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix-free keys: tokens [n, P, longest key] and lengths [n, P]."""
        k, pairs = self._longest_key, self.num_kv_pairs

        def draw(*shape):
            tokens = torch.randint(self.num_key_tokens, (*shape, k), generator=generator)
            if self.key_len is None:
                lengths = torch.randint(1, k + 1, shape, generator=generator)
            else:
                lengths = torch.full(shape, k)
            return tokens + NUM_SPECIAL, lengths

        tokens, lengths = draw(n, pairs)
        clash = prefix_clashes(tokens, lengths)
        while clash.any():  # num_key_tokens >= P keeps a prefix-free set within reach
            tokens[clash], lengths[clash] = draw(int(clash.sum()))
            rows = clash.any(1)
            clash[rows] = prefix_clashes(tokens[rows], lengths[rows])
        # The redraws always replace the clashing key sorted first, which biases where short
        # keys sit (the earlier, the shorter: P(length 1) ran 0.228 to 0.257 over the 8
        # slots); a shuffle of each row's keys makes every slot alike.
        order = uniform(n, pairs, generator=generator).argsort(1)
        return tokens.gather(1, repeat(order, "n p -> n p k", k=k)), lengths.gather(1, order)

    def _sample(self, n: int, generator: torch.Generator) -> Batch:
        pairs, t = self.num_kv_pairs, self.seq_len
        width = max(self._longest_key, self.max_value_len)
        key_tokens, key_lengths = self._keys(n, generator)
        value_tokens = torch.randint(
            self.first_value, self.vocab_size, (n, pairs, self.max_value_len), generator=generator
        )
        value_lengths = torch.randint(1, self.max_value_len + 1, (n, pairs), generator=generator)

        # Pairs as [n, P, 2 (key, value), width] token runs; the queries are a permutation.
        tokens = torch.stack(
            [F.pad(run, (0, width - run.shape[-1])) for run in (key_tokens, value_tokens)], 2
        )
        lengths = torch.stack([key_lengths, value_lengths], 2)
        order = uniform(n, pairs, generator=generator).argsort(1)
        query_tokens = tokens.gather(1, repeat(order, "n p -> n p two w", two=2, w=width))
        query_lengths = lengths.gather(1, repeat(order, "n p -> n p two", two=2))

        # Flatten the runs in sequence order and pack their tokens to the right end of S.
        flat_tokens = rearrange([tokens, query_tokens], "part n p two w -> n (part p two w)")
        run_lengths = rearrange([lengths, query_lengths], "part n p two -> n (part p two)")
        real = rearrange(torch.arange(width) < run_lengths[..., None], "n r w -> n (r w)")
        start = t + 1 - run_lengths.sum(1, keepdim=True)
        position = start + real.cumsum(1) - 1

        sequences = torch.full((n, t + 2), NOOP)  # last column: scratch
        scatter_valid(sequences, position, flat_tokens, real)
        query_value = torch.zeros(2, pairs, 2, width, dtype=torch.bool)
        query_value[1, :, 1] = True
        scored = real & rearrange(query_value, "part p two w -> (part p two w)")
        answer_mask = torch.zeros(n, t + 1, dtype=torch.bool)  # last column: scratch
        scatter_valid(answer_mask, position - 1, True, scored)
        return Batch.from_sequences(sequences[:, : t + 1], answer_mask[:, :t])
