"""FFT causal convolution on torch tensors with a hand-written backward.

Shapes: u, pregate, postgate [B, H, L]; k [H, K] (K <= L) already in the compute dtype
(fp32, or fp64 for fp64 inputs), with any skip term D folded into its tap 0.

The FFT size is the smallest even 2-3-5-smooth n >= L + K - 1, so circular wrap-around never
reaches the first L outputs. Even, because pocketfft's real FFT of an odd length is about 2x
slower (measured, 256 rows, irfft(rfft): n=16875 91 ms, 17280 44 ms, 18432 33 ms).

Where the time goes (B=1, H=128, L=4096, 1 thread): an rfft or irfft of the [128, 8192] rows
takes about 1.2 ms, but the naive version's fwd+bwd took about 40 ms for its six, the rest
being zero-padding copies, out-of-place products, gradient buffers and first-touch page
faults of fresh memory. So every pass here is counted:
- the gate product is written straight into a zero-tailed FFT buffer (no separate pad copy);
- the filter spectrum is computed once per call, shared by the batch, and kept for the
  backward pass rather than recomputed;
- the backward pass reuses the spectrum of v and the pre-postgate output z kept from the
  forward pass (only those the requested gradients need): each saves one FFT per row;
- products go in place or through ``out=`` where nothing else needs their inputs;
- without autograd (inference, generation's prefill) nothing is kept and the spectrum
  product is taken in place.
Rows are processed in blocks of about BLOCK_ELEMS samples, so that a block's buffers stay in
cache from the pregate to the postgate. benchmarks/fftconv.py's "block" sweep sets it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kernels.fft_sizes import next_fast_len

BLOCK_ELEMS = 2**21


def fft_len(L: int, K: int) -> int:
    """The FFT size for length L and K taps (see the module docstring)."""
    return 2 * next_fast_len(-(-(L + K - 1) // 2))


def _blocks(B: int, H: int, n: int, device: torch.device) -> Iterator[tuple[slice, slice]]:
    """(batch slice, channel slice) pairs covering [B, H], about BLOCK_ELEMS / n rows each on
    a CPU; one block on a GPU, where each block is a round of kernel launches and big batched
    FFTs are what cuFFT is fast at (blocks of 2^19 samples made B=16, H=768, L=1024 take
    11.6 ms forward on an H100, benchmarks/results/triton_gpu.json)."""
    if device.type != "cpu":
        yield slice(0, B), slice(0, H)
        return
    rows = max(1, BLOCK_ELEMS // n)
    bb, hb = (rows // H, H) if rows >= H else (1, rows)
    for b0 in range(0, B, bb):
        for h0 in range(0, H, hb):
            yield slice(b0, b0 + bb), slice(h0, h0 + hb)


def _gated_padded(x: torch.Tensor, gate: torch.Tensor | None, n: int, dtype) -> torch.Tensor:
    """[b, h, n] in ``dtype``: x * gate (or x) in the first L samples, zeros after. One pass
    over x instead of a product, a cast and torch.fft's own zero-padding copy."""
    L = x.shape[-1]
    out = torch.empty(*x.shape[:-1], n, dtype=dtype, device=x.device)
    out[..., L:].zero_()
    head = out[..., :L]
    if gate is None:
        head.copy_(x)
    elif x.dtype == gate.dtype == dtype:
        torch.mul(x, gate, out=head)
    else:  # half-precision inputs: the product is taken in the compute dtype, not rounded
        head.copy_(x).mul_(gate)
    return out


def _mul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> None:
    """out[...] = a * b (a if b is None), computed in the wider dtype and cast once."""
    if b is None:
        out.copy_(a)
    else:
        torch.mul(a, b, out=out)


def _at(x: torch.Tensor | None, bs: slice, hs: slice) -> torch.Tensor | None:
    return None if x is None else x[bs, hs]


def conv_forward(u, k, pregate, postgate, keep_v_f: bool = False, keep_z: bool = False):
    """y = postgate * (k * (u * pregate))[:L] by FFT, block by block.

    Returns (y [B, H, L] in u's dtype, k_f [H, n//2+1], v_f list, z list), where the lists
    hold, per block in _blocks order, the conjugated input spectra and the pre-postgate
    outputs when asked for (kept by reference: keeping them costs no copy).
    """
    B, H, L = u.shape
    n = fft_len(L, k.shape[-1])
    k_f = torch.fft.rfft(k, n=n)  # [H, n//2+1]
    v_fs, zs = [], []
    y = torch.empty_like(u)
    for bs, hs in _blocks(B, H, n, u.device):
        v_f = torch.fft.rfft(_gated_padded(u[bs, hs], _at(pregate, bs, hs), n, k.dtype))
        prod = v_f * k_f[hs] if keep_v_f else v_f.mul_(k_f[hs])
        z = torch.fft.irfft(prod, n=n)[..., :L]
        if keep_v_f:  # conjugated now: the backward's products with a conj() view would copy
            v_fs.append(v_f.conj_physical_())
        if keep_z:
            zs.append(z)
        _mul_into(y[bs, hs], z, _at(postgate, bs, hs))
    return y, k_f, v_fs, zs


class FFTConv(torch.autograd.Function):
    """y = postgate * irfft(rfft(u * pregate) rfft(k))[:L], in k's dtype, returned in u's."""

    @staticmethod
    def forward(ctx, u, k, pregate, postgate):
        needs = ctx.needs_input_grad
        y, ctx.k_f, ctx.v_f, ctx.z = conv_forward(u, k, pregate, postgate, needs[1], needs[3])
        ctx.save_for_backward(u, k, pregate, postgate)
        return y

    @staticmethod
    def backward(ctx, gy):
        if ctx.k_f is None:  # freed (and conjugated in place) by the first backward
            raise RuntimeError("fftconv: a second backward through the same graph is not supported")
        (u, k, pregate, postgate), needs, (g_u, g_pre, g_post) = backward_inputs(ctx)
        need_u, need_k, need_pre, need_post = needs
        B, H, L = u.shape
        K, n = k.shape[-1], 2 * (ctx.k_f.shape[-1] - 1)
        k_f_conj = ctx.k_f.conj_physical_()  # in place, once: see conv_forward
        g_k_f = torch.empty_like(ctx.k_f) if need_k else None
        for i, (bs, hs) in enumerate(_blocks(B, H, n, u.device)):
            if need_post:
                _mul_into(g_post[bs, hs], gy[bs, hs], ctx.z[i])
            gz_f = torch.fft.rfft(_gated_padded(gy[bs, hs], _at(postgate, bs, hs), n, k.dtype))
            if need_k:
                # dk[j] = sum_{b,t} gz[b,t] v[b,t-j]: a correlation, summed over the batch.
                # Blocks of the first batch rows come first (see _blocks) and write g_k_f[hs].
                v_f_conj, first = ctx.v_f[i], int(bs.start == 0)
                if first:
                    torch.mul(gz_f[0], v_f_conj[0], out=g_k_f[hs])
                for gz_f_b, v_f_conj_b in zip(gz_f[first:], v_f_conj[first:]):
                    g_k_f[hs].addcmul_(gz_f_b, v_f_conj_b)
            if need_u or need_pre:
                # dv[s] = sum_{t>=s} k[t-s] gz[t]: the correlation of gz with k.
                gv = torch.fft.irfft(gz_f.mul_(k_f_conj[hs]), n=n)[..., :L]
                if need_u:
                    _mul_into(g_u[bs, hs], gv, _at(pregate, bs, hs))
                if need_pre:
                    _mul_into(g_pre[bs, hs], gv, u[bs, hs])
        g_k = torch.fft.irfft(g_k_f, n=n)[..., :K] if need_k else None
        ctx.v_f = ctx.z = ctx.k_f = None  # free them now, not when the graph goes
        return g_u, g_k, g_pre, g_post


def fft_conv(u, k, pregate=None, postgate=None) -> torch.Tensor:
    """The fft method: through FFTConv when a gradient may be asked for, else straight
    through conv_forward, keeping nothing and multiplying spectra in place."""
    tensors = (u, k, pregate, postgate)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return FFTConv.apply(u, k, pregate, postgate)
    return conv_forward(u, k, pregate, postgate)[0]


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
