"""Direct (non-FFT) causal convolutions z = k * v, differentiated by autograd.

Shapes: v [B, H, L], k [H, K] with K <= L, same floating dtype; returns z [B, H, L]. The
Toeplitz method also takes shared filters, k [G, K] with G dividing H: channel h is convolved
with filter h // (H / G) (multi-head H3's second SSM, one filter per head).
At short lengths or short filters these beat the FFT on CPU: the work is O(L K) instead of
O(L log L), but it is done by one large matmul (or one grouped conv1d) with none of the FFT's
per-call overhead. kernels.fftconv picks between them and the FFT by measured crossovers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from kernels.double_backward import reference_grads

# Smallest output block of the block-Toeplitz method: shorter blocks make the matmuls too thin
# (measured when choosing it, B=4, H=64, L=16K, K=16, fwd+bwd: P=32 75 ms, 64 84, 128 101).
TOEPLITZ_MIN_BLOCK = 32
# The Toeplitz block's backward sums diagonals in a buffer of about this many elements. Build +
# backward at H=512, L=30, 1 thread, 300 interleaved calls, median / min ms: 2^14 1.57 / 0.99,
# 2^15 1.14 / 0.73, 2^16 0.96 / 0.61, 2^17 0.86 / 0.55, 2^18 0.91 / 0.58, 2^20 1.10 / 0.79.
_DIAGONAL_BLOCK_ELEMS = 2**17
# Shared filters: at least this many channels per filter, and the channels of one batch row and
# filter go through one [r, L] x [L, L] matmul (batched over B and G, no copies); fewer, and
# the Toeplitz block is repeated per channel (one [B, L] x [L, L] matmul each). fwd+bwd at
# B=32, L=30, 1 thread, 300 alternating calls, median ms, matmul vs repeated: r=64 (G=8) 2.92
# vs 4.67, r=16 2.15 vs 2.08, r=4 3.18 vs 1.37.
GROUP_MATMUL_MIN = 32


def _toeplitz(k: torch.Tensor, P: int, offset: int) -> torch.Tensor:
    """W [H, P + offset, P] with W[s, t] = k[t - s + offset] (zero outside 0..K-1)."""
    return _Toeplitz.apply(k, P, offset)


def _toeplitz_views(k: torch.Tensor, P: int, offset: int) -> torch.Tensor:
    """_Toeplitz's result, views of the padded, flipped filter (autograd's own backward)."""
    K = k.shape[-1]
    q = F.pad(k.flip(-1), (P - 1, P - 1))  # q[P - 1 + i] = k[K - 1 - i]
    windows = q.unfold(-1, P, 1)  # [H, K + P - 1, P]: windows[i, m] = q[i + m]
    return windows[:, K - 1 - offset : K - 1 + P].flip(-1)


class _Toeplitz(torch.autograd.Function):
    """k [H, K] -> its Toeplitz block W [H, P + offset, P], with a hand-written backward.

    The forward takes views of the padded, flipped filter (unfold): one small copy. Autograd's
    own backward for those views (unfold_backward, a scatter-add) took 2-3x the time of the
    diagonal sums below: build + backward of W [512, 30, 30] (multi-head H3's second SSM in the
    h3-table2 preset), 1 thread, 400 alternating calls, median / min: 1.48 / 1.33 ms against
    0.64 / 0.56.
    """

    @staticmethod
    def forward(ctx, k, P: int, offset: int):
        ctx.K, ctx.offset = k.shape[-1], offset
        ctx.save_for_backward(k)
        return _toeplitz_views(k, P, offset)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: kernels.double_backward
            (k,) = ctx.saved_tensors
            P = g.shape[-1]
            dk = reference_grads(lambda k: _toeplitz_views(k, P, ctx.offset), (k,), (True,), g)
            return *dk, None, None
        # dk[j] = sum of g[s, t] over the diagonal t - s = j - offset. Laid out in rows of
        # ``width`` with g starting at column ``offset``, that diagonal is the elements
        # (s, s + j): a strided view with a row step of width + 1 reads it, and the zero
        # padding (s + j <= S + K - 2 < width) keeps it from wrapping into the next row.
        # Channels go through one small buffer in blocks, whose padding is zeroed once: a
        # padded copy of all of g (3.6 MB at H=512, L=30) was fresh memory on every call, and
        # zeroing it cost more than the sums (page faults).
        K, offset = ctx.K, ctx.offset
        H, S, P = g.shape
        width = S + K - 1
        rows = min(H, max(1, _DIAGONAL_BLOCK_ELEMS // (S * width)))
        buffer = g.new_zeros(rows, S, width)
        dk = g.new_empty(H, K)
        for h0 in range(0, H, rows):
            n = min(rows, H - h0)
            buffer[:n, :, offset : offset + P] = g[h0 : h0 + n]
            diagonals = buffer.as_strided((n, S, K), (S * width, width + 1, 1))
            torch.sum(diagonals, 1, out=dk[h0 : h0 + n])
        return dk, None, None


def with_skip(k: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """k [H, K] with the skip weights D [H] added to tap 0 (the term D v_t of the convolution),
    as a copy; k itself when D is None. In place on the copy: about half the time of adding a
    zero-padded D."""
    if D is None:
        return k
    k = k.clone()
    k[:, 0] += D
    return k


def causal_toeplitz(k: torch.Tensor, L: int) -> torch.Tensor:
    """k [H, K] -> T [H, L, L], T[h, t, s] = k[h, t - s] for 0 <= t - s < K, else 0: the matrix
    of the causal convolution y_t = sum_s T[t, s] v_s. Differentiable (the block's own
    backward: diagonal sums)."""
    return _toeplitz(k[:, :L], L, 0).transpose(-1, -2)


def toeplitz_conv(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal convolution as matmuls with Toeplitz blocks of P = max(32, K) outputs.

    Output block j needs inputs jP - (K-1) .. jP + P - 1, so each block is one window of
    P + K - 1 inputs times a [P + K - 1, P] Toeplitz matrix shared by all blocks. When the whole
    sequence fits one block (the tiny training lengths) it is a single [L, L] lower-triangular
    Toeplitz matmul with no padding. k may be [G, K] filters shared by groups of H / G
    consecutive channels (module docstring): the matrices are built once per filter.
    """
    (B, H, L), (G, K) = v.shape, k.shape
    P = max(TOEPLITZ_MIN_BLOCK, K)
    r = H // G
    # Contiguous operands both ways (v here, the output's gradient by contiguous_grad): given a
    # strided one, such as a layer's transposed [B, L, H] activations, CPU bmm runs one small
    # gemm per channel, with a select and a clone each. At B=32, H=512, L=30 fwd+bwd took 8.0 ms
    # with a strided v and 10.5 with a strided gradient, against 2.9 with neither.
    if L <= P:
        W = _toeplitz(k, L, 0)
        if r >= GROUP_MATMUL_MIN:
            z = torch.matmul(v.contiguous().view(B, G, r, L), W).view(B, H, L)
        else:
            z = torch.einsum("bhs,hst->bht", v.contiguous(), per_channel(W, r))
        return contiguous_grad(z)
    blocks = -(-L // P)
    windows = F.pad(v, (K - 1, blocks * P - L)).unfold(-1, P + K - 1, P)  # [B, H, n, P+K-1]
    W = per_channel(_toeplitz(k, P, K - 1), r)
    z = contiguous_grad(torch.einsum("bhns,hst->bhnt", windows, W))
    return rearrange(z, "b h n t -> b h (n t)")[..., :L]


def per_channel(x: torch.Tensor, r: int) -> torch.Tensor:
    """Per-filter x [G, ...] -> per-channel [G r, ...], each row repeated r times in place."""
    return x if r == 1 else x.repeat_interleave(r, 0)


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """x itself, whose gradient is made contiguous on its way back: for ops whose backward is
    slow on strided gradients (CPU bmm, broadcast products feeding a reshape). Without a
    gradient to come (generation's per-token steps) it skips the autograd Function's call."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x
    return _ContiguousGrad.apply(x)


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def conv1d_conv(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal convolution with grouped conv1d (a correlation: flip k, left-pad by K - 1)."""
    K = k.shape[-1]
    return F.conv1d(F.pad(v, (K - 1, 0)), k.flip(-1)[:, None, :], groups=k.shape[0])
