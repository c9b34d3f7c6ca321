"""Memorization (MAD): a fixed key->value map that has to be stored in the weights."""

from __future__ import annotations

import torch
from einops import rearrange

from .base import NOOP, NUM_SPECIAL, Batch, Task, check_int, check_seed, register
from .sampling import distinct


@register("memorization")
class Memorization(Task):
    """Key/value pairs from one fixed map, the same for every example and every split.

    Vocabulary: ordinary ids split into keys (the first (vocab_size - 2) // 2) and values
    (the rest). The map is drawn once from ``map_seed`` (not from the generate seed): each
    key's value uniform over the values, independently. ``task.value_table`` holds it:
    value_table[i] is the value of key id NUM_SPECIAL + i.

    Sequence S (length seq_len + 1):
        k1 m(k1) k2 m(k2) ...      (a leading "." when seq_len + 1 is odd)
    with (seq_len + 1) // 2 distinct keys per example, uniform (a repeated key could be
    recalled from the context). Scored positions: every key, whose target is its mapped value.

    Why independent values: the sequences show the values (targets are the next tokens), so
    with a one-to-one map a value already seen in an example could not be a later key's, and
    a model that knew nothing of the map could beat chance by guessing among the unseen
    ones (1.4x chance at vocab 256, seq_len 128; certain for the last key at seq_len 2
    num_keys). With values drawn independently, the context says nothing about an unseen
    key's value: every correct answer beyond the blind guess comes from the weights.
    MAD's version hides the values from the inputs instead (a key, then an insert token).
    """

    def __init__(self, vocab_size: int = 256, seq_len: int = 128, map_seed: int = 0):
        name = self.name
        why_vocab = "2 special tokens, >= 2 keys and >= 2 values"
        self.vocab_size = check_int(name, "vocab_size", vocab_size, NUM_SPECIAL + 4, why_vocab)
        self.num_keys = (self.vocab_size - NUM_SPECIAL) // 2
        self.num_values = self.vocab_size - NUM_SPECIAL - self.num_keys
        why_len = f"(seq_len + 1) // 2 distinct keys out of {self.num_keys}"
        self.seq_len = check_int(name, "seq_len", seq_len, 1, why_len, 2 * self.num_keys)
        self.map_seed = check_seed(name, "map_seed", map_seed)
        self.num_pairs = (self.seq_len + 1) // 2
        self.num_pad = (self.seq_len + 1) % 2

        generator = torch.Generator().manual_seed(self.map_seed)
        values = torch.randint(self.num_values, (self.num_keys,), generator=generator)
        self._value_table = values + NUM_SPECIAL + self.num_keys

    @property
    def value_table(self) -> torch.Tensor:
        """int64 [num_keys]: the value token of key token NUM_SPECIAL + i (a copy)."""
        return self._value_table.clone()

    @property
    def random_accuracy(self) -> float:
        # Keys are uniform, so the best blind guess is the value of the most keys.
        return self._value_table.bincount().max().item() / self.num_keys

    def _sample(self, n: int, generator: torch.Generator) -> Batch:
        keys = distinct(n, self.num_pairs, self.num_keys, generator)
        values = self._value_table[keys]
        pairs = rearrange([keys + NUM_SPECIAL, values], "two n p -> n (p two)")
        sequences = torch.cat([torch.full((n, self.num_pad), NOOP), pairs], dim=1)
        answer_mask = torch.zeros(n, self.seq_len, dtype=torch.bool)
        answer_mask[:, self.num_pad :: 2] = True
        return Batch.from_sequences(sequences, answer_mask)
