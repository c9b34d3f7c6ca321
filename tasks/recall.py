"""Associative recall (H3 paper, Table 2): recall the value bound to a queried key."""

from __future__ import annotations

import torch
from einops import rearrange

from .base import COPY, NOOP, NUM_SPECIAL, Batch, Task, check_int, final_answer_mask, register
from .sampling import uniform_member


@register("associative_recall")
class AssociativeRecall(Task):
    """Key/value pairs, then "=>" and a key that occurred; the answer is its value.

    Ordinary tokens (ids 2..vocab_size-1) are split into keys (the first
    (vocab_size - 2) // 2 ids) and values (the rest: an odd count gives values the extra
    token). Each example draws a fresh key->value map, one uniform value per key; the pairs'
    keys are uniform, and the query is uniform over the distinct keys that occurred (Safari's
    generator for the paper, whose allow_dot=False redraws a query that did not occur). A
    query drawn pair by pair would favour the keys that repeat, which are also the ones whose
    value is seen most often: that raises a no-recall guess from ~50% to ~60% at Table 2.

    Sequence (length seq_len + 1), for the default seq_len 22:
        k1 v1 k2 v2 ... k10 v10 => q | v(q)
    inputs are the 22 tokens before "|", the target at the last input position is v(q). The
    paper's "seq_len 20" counts the 10 pairs; "=>" and q make the model's 22 inputs. An odd
    seq_len is padded with one leading no-op ".".
    """

    layout = 2  # 2: Safari's query law and 10 pairs by default

    def __init__(self, vocab_size: int = 10, seq_len: int = 22):
        why_vocab = "2 special tokens, >= 2 keys and >= 2 values"
        why_len = 'one key/value pair, "=>" and the query key'
        self.vocab_size = check_int(self.name, "vocab_size", vocab_size, NUM_SPECIAL + 4, why_vocab)
        self.seq_len = check_int(self.name, "seq_len", seq_len, 4, why_len)
        num_ordinary = self.vocab_size - NUM_SPECIAL
        self.num_keys = num_ordinary // 2
        self.num_values = num_ordinary - self.num_keys
        self.num_pairs = (self.seq_len - 2) // 2
        self.num_pad = self.seq_len % 2

    @property
    def random_accuracy(self) -> float:
        # The answer is uniform over the values: each key's value is drawn uniformly.
        return 1.0 / self.num_values

    def _sample(self, n: int, generator: torch.Generator) -> Batch:
        first_value = NUM_SPECIAL + self.num_keys
        # Values are drawn as offsets 0..num_values-1 and shifted into their id range at the end.
        value_of = torch.randint(self.num_values, (n, self.num_keys), generator=generator)
        keys = torch.randint(self.num_keys, (n, self.num_pairs), generator=generator)
        values = value_of.gather(1, keys)
        present = torch.zeros(n, self.num_keys, dtype=torch.bool).scatter_(1, keys, True)
        query = uniform_member(present, generator)[:, None]
        answer = value_of.gather(1, query)

        pairs = rearrange([keys + NUM_SPECIAL, values + first_value], "two n p -> n (p two)")
        sequences = torch.cat(
            [
                torch.full((n, self.num_pad), NOOP),
                pairs,
                torch.full((n, 1), COPY),
                query + NUM_SPECIAL,
                answer + first_value,
            ],
            dim=1,
        )
        return Batch.from_sequences(sequences, final_answer_mask(n, self.seq_len))
