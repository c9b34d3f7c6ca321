"""Multi-query associative recall (MQAR, zoology): every key of the context is queried once."""

from __future__ import annotations

import torch
from einops import rearrange

from .base import NOOP, NUM_SPECIAL, Batch, Task, check_bool, check_float, check_int, register
from .sampling import distinct, uniform_excluding, weighted_order


@register("mqar")
class MultiQueryAssociativeRecall(Task):
    """Key/value pairs, then each key queried once; the answer to a query is its value.

    Vocabulary (zoology's split, shifted past our two special tokens): keys are the ids
    2 .. vocab_size // 2 - 1, values the ids vocab_size // 2 .. vocab_size - 1. Within a
    sequence the num_kv_pairs keys are distinct and so are their values.

    Sequence S (length seq_len + 1; P = num_kv_pairs, T = seq_len):
        k1 v1 k2 v2 ... kP vP | query region of T + 1 - 2P tokens
    The query region has (T - 2P) / 2 two-token slots; key j (the j-th context pair) is
    written to the first token of the j-th slot drawn. Slots are drawn without replacement
    with probability proportional to a * i**(a - 1) for slot i = 1, 2, ... (a = power_a; the
    default 0.01 clusters the queries next to the context, a = 1 is uniform). Every other
    query-region token is a filler: NOOP, or with random_non_queries a uniform ordinary
    token other than this sequence's keys (zoology draws fillers from the whole vocabulary,
    so there a filler can look like an unscored query; here a key occurs exactly twice).

    As in zoology, a query's answer is its target only: the input after a query key is the
    filler of its slot, never the value. (Fed back, as every next token is in the other
    tasks, the answers shown so far would narrow the next ones down to the values not yet
    given: a guess that never matches keys would score 52% at 4 pairs.) The targets are
    still every next input elsewhere, and at a query the value.

    Scored positions: the num_kv_pairs query keys, whose target is the key's value.

    Zoology also asks for vocab_size > seq_len; nothing here depends on it (keys never occur
    as fillers), so it is not required: the CPU-sized presets use vocab 256 at seq_len 256.
    """

    layout = 2  # 2: answers no longer fed back as inputs

    def __init__(
        self,
        vocab_size: int = 8192,
        seq_len: int = 64,
        num_kv_pairs: int = 4,
        power_a: float = 0.01,
        random_non_queries: bool = True,
    ):
        name = self.name
        self.num_kv_pairs = check_int(name, "num_kv_pairs", num_kv_pairs, 1)
        pairs = self.num_kv_pairs
        why_vocab = f"2 special tokens, then {pairs} distinct keys below vocab_size // 2"
        self.vocab_size = check_int(name, "vocab_size", vocab_size, 2 * pairs + 4, why_vocab)
        why_len = f"{2 * pairs} context tokens and a two-token query slot per key"
        self.seq_len = check_int(name, "seq_len", seq_len, 4 * pairs, why_len)
        if self.seq_len % 2:
            raise ValueError(f"{name}: seq_len must be even (two-token query slots), got {seq_len}")
        # Bounded so that the float32 log weights below stay finite (past ~1e2 the slots come
        # in order anyway); unbounded, 1e40 made them inf and the draw arbitrary.
        self.power_a = check_float(name, "power_a", power_a, 0.0, 1e6, low_open=True)
        self.random_non_queries = check_bool(name, "random_non_queries", random_non_queries)
        self.first_value = self.vocab_size // 2
        self.num_keys = self.first_value - NUM_SPECIAL
        self.num_values = self.vocab_size - self.first_value
        num_slots = (self.seq_len - 2 * pairs) // 2
        slot = torch.arange(1, num_slots + 1, dtype=torch.float64)
        # log of a * i**(a - 1) without the factor a, which cancels in the normalisation.
        self.slot_log_weights = ((self.power_a - 1.0) * slot.log()).float()

    @property
    def random_accuracy(self) -> float:
        # Each answer is marginally uniform over the values.
        return 1.0 / self.num_values

    def _sample(self, n: int, generator: torch.Generator) -> Batch:
        pairs, context = self.num_kv_pairs, 2 * self.num_kv_pairs
        keys = distinct(n, pairs, self.num_keys, generator) + NUM_SPECIAL
        values = distinct(n, pairs, self.num_values, generator) + self.first_value

        region = self.seq_len + 1 - context
        if self.random_non_queries:
            ordinary = self.vocab_size - NUM_SPECIAL
            fillers = uniform_excluding(region, ordinary, keys - NUM_SPECIAL, generator)
            fillers += NUM_SPECIAL
        else:
            fillers = torch.full((n, region), NOOP)
        slots = weighted_order(self.slot_log_weights, n, pairs, generator)
        query_at = context + 2 * slots  # position of key j's query in S

        shown = torch.cat([rearrange([keys, values], "two n p -> n (p two)"), fillers], 1)
        shown.scatter_(1, query_at, keys)
        answered = shown.scatter(1, query_at + 1, values)  # S with the answers in place
        answer_mask = torch.zeros(n, self.seq_len, dtype=torch.bool)
        answer_mask.scatter_(1, query_at, True)
        return Batch(shown[:, :-1].contiguous(), answered[:, 1:].contiguous(), answer_mask)
