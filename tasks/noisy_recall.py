"""Noisy associative recall (MAD): a key/value stream interleaved with noise tokens."""

from __future__ import annotations

import torch

from .base import NOOP, NUM_SPECIAL, Batch, Task, check_float, check_int, register
from .sampling import distinct, scatter_valid, uniform, uniform_member


@register("noisy_recall")
class NoisyRecall(Task):
    """A stream of key/value pairs from a per-sequence map, with noise tokens between pairs.

    Vocabulary: the special tokens, then keys, values and noise tokens. The last
    noise_vocab_size ids are noise; the ordinary ids before them are split into keys (the
    first half) and values (the rest, which gets an odd extra). Each example binds
    num_kv_pairs distinct keys to independent uniform values.

    Sequence S (length seq_len + 1; T = seq_len):
        stream of T - 1 tokens | q v(q)
    The stream is a run of items: the first is a key/value pair "k v(k)", each later one is
    independently a noise token (uniform over the noise ids) with probability noise_prob,
    else a pair whose key is uniform over the example's keys. A pair never straddles the
    stream's end: when only one slot is left it holds NOOP. Noise therefore only ever
    separates pairs, and a key is always directly followed by its value. The final query q
    is uniform over the keys that occurred in the stream.

    Scored positions: every key (input position) that already occurred as a key earlier in
    the sequence -- repeated stream keys and the final query -- whose target is its value.
    First occurrences are not scored (nothing earlier determines them). Every example
    has at least one scored position (the final query).
    """

    def __init__(
        self,
        vocab_size: int = 32,
        seq_len: int = 128,
        num_kv_pairs: int = 8,
        noise_vocab_size: int = 8,
        noise_prob: float = 0.2,
    ):
        name = self.name
        self.num_kv_pairs = check_int(name, "num_kv_pairs", num_kv_pairs, 1)
        self.noise_vocab_size = check_int(name, "noise_vocab_size", noise_vocab_size, 1)
        # Keys take half the ordinary tokens (rounded down), values the rest.
        min_vocab = NUM_SPECIAL + self.noise_vocab_size + max(2 * self.num_kv_pairs, 3)
        why_vocab = (
            f"2 special tokens, {self.noise_vocab_size} noise tokens, "
            f"{self.num_kv_pairs} distinct keys and >= 2 values"
        )
        self.vocab_size = check_int(name, "vocab_size", vocab_size, min_vocab, why_vocab)
        why_len = "one key/value pair, then the final query and its value"
        self.seq_len = check_int(name, "seq_len", seq_len, 3, why_len)
        self.noise_prob = check_float(name, "noise_prob", noise_prob, 0.0, 1.0)
        self.first_noise = self.vocab_size - self.noise_vocab_size
        self.num_keys = (self.first_noise - NUM_SPECIAL) // 2
        self.first_value = NUM_SPECIAL + self.num_keys
        self.num_values = self.first_noise - self.first_value

    @property
    def random_accuracy(self) -> float:
        # Every answer is a value drawn uniformly and independently of the sequence so far.
        return 1.0 / self.num_values

    def _sample(self, n: int, generator: torch.Generator) -> Batch:
        pairs, t = self.num_kv_pairs, self.seq_len
        keys = distinct(n, pairs, self.num_keys, generator) + NUM_SPECIAL
        values = torch.randint(self.num_values, (n, pairs), generator=generator)
        values += self.first_value

        # Items of the stream: each takes >= 1 of its t - 1 slots, so t - 1 items always
        # suffice; the rest of the draws is only made for as many as some row reaches.
        is_noise = uniform(n, t - 1, generator=generator) < self.noise_prob
        is_noise[:, 0] = False
        width = 2 - is_noise.long()
        start = width.cumsum(1) - width
        items = int((start < t - 1).sum(1).max()) if n else 0
        is_noise, width, start = is_noise[:, :items], width[:, :items], start[:, :items]
        which = torch.randint(pairs, (n, items), generator=generator)  # key slot of a pair
        noise = torch.randint(self.first_noise, self.vocab_size, (n, items), generator=generator)
        fits = start + width <= t - 1
        is_pair = fits & ~is_noise

        # One scratch column past S's t + 1 tokens receives the items that do not fit.
        sequences = torch.full((n, t + 2), NOOP)
        first_token = torch.where(is_noise, noise, keys.gather(1, which))
        scatter_valid(sequences, start, first_token, fits)
        scatter_valid(sequences, start + 1, values.gather(1, which), is_pair)

        # A pair is scored when an earlier pair used the same key.
        item = torch.arange(items).expand(n, items)
        first_use = torch.full((n, pairs), items).scatter_reduce_(
            1, which, torch.where(is_pair, item, items), "amin"
        )
        repeated = is_pair & (first_use.gather(1, which) < item)

        # The final query: uniform over the keys the stream used (the first item always is one).
        used = first_use < items
        query = uniform_member(used, generator)
        sequences[:, t - 1] = keys.gather(1, query[:, None])[:, 0]
        sequences[:, t] = values.gather(1, query[:, None])[:, 0]

        answer_mask = torch.zeros(n, t + 1, dtype=torch.bool)  # last column: scratch
        scatter_valid(answer_mask, start, True, repeated)
        answer_mask[:, t - 1] = True
        return Batch.from_sequences(sequences[:, : t + 1], answer_mask[:, :t])
