"""Vectorised sampling helpers shared by the task generators.

Every helper draws from the torch.Generator it is given (never the global RNG) and works on
whole batches at once: Python loops run over rounds of redraws or over a handful of
columns, never over examples.
"""

from __future__ import annotations

import math

import torch

# Up to this many candidates per wanted item, the k smallest of m uniforms (cost n * m) beat
# drawing with repeats and dropping them (whose surplus grows as k / m approaches 1).
_DENSE_RATIO = 4


def uniform(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """float32 uniforms on [0, 1) of ``shape``. float32 whatever torch's default dtype: a
    float64 draw takes other bits from the generator, so a notebook that called
    torch.set_default_dtype(torch.float64) would get other examples for the same seed."""
    return torch.rand(*shape, generator=generator, dtype=torch.float32)


def uniform_member(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """int64 [n]: per row of the bool [n, m] ``mask`` a column where it is True, uniform over
    those columns (every row needs one). The largest of m uniforms over the allowed columns."""
    scores = uniform(*mask.shape, generator=generator)
    return torch.where(mask, scores, -1.0).argmax(1)


def later_duplicates(x: torch.Tensor) -> torch.Tensor:
    """bool [n, k]: True where x[r, j] equals some x[r, i] with i < j."""
    sorted_x, order = x.sort(dim=1, stable=True)  # equal values keep their column order
    repeat = torch.zeros_like(x, dtype=torch.bool)
    repeat[:, 1:] = sorted_x[:, 1:] == sorted_x[:, :-1]
    return torch.empty_like(repeat).scatter_(1, order, repeat)


def distinct(n: int, k: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """int64 [n, k]: k distinct integers from range(m) per row (k <= m), each row uniform
    over the ordered k-tuples of distinct values (sampling without replacement)."""
    if m <= _DENSE_RATIO * k:
        return uniform(n, m, generator=generator).topk(k, dim=1, sorted=True).indices
    # The first k distinct values of an i.i.d. uniform stream are a draw without
    # replacement. Draw a few more than k (the expected repeats, plus a margin) and take
    # them; a row that still falls short is drawn again from scratch, an independent
    # repeat of the same experiment, so the accepted rows keep the same law.
    repeats = k * k / (2 * m)
    draws = k + math.ceil(2 * repeats + 4 * math.sqrt(repeats)) + 2
    out = torch.empty(n, k + 1, dtype=torch.long)  # last column: scratch
    todo = torch.arange(n)
    while len(todo):
        stream = torch.randint(m, (len(todo), draws), generator=generator)
        new = ~later_duplicates(stream)
        rank = new.cumsum(1) - 1
        chosen = torch.empty(len(todo), k + 1, dtype=torch.long)
        scatter_valid(chosen, rank, stream, new & (rank < k))
        full = rank[:, -1] >= k - 1
        out[todo[full]] = chosen[full]
        todo = todo[~full]
    return out[:, :k]


def weighted_order(log_weights: torch.Tensor, n: int, k: int, generator: torch.Generator):
    """int64 [n, k]: k indices drawn without replacement with probability proportional to
    exp(log_weights) ([m]), in draw order (as numpy's ``choice(m, k, replace=False, p=w)``).

    Exponential race (Efraimidis-Spirakis): index i finishes at time E_i / w_i with
    E_i ~ Exp(1); the first finisher is i with probability w_i / sum(w), and by
    memorylessness so is every later one among those left. Compared in log space, so
    extreme weights neither overflow nor tie.
    """
    # E = -log(1 - U) ~ Exp(1) (torch's exponential_ sampler is several times slower).
    u = uniform(n, log_weights.shape[0], generator=generator)
    log_times = u.neg_().log1p_().neg_().log_() - log_weights
    return log_times.topk(k, dim=1, largest=False, sorted=True).indices


def uniform_excluding(
    f: int, m: int, excluded: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """int64 [n, f]: uniform integers from range(m) other than the row's ``excluded``
    values ([n, k], distinct, k < m)."""
    n, k = excluded.shape
    if m <= _DENSE_RATIO * f:
        # A per-row table of allowed values costs at most a few entries per draw: draw from
        # all of range(m) and redraw the excluded hits (rejection keeps the law uniform).
        allowed = torch.ones(n, m, dtype=torch.bool).scatter_(1, excluded, False)
        out = torch.randint(m, (n, f), generator=generator)
        rows, cols = (~allowed.gather(1, out)).nonzero(as_tuple=True)
        while len(rows):
            out[rows, cols] = draw = torch.randint(m, (len(rows),), generator=generator)
            miss = ~allowed[rows, draw]
            rows, cols = rows[miss], cols[miss]
        return out
    # Otherwise map uniform offsets into the allowed values: with e sorted, the offset-th
    # allowed value is offset + #{j : e_j - j <= offset}, and e_j - j is nondecreasing.
    offsets = torch.randint(m - k, (n, f), generator=generator)
    shifted = excluded.sort(dim=1).values - torch.arange(k)
    return offsets + torch.searchsorted(shifted, offsets, right=True)


def scatter_valid(out: torch.Tensor, index: torch.Tensor, src, valid: torch.Tensor) -> None:
    """out[r, index[r, j]] = src[r, j] where valid[r, j], in place.

    The last column of ``out`` is scratch: invalid entries are written there, so callers
    allocate one extra column and slice it off.
    """
    out.scatter_(1, torch.where(valid, index, out.shape[1] - 1), src)
