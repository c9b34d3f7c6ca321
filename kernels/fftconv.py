"""Causal long convolution ``y = postgate * (k * (u * pregate) + D * (u * pregate))``.

Shapes: u, pregate, postgate [B, H, L]; k [H, K]; D [H]. Taps of k beyond L can never
reach an output position, so K > L is accepted and truncated to L.

The torch backend does the convolution with real FFTs of a size n >= L + K - 1 (so the
circular wrap-around never reaches the first L outputs) in fp32 (fp64 for fp64 inputs).
Its backward is written out by hand: the gradients of a convolution are correlations,
which are again one FFT product each, so nothing of the forward FFT graph is stored.
"""

from __future__ import annotations

import torch

from kernels.fft_sizes import next_fast_len

_BACKENDS = ("torch",)


def backends() -> tuple[str, ...]:
    """Names of the available fftconv backends."""
    return _BACKENDS


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are upcast: FFTs in fp16/bf16 lose too much for long filters.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_shapes(u, k, D, pregate, postgate) -> None:
    if u.dim() != 3:
        raise ValueError(f"fftconv: u must be [B, H, L], got shape {tuple(u.shape)}")
    _, H, _ = u.shape
    if k.dim() != 2 or k.shape[0] != H or k.shape[1] < 1:
        raise ValueError(f"fftconv: k must be [H={H}, K>=1], got shape {tuple(k.shape)}")
    if D is not None and tuple(D.shape) != (H,):
        raise ValueError(f"fftconv: D must be [H={H}], got shape {tuple(D.shape)}")
    for name, g in (("pregate", pregate), ("postgate", postgate)):
        if g is not None and g.shape != u.shape:
            raise ValueError(
                f"fftconv: {name} must match u {tuple(u.shape)}, got shape {tuple(g.shape)}"
            )


def _causal_conv(v_f: torch.Tensor, k_f: torch.Tensor, n: int, L: int) -> torch.Tensor:
    """irfft of a spectrum product, cut to the first L (causal) outputs."""
    return torch.fft.irfft(v_f * k_f, n=n)[..., :L]


class _FFTConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, k, D, pregate, postgate):
        dtype = _compute_dtype(u.dtype)
        L = u.shape[-1]
        n = next_fast_len(L + k.shape[-1] - 1)
        uc = u.to(dtype)
        v = uc * pregate.to(dtype) if pregate is not None else uc
        k_f = torch.fft.rfft(k.to(dtype), n=n)  # [H, n//2+1]: shared by the whole batch
        z = _causal_conv(torch.fft.rfft(v, n=n), k_f, n, L)
        if D is not None:
            z = z + D.to(dtype)[:, None] * v
        y = z * postgate.to(dtype) if postgate is not None else z
        ctx.save_for_backward(u, k, D, pregate, postgate)
        ctx.n = n
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, gy):
        u, k, D, pregate, postgate = ctx.saved_tensors
        n = ctx.n
        dtype = _compute_dtype(u.dtype)
        L, K = u.shape[-1], k.shape[-1]
        uc = u.to(dtype)
        v = uc * pregate.to(dtype) if pregate is not None else uc
        gy = gy.to(dtype)
        v_f = torch.fft.rfft(v, n=n)
        k_f = torch.fft.rfft(k.to(dtype), n=n)

        g_post = None
        if postgate is not None:
            # z is recomputed (one irfft) rather than kept from the forward pass.
            if ctx.needs_input_grad[4]:
                z = _causal_conv(v_f, k_f, n, L)
                if D is not None:
                    z = z + D.to(dtype)[:, None] * v
                g_post = (gy * z).to(postgate.dtype)
            gz = gy * postgate.to(dtype)
        else:
            gz = gy

        gz_f = torch.fft.rfft(gz, n=n)
        g_k = g_D = g_u = g_pre = None
        if ctx.needs_input_grad[1]:
            # dk[j] = sum_{b,t} gz[b,t] v[b,t-j]: a correlation, summed over the batch.
            g_k = torch.fft.irfft((gz_f * v_f.conj()).sum(0), n=n)[..., :K].to(k.dtype)
        if D is not None and ctx.needs_input_grad[2]:
            g_D = (gz * v).sum(dim=(0, 2)).to(D.dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            # dv[s] = sum_{t>=s} k[t-s] gz[t]: correlation of gz with k.
            gv = _causal_conv(gz_f, k_f.conj(), n, L)
            if D is not None:
                gv = gv + D.to(dtype)[:, None] * gz
            if ctx.needs_input_grad[0]:
                g_u = (gv * pregate.to(dtype) if pregate is not None else gv).to(u.dtype)
            if pregate is not None and ctx.needs_input_grad[3]:
                g_pre = (gv * uc).to(pregate.dtype)
        return g_u, g_k, g_D, g_pre, g_post


def fftconv(
    u: torch.Tensor,
    k: torch.Tensor,
    D: torch.Tensor | None = None,
    pregate: torch.Tensor | None = None,
    postgate: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal convolution of each channel of ``u`` with its filter, plus skip and gates.

    ``v = u * pregate``; ``y[b,h,t] = postgate * (sum_{s<=t} k[h,t-s] v[b,h,s] + D[h] v[b,h,t])``.

    Args:
        u: [B, H, L] input (float32, float16, bfloat16 or float64).
        k: [H, K] filters; taps past L are ignored.
        D: [H] skip weights, or None.
        pregate, postgate: [B, H, L] multiplicative gates, or None.
        backend: "torch" (default everywhere for now), or None to choose automatically.

    Returns:
        [B, H, L] in u's dtype; the math inside is fp32 (fp64 for fp64 inputs).
    """
    _check_shapes(u, k, D, pregate, postgate)
    backend = backend or "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"fftconv: unknown backend {backend!r}; available: {list(_BACKENDS)}")
    if k.shape[-1] > u.shape[-1]:
        k = k[:, : u.shape[-1]]
    return _FFTConv.apply(u, k, D, pregate, postgate)
