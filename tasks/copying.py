"""Copying tasks: reproduce data tokens after a copy token "=>".

Both tasks end their sequence S with "=> d1 ... dK", so the scored input positions are the
last K: the "=>" (target d1) and d1 .. d(K-1) fed back (targets d2 .. dK).
"""

from __future__ import annotations

import torch

from .base import COPY, NOOP, NUM_SPECIAL, Batch, Task, check_int, register
from .sampling import distinct

_WHY_VOCAB = "2 special tokens and >= 2 ordinary data tokens"


def copy_sequences(context: torch.Tensor, data: torch.Tensor, seq_len: int) -> Batch:
    """The examples of S = context "=>" data ([n, seq_len + 1]), the last K inputs scored."""
    n, k = data.shape
    sequences = torch.cat([context, torch.full((n, 1), COPY), data], dim=1)
    answer_mask = torch.zeros(n, seq_len, dtype=torch.bool)
    answer_mask[:, seq_len - k :] = True
    return Batch.from_sequences(sequences, answer_mask)


@register("selective_copying")
class SelectiveCopying(Task):
    """Data tokens scattered among no-op blanks; after "=>", the data tokens in order.

    Sequence S (length seq_len + 1; K = num_tokens_to_copy, C = seq_len - K):
        a context of C tokens: K data tokens at uniformly random distinct positions (their
        order kept), NOOP "." everywhere else | "=>" | d1 ... dK
    Data tokens are uniform ordinary tokens (ids 2 .. vocab_size - 1, repeats allowed).
    seq_len counts every input token (context, "=>", and d1 .. d(K-1)). Scored positions:
    the last K inputs, whose targets are d1 .. dK.

    Defaults are CPU-sized: Mamba's setting is seq_len 4096 (vocab 16, 16 tokens), which
    is just ``seq_len=4096`` here.
    """

    def __init__(self, vocab_size: int = 16, seq_len: int = 128, num_tokens_to_copy: int = 16):
        name = self.name
        self.vocab_size = check_int(name, "vocab_size", vocab_size, NUM_SPECIAL + 2, _WHY_VOCAB)
        self.num_tokens_to_copy = check_int(name, "num_tokens_to_copy", num_tokens_to_copy, 1)
        k = self.num_tokens_to_copy
        why_len = f"a context with room for {k} data tokens, then {k} answers"
        self.seq_len = check_int(name, "seq_len", seq_len, 2 * k, why_len)

    @property
    def random_accuracy(self) -> float:
        return 1.0 / (self.vocab_size - NUM_SPECIAL)

    def _sample(self, n: int, generator: torch.Generator) -> Batch:
        k = self.num_tokens_to_copy
        span = self.seq_len - k
        data = torch.randint(NUM_SPECIAL, self.vocab_size, (n, k), generator=generator)
        positions = distinct(n, k, span, generator).sort(dim=1).values
        context = torch.full((n, span), NOOP).scatter_(1, positions, data)
        return copy_sequences(context, data, self.seq_len)


@register("compression")
class Compression(Task):
    """Random tokens, then "=>", then the same tokens again (MAD's compression task).

    Sequence S (length seq_len + 1; N = num_tokens):
        "." * (seq_len - 2N) | d1 ... dN | "=>" | d1 ... dN
    Data tokens are uniform ordinary tokens; leading no-ops pad a seq_len above 2N.
    Scored positions: the last N inputs, whose targets are the reproduced d1 .. dN. As the
    reproduced tokens are fed back, the target of every scored position is the input exactly N
    positions earlier, so a fixed-lag filter solves it: unlike MAD's version, which
    compresses the sequence into one token, this does not test compression.
    """

    def __init__(self, vocab_size: int = 16, seq_len: int = 64, num_tokens: int = 32):
        name = self.name
        self.vocab_size = check_int(name, "vocab_size", vocab_size, NUM_SPECIAL + 2, _WHY_VOCAB)
        self.num_tokens = check_int(name, "num_tokens", num_tokens, 1)
        why_len = f"{num_tokens} tokens, then {num_tokens} answers"
        self.seq_len = check_int(name, "seq_len", seq_len, 2 * self.num_tokens, why_len)

    @property
    def random_accuracy(self) -> float:
        return 1.0 / (self.vocab_size - NUM_SPECIAL)

    def _sample(self, n: int, generator: torch.Generator) -> Batch:
        data = torch.randint(
            NUM_SPECIAL, self.vocab_size, (n, self.num_tokens), generator=generator
        )
        padding = torch.full((n, self.seq_len - 2 * self.num_tokens), NOOP)
        return copy_sequences(torch.cat([padding, data], dim=1), data, self.seq_len)
