"""Diagonal-SSM convolution in chunks with the state carried between them: exact, O(L).

For y = K * v + D v with K[l] = 2 Re sum_n C_n dB_n dA_n^l (kernels.s4d_kernel), split v into
chunks of T samples. With x the complex SSM state [B, H, N] after the previous chunk,

    y_c = conv_T(v_c) + D v_c + 2 Re(M_xy x_{c-1}),   M_xy[j, n] = C_n dA_n^(j+1)
    x_c = dA^T x_{c-1} + M_ux v_c,                    M_ux[n, i] = dB_n dA_n^(T-1-i)

where conv_T uses the filter truncated to T taps (kernels.fftconv, so the fastest method for a
chunk). M_xy and M_ux are Vandermonde matrices; they are applied as real matmuls (real and
imaginary parts stacked), so the work is O(L (log T + N)) and the memory O(B H T) per chunk
instead of an FFT of the whole sequence. Differentiable by autograd in every argument.
Layers use it beyond kernels.STATE_PASSING_LEN, with chunks of that length: linear in L, and
no length-L filter or spectrum in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from kernels.fftconv import fftconv
from kernels.ssm import dA_powers, log_dA, s4d_discretize, s4d_state


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
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    L = u.shape[-1]
    T = min(chunk, L)
    chunks = -(-L // T)
    v = u.to(dtype) if pregate is None else u.to(dtype) * pregate
    # Filter, states and their sums in fp32 (fp64) even under autocast: bf16 would lose the
    # long tail of the state's sum (and torch.complex takes no bf16).
    with torch.autocast(u.device.type, enabled=False):
        _, dB = s4d_discretize(dt, A, B, method)
        p_re, p_im = dA_powers(log_dA(dt, A, method), T + 1)  # dA^0 .. dA^T, [H, T+1, N] each
        # Real arithmetic on the [H, T, N] Vandermonde factors (a complex [H, N, T] product and its
        # backward were ~14x slower on CPU; kernels.ssm.dA_powers says why), einsums over n.
        w = C * dB
        k = 2 * (
            torch.einsum("hn,htn->ht", w.real, p_re[:, :T])
            - torch.einsum("hn,htn->ht", w.imag, p_im[:, :T])
        )  # the filter's first T taps
        decay = torch.complex(p_re[:, T], p_im[:, T])  # dA^T: [H, N]

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
        # y from the entering state x: 2 Re sum_n C_n dA_n^(t+1) x_n, as real einsums.
        cx = C[:, None] * torch.stack(before, dim=2)  # [B, H, c, N]
        from_state = 2 * (
            torch.einsum("bhcn,htn->bhct", cx.real.to(dtype), p_re[:, 1:].to(dtype))
            - torch.einsum("bhcn,htn->bhct", cx.imag.to(dtype), p_im[:, 1:].to(dtype))
        )
    y = rearrange(local + from_state, "b h c t -> b h (c t)")[..., :L]
    return (y * postgate if postgate is not None else y).to(u.dtype)
