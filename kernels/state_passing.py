"""Diagonal-SSM convolution in chunks with the state carried between them: exact, O(L).

For y = K * v + D v with K[l] = 2 Re sum_n C_n dB_n dA_n^l (kernels.s4d_kernel), split v into
chunks of T samples. With x the complex SSM state [B, H, N] after the previous chunk,

    y_c = conv_T(v_c) + D v_c + 2 Re(M_xy x_{c-1}),   M_xy[j, n] = C_n dA_n^(j+1)
    x_c = dA^T x_{c-1} + M_ux v_c,                    M_ux[n, i] = dB_n dA_n^(T-1-i)

where conv_T uses the filter truncated to T taps (kernels.s4d_kernel, then kernels.fftconv, so
the fastest method for a chunk). M_xy and M_ux are Vandermonde matrices, applied as real
matmuls with their lags split as t = a + P q, P ~ sqrt(T) (kernels.ssm.s4d_state, and
_from_state here), so that only ~2 sqrt(T) powers of dA are formed: the work is O(L (log T +
N)) and the memory O(B H T) per chunk instead of an FFT of the whole sequence. (With the full
[H, T, N] Vandermonde matrices a fwd+bwd took 12x longer on CPU: H = 128, 32 modes, L = 16K,
chunks of 8192, 2450 against 201 ms.) Differentiable by autograd in every argument.
Layers use it beyond kernels.STATE_PASSING_LEN, with chunks of that length: linear in L, and
no length-L filter or spectrum in memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from kernels.dispatch import fftconv
from kernels.ssm import dA_powers, log_dA, s4d_discretize, s4d_kernel, s4d_state


def ssm_chunked_conv(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor | None,
    C: torch.Tensor,
    D: torch.Tensor | None,
    chunk: int,
    method: str = "zoh",
    pregate: torch.Tensor | None = None,
    postgate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fftconv(u, s4d_kernel(dt, A, B, C, L, method), D, pregate, postgate)``, chunk by chunk.

    Args:
        u: [B, H, L] real input; pregate, postgate: [B, H, L] or None.
        dt: [H]; A, C: [H, N] complex; B: [H, N] complex or None (ones); D: [H] or None.
        chunk: samples per chunk T >= 1; the last chunk may be shorter.
        method: discretisation, as in kernels.s4d_discretize.

    Returns:
        [B, H, L] in u's dtype.
    """
    if chunk < 1:
        raise ValueError(f"ssm_chunked_conv: chunk must be >= 1, got {chunk}")
    if u.dim() != 3 or u.shape[-1] < 1:
        raise ValueError(f"ssm_chunked_conv: u must be [B, H, L>=1], got shape {tuple(u.shape)}")
    for name, g in (("pregate", pregate), ("postgate", postgate)):
        if g is not None and g.shape != u.shape:  # as fftconv: no silent broadcasting
            raise ValueError(
                f"ssm_chunked_conv: {name} must match u {tuple(u.shape)}, got {tuple(g.shape)}"
            )
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    L = u.shape[-1]
    T = min(chunk, L)
    chunks = -(-L // T)
    v = u.to(dtype) if pregate is None else u.to(dtype) * pregate
    # Filter, states and their sums in fp32 (fp64) even under autocast: bf16 would lose the
    # long tail of the state's sum (and torch.complex takes no bf16).
    with torch.autocast(u.device.type, enabled=False):
        lam = log_dA(dt, A, method)
        dA = s4d_discretize(dt, A, None, method)[0]
        k = s4d_kernel(dt, A, B, C, T, method)  # the filter's first T taps
        decay_re, decay_im = dA_powers(lam, 2, step=T, dA=dA)  # dA^0, dA^T: [H, 2, N]
        decay = torch.complex(decay_re[:, 1], decay_im[:, 1])

        # Zeros appended at the end change no earlier output (causality); cut off at the end.
        v = rearrange(F.pad(v, (0, chunks * T - L)), "b h (c t) -> b h c t", t=T)
        local = fftconv(rearrange(v, "b h c t -> (b c) h t"), k.to(dtype), D)
        local = rearrange(local, "(b c) h t -> b h c t", c=chunks)
        # State added by each chunk on its own (M_ux v_c), for all chunks at once: [B, H, c, N].
        pushed = s4d_state(rearrange(v, "b h c t -> (b c) h t"), dt, A, B, method)
        pushed = rearrange(pushed, "(b c) h n -> b h c n", c=chunks)
        # The sequential part is only over chunks, on [B, H, N] states.
        state = torch.zeros_like(pushed[:, :, 0])
        before = []  # state entering each chunk
        for c in range(chunks):
            before.append(state)
            state = decay * state + pushed[:, :, c]
        from_state = _from_state(C[:, None] * torch.stack(before, dim=2), lam, dA, T, dtype)
    y = rearrange(local + from_state, "b h c t -> b h (c t)")[..., :L]
    return (y * postgate if postgate is not None else y).to(u.dtype)


def _from_state(
    cx: torch.Tensor,
    lam: tuple[torch.Tensor, torch.Tensor],
    dA: torch.Tensor,
    T: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """2 Re sum_n cx[b, h, c, n] dA_n^(t+1) for t < T (M_xy x: the output a chunk gets from the
    state entering it), [B, H, c, N] complex -> [B, H, c, T] in ``dtype``; lam = log dA.

    The lags split as in kernels.ssm.S4DKernel, t = a + P q with P ~ sqrt(T), dA^(t+1) =
    dA^(a+1) dA^(P q): the weights times the P low powers, then a matmul with the Q high
    ones per channel. Powers for ~2 sqrt(T) lags instead of T: the full [H, T, N] Vandermonde
    matrices (134 MB each in fp32 at H = 128, T = 8192, 32 modes) and autograd through them
    were most of a chunked fwd+bwd on CPU.
    """
    P = math.isqrt(T - 1) + 1
    Q = -(-T // P)
    # dA^(a+1): [H, P, N]
    low_re, low_im = (x[:, 1:].to(dtype) for x in dA_powers(lam, P + 1, dA=dA))
    high_re, high_im = (x.to(dtype) for x in dA_powers(lam, Q, step=P))  # dA^(P q): [H, Q, N]
    x_re, x_im = (rearrange(x.to(dtype), "b h c n -> h (b c) 1 n") for x in (cx.real, cx.imag))
    z_re = (x_re * low_re[:, None] - x_im * low_im[:, None]).flatten(1, 2)  # [H, (b c a), N]
    z_im = (x_re * low_im[:, None] + x_im * low_re[:, None]).flatten(1, 2)
    y = 2 * (z_re @ high_re.mT - z_im @ high_im.mT)  # [H, (b c a), q]: lag t = a + P q
    # c given, not b: with an empty batch (b = 0) einops cannot infer c from 0 rows.
    return rearrange(y, "h (b c a) q -> b h c (q a)", c=cx.shape[2], a=P)[..., :T]
