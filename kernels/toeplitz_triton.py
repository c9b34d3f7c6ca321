"""Direct causal convolution in Triton for short filters: Toeplitz tiles times signal tiles.

Shapes as in kernels.fft_triton: u, pregate, postgate [B, H, L]; k [H, K] fp32 with the skip
term D folded into tap 0. Inputs may be fp32, fp16 or bf16; all math is fp32, tl.dot at
kernels.fft_triton.DOT_PRECISION for the input dtype.

The time axis is cut into blocks of BT positions. Block j of batch row b is column
c = b * nT + j (nT = ceil(L / BT)) of a [BT, B * nT] matrix V of one channel, so a single
tl.dot covers many blocks of the whole batch (a wide right-hand side even at B = 1). Output
block j needs the input blocks j - d for d = 0 .. ND - 1, ND = ceil((K - 1) / BT) + 1, each
through the [BT, BT] Toeplitz tile
    W_d[i, m] = k[d BT + i - m]    (zero outside 0 .. K-1),
built from k by index arithmetic and a masked load. With X_j the tile of blocks j of X:
    Z_j = sum_d W_d @ V_{j-d}                    (v = u * pregate, y = z * postgate),
    dV_j = sum_d W_d^T @ GZ_{j+d}                (gz = gy * postgate),
    dk[d BT + i - m] += (GZ_j @ V_{j-d}^T)[i, m]  summed over all columns.
The work is ND * BT multiply-adds per output, O(L K) with no FFT, and nothing limits L, so this
is the path for short filters at every length. The backward pass recomputes the forward.
dk is a sum over the batch and time, so it has a kernel of its own (one program per channel
and d, the sum kept in registers); the diagonal sums of its [BT, BT] tiles are a tiny torch
epilogue. Runs under TRITON_INTERPRET=1 on CPU tensors, which is how the tests check it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.double_backward import reference_grads
from kernels.fft_torch import backward_inputs
from kernels.fft_triton import (
    DOT_PRECISION,
    _contiguous,
    _or,
    on_device_of_input,
    reference,
    store_signal_grads,
)


class Tiles(NamedTuple):
    """Tile geometry: BT positions per block, BN columns per program, nT blocks per row,
    ncols = B * nT columns in all, ND Toeplitz tiles per output block."""

    BT: int
    BN: int
    nT: int
    ncols: int
    ND: int


def tiles(B: int, L: int, K: int) -> Tiles:
    """The tile geometry for batch B, length L and K taps.

    Blocks as long as the filter (16 to 64) keep ND <= 2 for K <= 64; every tl.dot dimension
    is at least 16, as the GPU requires. Not yet tuned on a GPU.
    """
    BT = min(64, max(16, triton.next_power_of_2(K)))
    nT = triton.cdiv(L, BT)
    BN = min(64, max(16, triton.next_power_of_2(B * nT)))
    return Tiles(BT, BN, nT, B * nT, triton.cdiv(K - 1, BT) + 1)


@triton.jit
def _toeplitz_tile(k_ptr, h, K, d, BT: tl.constexpr, TRANSPOSE: tl.constexpr):
    """W_d [BT, BT] of channel h (W_d[i, m] = k[d BT + i - m], zero outside 0..K-1), or W_d^T."""
    r = tl.arange(0, BT)
    if TRANSPOSE:
        lag = d * BT + r[None, :] - r[:, None]
    else:
        lag = d * BT + r[:, None] - r[None, :]
    return tl.load(k_ptr + h * K + lag, mask=(lag >= 0) & (lag < K), other=0.0)


@triton.jit
def _columns(h, H, L, nT, ncols, c0, shift, BT: tl.constexpr, BN: tl.constexpr):
    """Offsets and mask of the [BT, BN] tile holding, for columns c0 .. c0 + BN - 1 of channel
    h, the blocks ``shift`` after each column's own (positions outside 0..L-1 masked)."""
    c = c0 + tl.arange(0, BN)[None, :]
    pos = (c % nT + shift) * BT + tl.arange(0, BT)[:, None]
    # int64: a call's B H L may pass 2^31 (e.g. H = 2048, B = 65, L = 16K), where int32 wrapped.
    return ((c // nT).to(tl.int64) * H + h) * L + pos, (c < ncols) & (pos >= 0) & (pos < L)


@triton.jit
def _gated(x_ptr, gate_ptr, offs, mask, HAS_GATE: tl.constexpr):
    """x * gate (or x) at offs, in fp32, zero where masked."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        x *= tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _conv_tile(
    u_ptr, pre_ptr, k_ptr, h, H, L, K, nT, ncols, c0,
    ND: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, HAS_PRE: tl.constexpr,
    P: tl.constexpr,
):  # fmt: skip
    """z = k * (u * pregate) on the [BT, BN] tile of columns c0 .. c0 + BN - 1, fp32."""
    z = tl.zeros((BT, BN), dtype=tl.float32)
    for d in range(ND):
        offs, mask = _columns(h, H, L, nT, ncols, c0, -d, BT, BN)
        w = _toeplitz_tile(k_ptr, h, K, d, BT, False)
        z += tl.dot(w, _gated(u_ptr, pre_ptr, offs, mask, HAS_PRE), input_precision=P)
    return z


@triton.jit
def _forward_kernel(
    u_ptr, pre_ptr, post_ptr, k_ptr, y_ptr, H, L, K, nT, ncols, ND: tl.constexpr,
    BT: tl.constexpr, BN: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
    P: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    c0 = tl.program_id(1) * BN
    z = _conv_tile(u_ptr, pre_ptr, k_ptr, h, H, L, K, nT, ncols, c0, ND, BT, BN, HAS_PRE, P)
    offs, mask = _columns(h, H, L, nT, ncols, c0, 0, BT, BN)
    if HAS_POST:
        z *= tl.load(post_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_signal_kernel(
    u_ptr, pre_ptr, post_ptr, gy_ptr, k_ptr, gu_ptr, gpre_ptr, gpost_ptr,
    H, L, K, nT, ncols, ND: tl.constexpr,
    BT: tl.constexpr, BN: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
    NEED_U: tl.constexpr, NEED_PRE: tl.constexpr, NEED_POST: tl.constexpr,
    P: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    c0 = tl.program_id(1) * BN
    offs, mask = _columns(h, H, L, nT, ncols, c0, 0, BT, BN)
    if NEED_POST:  # z is recomputed, never stored
        z = _conv_tile(u_ptr, pre_ptr, k_ptr, h, H, L, K, nT, ncols, c0, ND, BT, BN, HAS_PRE, P)
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gpost_ptr + offs, (gy * z).to(gpost_ptr.dtype.element_ty), mask=mask)
    if NEED_U or NEED_PRE:  # dv[s] = sum_t k[t - s] gz[t]: output block j reads gz blocks j + d
        gv = tl.zeros((BT, BN), dtype=tl.float32)
        for d in range(ND):
            offs_d, mask_d = _columns(h, H, L, nT, ncols, c0, d, BT, BN)
            gz = _gated(gy_ptr, post_ptr, offs_d, mask_d, HAS_POST)
            wt = _toeplitz_tile(k_ptr, h, K, d, BT, True)
            gv += tl.dot(wt, gz, input_precision=P)
        store_signal_grads(gv, u_ptr, pre_ptr, gu_ptr, gpre_ptr, offs, mask, HAS_PRE, NEED_U,
                           NEED_PRE)  # fmt: skip


@triton.jit
def _grad_filter_kernel(
    u_ptr, pre_ptr, post_ptr, gy_ptr, part_ptr, H, L, nT, ncols, ND: tl.constexpr,
    BT: tl.constexpr, BN: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
    COL_TILES: tl.constexpr, P: tl.constexpr,
):  # fmt: skip
    # One program per (channel, d) loops over every column, so the batch-and-time sum stays in
    # registers; part[h, d, i, m] = sum_c gz[block c][i] * v[block c - d][m]. The loop count is
    # a constexpr (one compile per shape on a GPU, like kernels.fft_triton's batch loop)
    # because the interpreter cannot loop over a runtime count (numpy >= 2.4).
    h = tl.program_id(0)
    d = tl.program_id(1)
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    for tile in range(COL_TILES):
        c0 = tile * BN
        offs, mask = _columns(h, H, L, nT, ncols, c0, 0, BT, BN)
        gz = _gated(gy_ptr, post_ptr, offs, mask, HAS_POST)
        offs, mask = _columns(h, H, L, nT, ncols, c0, -d, BT, BN)
        v = _gated(u_ptr, pre_ptr, offs, mask, HAS_PRE)
        acc += tl.dot(gz, tl.trans(v), input_precision=P)
    r = tl.arange(0, BT)
    tl.store(part_ptr + ((h * ND + d) * BT + r[:, None]) * BT + r[None, :], acc)


def _diagonal_sums(part: torch.Tensor, K: int) -> torch.Tensor:
    """dk [H, K] from part [H, ND, BT, BT]: dk[h, l] = sum of part[h, d, i, m] over
    d BT + i - m = l (lags outside 0..K-1 dropped)."""
    H, ND, BT, _ = part.shape
    r = torch.arange(BT, device=part.device)
    d = torch.arange(ND, device=part.device)
    # Shifted by BT - 1 so that the negative lags (all dropped) index a padding region.
    lag = (d[:, None, None] * BT + r[:, None] - r[None, :]).flatten() + BT - 1
    dk = part.new_zeros(H, (ND + 1) * BT).index_add_(1, lag, part.reshape(H, -1))
    return dk[:, BT - 1 : BT - 1 + K]


class TritonToeplitzConv(torch.autograd.Function):
    """y = postgate * causal_conv(u * pregate, k) by Toeplitz tiles; backward recomputes."""

    @staticmethod
    @on_device_of_input
    def forward(ctx, u, k, pregate, postgate):
        B, H, L = u.shape
        contiguous = [_contiguous(x) for x in (u, k, pregate, postgate)]
        ctx.save_for_backward(u, k, pregate, postgate, *contiguous)  # see TritonFFTConv.forward
        u, k, pregate, postgate = contiguous
        t = tiles(B, L, k.shape[-1])
        y = torch.empty_like(u)
        _forward_kernel[(H, triton.cdiv(t.ncols, t.BN))](
            u, _or(pregate, u), _or(postgate, u), k, y, H, L, k.shape[-1], t.nT, t.ncols, t.ND,
            BT=t.BT, BN=t.BN, HAS_PRE=pregate is not None, HAS_POST=postgate is not None,
            P=DOT_PRECISION[u.dtype],
        )  # fmt: skip
        return y

    @staticmethod
    @on_device_of_input
    def backward(ctx, gy):
        if torch.is_grad_enabled():  # create_graph=True: kernels.double_backward
            return reference_grads(reference, ctx.saved_tensors[:4], ctx.needs_input_grad, gy)
        _, needs, (g_u, g_pre, g_post) = backward_inputs(ctx, contiguous=True)
        u, k, pregate, postgate = ctx.saved_tensors[4:]
        need_u, need_k, need_pre, need_post = needs
        B, H, L = u.shape
        K = k.shape[-1]
        t = tiles(B, L, K)
        gy = gy.contiguous()
        flags = dict(BT=t.BT, BN=t.BN, HAS_PRE=pregate is not None, HAS_POST=postgate is not None)
        flags["P"] = DOT_PRECISION[u.dtype]
        if need_u or need_pre or need_post:
            _grad_signal_kernel[(H, triton.cdiv(t.ncols, t.BN))](
                u, _or(pregate, u), _or(postgate, u), gy, k,
                _or(g_u, u), _or(g_pre, u), _or(g_post, u), H, L, K, t.nT, t.ncols, t.ND,
                NEED_U=need_u, NEED_PRE=need_pre, NEED_POST=need_post, **flags,
            )  # fmt: skip
        g_k = None
        if need_k:
            part = torch.empty(H, t.ND, t.BT, t.BT, device=u.device, dtype=torch.float32)
            _grad_filter_kernel[(H, t.ND)](
                u, _or(pregate, u), _or(postgate, u), gy, part, H, L, t.nT, t.ncols, t.ND,
                COL_TILES=triton.cdiv(t.ncols, t.BN), **flags,
            )  # fmt: skip
            g_k = _diagonal_sums(part, K).to(k.dtype)
        return g_u, g_k, g_pre, g_post
