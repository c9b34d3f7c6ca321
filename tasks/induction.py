"""Induction head (H3 paper, Table 2): after the final "=>", repeat the token that
followed the earlier "=>"."""

from __future__ import annotations

import torch

from .base import COPY, NUM_SPECIAL, Batch, Task, check_int, final_answer_mask, register


@register("induction_head")
class InductionHead(Task):
    """Random ordinary tokens with one earlier "=>"; the answer is the token that followed it.

    Sequence (length seq_len + 1; T = seq_len):
        t0 t1 ... t(p-1) => t(p+1) ... t(T-2) => | t(p+1)
    p is uniform over 0..T-4, as in Safari's generator for the paper: t(p+1) is an ordinary
    token at least two places before the final "=>". "=>" occurs exactly twice in the inputs.
    The paper's "seq_len 30" counts the T - 1 = 30 random tokens; with the final "=>" the
    model reads 31, the default.
    """

    layout = 2  # 2: Safari's trigger range (0 .. T-4) and 30 random tokens by default

    def __init__(self, vocab_size: int = 20, seq_len: int = 31):
        why_vocab = "2 special tokens and >= 2 ordinary ones"
        why_len = 'an earlier "=>", the token after it, one more token and the final "=>"'
        self.vocab_size = check_int(self.name, "vocab_size", vocab_size, NUM_SPECIAL + 2, why_vocab)
        self.seq_len = check_int(self.name, "seq_len", seq_len, 4, why_len)
        self.num_ordinary = self.vocab_size - NUM_SPECIAL

    @property
    def random_accuracy(self) -> float:
        # The answer is uniform over the ordinary tokens. The paper's table lists 5.0 = 1/20
        # for vocab 20, counting the two special tokens, which are never the answer.
        return 1.0 / self.num_ordinary

    def _sample(self, n: int, generator: torch.Generator) -> Batch:
        t = self.seq_len
        sequences = torch.randint(NUM_SPECIAL, self.vocab_size, (n, t + 1), generator=generator)
        p = torch.randint(t - 3, (n, 1), generator=generator)
        answer = sequences.gather(1, p + 1)
        sequences.scatter_(1, p, COPY)
        sequences[:, t - 1] = COPY
        sequences[:, t] = answer[:, 0]
        return Batch.from_sequences(sequences, final_answer_mask(n, t))
