"""Convolution kernels of the state-space models used by the layers.

Diagonal SSM (S4D): x_t = dA x_{t-1} + dB u_t, y_t = 2 Re(C x_t), with N/2 complex modes per
channel standing for N real states (conjugate pairs). Unrolled, y = K * u with
K[l] = 2 Re sum_n C_n dB_n dA_n^l - a Vandermonde product.

Shift SSM (H3): A is the shift matrix, so the state is the last N inputs and the kernel is a
learned FIR filter of N taps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

DISCRETIZATIONS = ("zoh", "bilinear")


def s4d_discretize(
    dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor | None, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Discretise a diagonal continuous-time SSM.

    Args:
        dt: [H] positive step sizes (real).
        A: [H, N] complex diagonal state matrix (Re < 0).
        B: [H, N] complex input matrix, or None for all ones.
        method: "zoh" (exact for piecewise-constant input) or "bilinear" (Tustin; H3's default).

    Returns:
        dA, dB: [H, N] complex.
    """
    dtA = dt[:, None] * A
    if method == "zoh":
        dA = torch.exp(dtA)
        dB = (dA - 1) / A
    elif method == "bilinear":
        denom = 1 - dtA / 2
        dA = (1 + dtA / 2) / denom
        dB = dt[:, None] / denom
    else:
        raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {method!r}")
    if B is not None:
        dB = dB * B
    return dA, dB


def s4d_kernel(
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor | None,
    C: torch.Tensor,
    L: int,
    method: str = "zoh",
) -> torch.Tensor:
    """Convolution kernel K [H, L] = 2 Re sum_n C_n dB_n dA_n^l of a diagonal SSM.

    Args: dt [H]; A, B, C [H, N] complex (B may be None); L >= 1 kernel length.
    """
    dA, dB = s4d_discretize(dt, A, B, method)
    # Write l = a + P b with P ~ sqrt(L): dA^l = dA^a (dA^P)^b, so
    # K[a + P b] = 2 Re sum_n (w_n dA_n^a) (dA_n^P)^b is a [P, N] x [N, L/P] matmul per channel.
    # Powers are then needed for only ~2 sqrt(L) lags instead of L (the elementwise exp, cos,
    # sin over [H, N, L] and their backward dominated an H3 layer's time on CPU).
    P = math.isqrt(L - 1) + 1
    Q = -(-L // P)
    low_re, low_im = dA_powers(dt, A, dA, method, P)  # dA^a, a < P
    high_re, high_im = dA_powers(dt, A, dA, method, Q, step=P)  # dA^(P b), b < Q
    w = C * dB  # [H, N]
    x_re = w.real[..., None] * low_re - w.imag[..., None] * low_im  # w dA^a
    x_im = w.real[..., None] * low_im + w.imag[..., None] * low_re
    k = 2 * (x_re.mT @ high_re - x_im.mT @ high_im)  # [H, P, Q]: entry [a, b] is K[a + P b]
    return k.mT.reshape(k.shape[0], P * Q)[:, :L]


def s4d_state(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor | None, method: str = "zoh"
) -> torch.Tensor:
    """State after a diagonal SSM has read u from the zero state: x_L = sum_s dA^(L-1-s) dB u_s.

    The transpose of :func:`s4d_kernel` (the same Vandermonde matrix, applied to the input
    reversed in time), computed in parallel with the same split of the lags.

    Args: u [batch, H, L] real, L >= 1; dt [H]; A, B [H, N] complex (B may be None); method.
    Returns: complex [batch, H, N], in the precision of dt.
    """
    dA, dB = s4d_discretize(dt, A, B, method)
    L = u.shape[-1]
    # Lag l = L-1-s = a + P b with P ~ sqrt(L): x = dB sum_b (dA^P)^b sum_a dA^a u_{L-1-a-Pb},
    # an [L/P, P] x [P, N] matmul per channel, then a sum over the L/P blocks.
    P = math.isqrt(L - 1) + 1
    Q = -(-L // P)
    low_re, low_im = dA_powers(dt, A, dA, method, P)  # dA^a, a < P
    high_re, high_im = dA_powers(dt, A, dA, method, Q, step=P)  # dA^(P b), b < Q
    newest_first = F.pad(u.flip(-1).to(low_re.dtype), (0, P * Q - L))  # zeros: lags >= L
    # Both sums as real batched matmuls (einsum would permute [x, h, q, N] products through
    # copies): first over a, [x q, P] @ [P, 2N] per channel with the real and imaginary parts
    # of dA^a side by side; then over b, per (channel, mode), [x, 2Q] @ [2Q, 2] with the
    # complex product (part_re + i part_im)(hi_re + i hi_im) written as a real 2Q x 2 matrix.
    lagged = rearrange(newest_first, "x h (q p) -> h (x q) p", p=P)
    low = rearrange(torch.cat([low_re, low_im], dim=1), "h n p -> h p n")
    high = torch.stack(
        [torch.cat([high_re, -high_im], dim=-1), torch.cat([high_im, high_re], dim=-1)], dim=-1
    )  # [H, N, 2Q, 2]
    # In dt's precision even under autocast: a bf16 state would lose the long tail of the sum
    # (and torch.complex takes no bf16).
    with torch.autocast(u.device.type, enabled=False):
        part = rearrange(torch.bmm(lagged, low), "h (x q) (c n) -> (h n) x (c q)", q=Q, c=2)
        x = torch.bmm(part, rearrange(high, "h n q c -> (h n) q c"))
        x_re, x_im = rearrange(x, "(h n) x c -> c x h n", h=dt.shape[0])
    return dB * torch.complex(x_re, x_im)


def dA_powers(
    dt: torch.Tensor, A: torch.Tensor, dA: torch.Tensor, method: str, n: int, step: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of dA^l for l = 0, step, .. (n-1) step, each [H, N, n] real.

    dA^l = exp(l Re log dA) (cos + i sin)(l Im log dA), in real arithmetic: one real exp,
    cos and sin per (mode, lag) vectorise on CPU where a complex exp does not (~10x faster),
    and the Vandermonde matrix is built in parallel with an exact gradient.
    """
    log_dA = dt[:, None] * A if method == "zoh" else torch.log(dA)
    lags = torch.arange(n, device=dt.device, dtype=dt.dtype) * step
    magnitude = torch.exp(log_dA.real[..., None] * lags)
    phase = log_dA.imag[..., None] * lags
    return magnitude * torch.cos(phase), magnitude * torch.sin(phase)


def shift_kernel(C: torch.Tensor, B: torch.Tensor | None = None, L: int | None = None):
    """Kernel of the shift SSM: K[l] = C A^l B with A the N x N shift matrix.

    With B = e1 (H3 paper) the kernel is C itself. With a learned B (as in H3's released
    checkpoints) K[l] = sum_j C[j + l] B[j].

    Args: C [H, N]; B [H, N] or None; L: keep the first min(N, L) taps (None keeps N).
    Returns: [H, min(N, L)].
    """
    N = C.shape[-1]
    if B is not None:
        lag = torch.arange(N, device=C.device)
        idx = lag[:, None] + lag[None, :]  # [l, j] -> j + l
        valid = idx < N
        gathered = C[:, idx.clamp(max=N - 1)] * valid  # [H, l, j] = C[j + l]
        C = torch.einsum("hlj,hj->hl", gathered, B)
    return C if L is None else C[:, : min(N, L)]
