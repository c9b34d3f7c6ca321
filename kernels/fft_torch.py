"""FFT causal convolution on torch tensors with a hand-written backward.

Shapes: u, pregate, postgate [B, H, L]; k [H, K] (K <= L) already in the compute dtype
(fp32, or fp64 for fp64 inputs), with any skip term D folded into its tap 0.

The FFT size is the smallest even 2-3-5-smooth n >= L + K - 1, so circular wrap-around never
reaches the first L outputs. Even, because pocketfft's real FFT of an odd length is about 2x
slower (measured, 256 rows, irfft(rfft): n=16875 91 ms, 17280 44 ms, 18432 33 ms).
The filter spectrum is computed once per call and shared by the batch.
Rows are processed in blocks of about BLOCK_ELEMS samples so that a block's signal, spectrum
and output stay in cache from the pregate through the postgate. pocketfft's cost per call
makes small blocks lose. benchmarks/fftconv.py's "block" sweep (B=4, H=64, K=L, fwd+bwd ms,
min of 5) for 2^15 / 2^17 / 2^19 / 2^21 / unblocked: L=1024 9.6 / 8.3 / 7.4 / 6.3 / 6.0,
L=4096 74 / 45 / 40 / 44 / 41, L=16384 719 / 278 / 189 / 174 / 229: blocks of 2^19 to 2^21
samples are never much worse than whole tensors and 1.2-1.3x faster at 16K.
The backward pass uses the spectrum of v and the pre-postgate output z kept from the forward
pass (only those the requested gradients need): each saves one FFT per row.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kernels.fft_sizes import next_fast_len

BLOCK_ELEMS = 2**19


def fft_len(L: int, K: int) -> int:
    """The FFT size for length L and K taps (see the module docstring)."""
    return 2 * next_fast_len(-(-(L + K - 1) // 2))


def _blocks(B: int, H: int, n: int, device: torch.device) -> Iterator[tuple[slice, slice]]:
    """(batch slice, channel slice) pairs covering [B, H], about BLOCK_ELEMS / n rows each on
    a CPU; one block on a GPU, where each block is a round of kernel launches and big batched
    FFTs are what cuFFT is fast at (blocks of 2^19 samples made B=16, H=768, L=1024 take
    11.6 ms forward on an H100, benchmarks/results/triton_gpu.json)."""
    if device.type != "cpu":
        yield slice(None), slice(None)
        return
    rows = max(1, BLOCK_ELEMS // n)
    bb, hb = (rows // H, H) if rows >= H else (1, rows)
    for b0 in range(0, B, bb):
        for h0 in range(0, H, hb):
            yield slice(b0, b0 + bb), slice(h0, h0 + hb)


class FFTConv(torch.autograd.Function):
    """y = postgate * irfft(rfft(u * pregate) rfft(k))[:L], in k's dtype, returned in u's."""

    @staticmethod
    def forward(ctx, u, k, pregate, postgate):
        B, H, L = u.shape
        n = fft_len(L, k.shape[-1])
        k_f = torch.fft.rfft(k, n=n)  # [H, n//2+1]
        # Per block, in _blocks order: kept by reference, so keeping them costs no copy.
        ctx.v_f, ctx.z = [], []
        y = torch.empty_like(u)
        for bs, hs in _blocks(B, H, n, u.device):
            v = u[bs, hs].to(k.dtype)
            if pregate is not None:
                v = v * pregate[bs, hs]
            v_f = torch.fft.rfft(v, n=n)
            z = torch.fft.irfft(v_f * k_f[hs], n=n)[..., :L]
            if ctx.needs_input_grad[1]:
                ctx.v_f.append(v_f)
            if ctx.needs_input_grad[3]:
                ctx.z.append(z)
            y[bs, hs] = z * postgate[bs, hs] if postgate is not None else z
        ctx.save_for_backward(u, k, pregate, postgate)
        ctx.n = n
        return y

    @staticmethod
    def backward(ctx, gy):
        (u, k, pregate, postgate), needs, (g_u, g_pre, g_post) = backward_inputs(ctx)
        need_u, need_k, need_pre, need_post = needs
        B, H, L = u.shape
        K, n = k.shape[-1], ctx.n
        k_f_conj = torch.fft.rfft(k, n=n).conj()
        g_k_f = torch.zeros_like(k_f_conj) if need_k else None
        for i, (bs, hs) in enumerate(_blocks(B, H, n, u.device)):
            gz = gy[bs, hs].to(k.dtype)
            if need_post:
                g_post[bs, hs] = gz * ctx.z[i]
            if postgate is not None:
                gz = gz * postgate[bs, hs]
            gz_f = torch.fft.rfft(gz, n=n)
            if need_k:
                # dk[j] = sum_{b,t} gz[b,t] v[b,t-j]: a correlation, summed over the batch.
                g_k_f[hs] += (gz_f * ctx.v_f[i].conj()).sum(0)
            if need_u or need_pre:
                # dv[s] = sum_{t>=s} k[t-s] gz[t]: the correlation of gz with k.
                gv = torch.fft.irfft(gz_f * k_f_conj[hs], n=n)[..., :L]
                if need_u:
                    g_u[bs, hs] = gv * pregate[bs, hs] if pregate is not None else gv
                if need_pre:
                    g_pre[bs, hs] = gv * u[bs, hs]
        g_k = torch.fft.irfft(g_k_f, n=n)[..., :K] if need_k else None
        ctx.v_f = ctx.z = None  # free them now, not when the graph goes
        return g_u, g_k, g_pre, g_post


def backward_inputs(ctx) -> tuple[tuple, tuple[bool, ...], tuple]:
    """What every fftconv autograd backward starts from: the saved (u, k, pregate, postgate),
    ``ctx.needs_input_grad`` in that order, and empty gradient buffers (g_u, g_pre, g_post)
    for the [B, H, L] inputs, None where no gradient is needed."""
    u, k, pregate, postgate = ctx.saved_tensors
    needs = ctx.needs_input_grad
    buffers = tuple(
        torch.empty_like(x) if need else None
        for x, need in ((u, needs[0]), (pregate, needs[2]), (postgate, needs[3]))
    )
    return (u, k, pregate, postgate), needs, buffers
