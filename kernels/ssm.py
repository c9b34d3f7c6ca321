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
    return S4DKernel.apply(dt, A, B, C, L, method)


class S4DKernel(torch.autograd.Function):
    """s4d_kernel as one autograd node with a hand-written backward: the discretisation, log dA
    and the Vandermonde product run without autograd, and backward writes out their chain rule.

    Vandermonde product: K[h, l] = 2 Re sum_n w[h, n] exp(l lam[h, n]) for l < L, with w = C dB
    and lam = log dA (:func:`log_dA`, real and imaginary parts). Write l = a + P b with P ~
    sqrt(L), so exp(l lam) = exp(a lam) exp(P b lam) and K[a + P b] = 2 Re sum_n (w_n exp(a
    lam_n)) exp(P b lam_n), a [P, N] x [N, Q] matmul per channel: powers for only ~2 sqrt(L)
    lags instead of L. Its backward, for g = dloss/dK: dloss/dw = 2 conj(sum_l g_l exp(l lam))
    and dloss/dlam = 2 conj(w sum_l l g_l exp(l lam)) (torch's convention for a real loss of
    complex inputs: dloss/dRe + i dloss/dIm), both sums the transposed product over the same
    grid of lags, one matmul per channel with the real powers and one with the imaginary.
    Then the chain rule to dt, A, B, C (:meth:`_parameter_grads`). Left to autograd, the
    Vandermonde product's dozen [H, N, sqrt(L)] ops took 6.0 ms of an H3 layer's 9 ms fwd+bwd
    at width 256, L = 64 on CPU, and the discretisation and log dA another ~60 small autograd
    ops (with complex-real conversions) per fwd+bwd.
    Computed in the inputs' precision with autocast off: a bf16 filter would lose its tail.
    """

    @staticmethod
    def forward(ctx, dt, A, B, C, L: int, method: str):
        P = math.isqrt(L - 1) + 1
        Q = -(-L // P)
        with torch.autocast(dt.device.type, enabled=False):
            dA, p = s4d_discretize(dt, A, None, method)  # p: dB without B, for backward
            w = C * (p if B is None else p * B)
            lam = log_dA(dt, A, method)
            low = dA_powers(lam, P)  # exp(a lam), a < P: [H, P, N] re, im
            high = dA_powers(lam, Q, step=P)  # exp(P b lam), b < Q: [H, Q, N]
            # w's parts copied out of the complex tensor: products with strided views are slow.
            w_re, w_im = w.real.contiguous()[:, None], w.imag.contiguous()[:, None]  # [H, 1, N]
            x_re = (w_re * low[0]).sub_(w_im * low[1])  # w exp(a lam)
            x_im = (w_re * low[1]).add_(w_im * low[0])
            k = (x_re @ high[0].mT).sub_(x_im @ high[1].mT).mul_(2)  # [H, P, Q]: K[a + P b]
        ctx.save_for_backward(dt, A, B, C, dA, p, w, *low, *high)
        ctx.L, ctx.method = L, method
        return k.mT.reshape(k.shape[0], P * Q)[:, :L]

    @staticmethod
    def backward(ctx, g):
        dt, A, B, C, dA, p, w, low_re, low_im, high_re, high_im = ctx.saved_tensors
        H, P, N = low_re.shape
        Q, L = high_re.shape[1], ctx.L
        with torch.autocast(g.device.type, enabled=False):
            g = g.to(low_re.dtype)
            lags = torch.arange(L, device=g.device, dtype=g.dtype)
            coeffs = torch.stack([g, g * lags], dim=1)  # [H, 2, L]: g_l and l g_l
            grid = F.pad(coeffs, (0, P * Q - L)).view(H, 2 * Q, P)  # [h, (c, b), a]
            # sum_a grid[c, b, a] exp(a lam_n), then sum_b exp(P b lam_n) times that.
            t_re = (grid @ low_re).view(H, 2, Q, N)
            t_im = (grid @ low_im).view(H, 2, Q, N)
            hi_re, hi_im = high_re[:, None], high_im[:, None]  # [H, 1, Q, N]
            s_re = (t_re * hi_re).sub_(t_im * hi_im).sum(2)  # [H, 2, N]: sum_l g_l z^l and
            s_im = (t_re * hi_im).add_(t_im * hi_re).sum(2)  # sum_l l g_l z^l, z = exp(lam)
            grad_w = torch.complex(2 * s_re[:, 0], -2 * s_im[:, 0])
            grad_lam = 2 * (w * torch.complex(s_re[:, 1], s_im[:, 1])).conj()
            return S4DKernel._parameter_grads(ctx.method, dt, A, B, C, dA, p, grad_w, grad_lam)

    @staticmethod
    def _parameter_grads(method, dt, A, B, C, dA, p, grad_w, grad_lam):
        """(d dt, d A, d B, d C, None, None) from the gradients of w = C B p(dt, A) and lam(dt,
        A), p being dB without B: for a holomorphic f, the gradient of its argument is conj(f')
        times f's (torch's convention); dt is real, so its gradient is the real part, summed
        over the modes. With x = dt A: zoh: lam = x, dA = e^x, p = (dA - 1) / A, so dp/dA =
        (dt dA - p) / A, dp/ddt = dA. bilinear: y = 1 - x/2, dA = (1 + x/2) / y, p = dt / y,
        lam = log dA, so dp/dA = dt^2 / (2 y^2) = p^2 / 2, dp/ddt = 1 / y^2 = (p / dt)^2 and
        dlam/dx = 1 / ((1 + x/2) y) = (p / dt)^2 / dA."""
        dt = dt[:, None]
        if method == "zoh":
            dp_dA, dp_ddt, dlam_dx = (dt * dA - p) / A, dA, None
        else:
            dp_ddt = (p / dt) ** 2
            dp_dA, dlam_dx = p * p / 2, dp_ddt / dA
        cb = C if B is None else C * B
        grad_p = cb.conj() * grad_w
        grad_A = dp_dA.conj() * grad_p
        dt_terms = dp_ddt.conj() * grad_p
        lam_dA = dt if dlam_dx is None else dt * dlam_dx
        lam_ddt = A if dlam_dx is None else A * dlam_dx
        grad_A = grad_A + lam_dA.conj() * grad_lam
        grad_dt = (dt_terms + lam_ddt.conj() * grad_lam).real.sum(-1)
        pb = p if B is None else p * B
        grad_B = None if B is None else (C * p).conj() * grad_w
        return grad_dt, grad_A, grad_B, pb.conj() * grad_w, None, None


def s4d_state(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor | None, method: str = "zoh"
) -> torch.Tensor:
    """State after a diagonal SSM has read u from the zero state: x_L = sum_s dA^(L-1-s) dB u_s.

    The transpose of :func:`s4d_kernel` (the same Vandermonde matrix, applied to the input
    reversed in time), computed in parallel with the same split of the lags.

    Args: u [batch, H, L] real, L >= 1; dt [H]; A, B [H, N] complex (B may be None); method.
    Returns: complex [batch, H, N], in the precision of dt.
    """
    _, dB = s4d_discretize(dt, A, B, method)
    L = u.shape[-1]
    # Lag l = L-1-s = a + P b with P ~ sqrt(L): x = dB sum_b (dA^P)^b sum_a dA^a u_{L-1-a-Pb},
    # an [L/P, P] x [P, N] matmul per channel, then a sum over the L/P blocks.
    P = math.isqrt(L - 1) + 1
    Q = -(-L // P)
    logs = log_dA(dt, A, method)
    low_re, low_im = dA_powers(logs, P)  # dA^a, a < P
    high_re, high_im = dA_powers(logs, Q, step=P)  # dA^(P b), b < Q
    newest_first = F.pad(u.flip(-1).to(low_re.dtype), (0, P * Q - L))  # zeros: lags >= L
    # The sum over a as a real batched matmul, [x q, P] @ [P, 2N] per channel with the real
    # and imaginary parts of dA^a side by side; the sum over b of the complex products with
    # dA^(P b) elementwise, on views of its [x, H, Q, N] parts. (A bmm per (channel, mode) of
    # [x, 2Q] @ [2Q, 2] did that before: its backward ran the tiny matrices one by one, 22 of
    # the 200 ms of a chunked fwd+bwd at H = 128, 32 modes, L = 16K.)
    lagged = rearrange(newest_first, "x h (q p) -> h (x q) p", p=P)
    low = torch.cat([low_re, low_im], dim=2)  # [H, P, 2N]
    # In dt's precision even under autocast: a bf16 state would lose the long tail of the sum
    # (and torch.complex takes no bf16).
    with torch.autocast(u.device.type, enabled=False):
        part_re, part_im = rearrange(
            torch.bmm(lagged, low), "h (x q) (c n) -> c x h q n", q=Q, c=2
        )  # sum_a u dA^a: [x, H, Q, N] each
        x_re = (part_re * high_re).sub_(part_im * high_im).sum(2)  # [x, H, N]
        x_im = (part_re * high_im).add_(part_im * high_re).sum(2)
    return dB * torch.complex(x_re, x_im)


def log_dA(dt: torch.Tensor, A: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A logarithm of the discrete dA, as real and imaginary parts, each [H, N] real.

    zoh: dA = exp(dt A), so dt A. bilinear: dA = (1 + x) / (1 - x) with x = dt A / 2, so
    log|1 + x| - log|1 - x| + i (arg(1 + x) - arg(1 - x)), not always the principal branch,
    which is no matter: dA^l = exp(l log dA) for integer l whatever the branch. In real
    arithmetic because torch's complex log is slow on CPU (0.55 ms for [256, 32] complex64,
    these real ops 27 us) and its backward more so.
    """
    a, b = dt[:, None] * A.real, dt[:, None] * A.imag
    if method == "zoh":
        return a, b
    a, b = a / 2, b / 2
    log_abs = 0.5 * torch.log(((1 + a) ** 2 + b**2) / ((1 - a) ** 2 + b**2))
    return log_abs, torch.atan2(b, 1 + a) - torch.atan2(-b, 1 - a)


def dA_powers(
    log_dA: tuple[torch.Tensor, torch.Tensor], n: int, step: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of dA^l for l = 0, step, .. (n-1) step, each [H, n, N] real,
    from ``log_dA`` (:func:`log_dA`).

    dA^l = exp(l Re log dA) (cos + i sin)(l Im log dA), in real arithmetic: one real exp,
    cos and sin per (mode, lag) vectorise on CPU where a complex exp does not (~10x faster),
    and the Vandermonde matrix is built in parallel with an exact gradient. Modes last: a
    product broadcast along the last dimension ran 3.5x slower on CPU than along a middle one
    ([256, 32, 8]: 78 against 22 us).
    """
    log_re, log_im = log_dA
    lags = (torch.arange(n, device=log_re.device, dtype=log_re.dtype) * step)[:, None]
    exponent = lags * log_re[:, None]
    # On CPU, magnitudes below sqrt(smallest normal) (1e-19 in fp32) are set to 0: products of
    # smaller ones are denormals, which x86 multiplies ~20x slower. They made the Vandermonde
    # matmul of S4DKernel 13-20x slower (L = 4K, H = 256, 32 modes: 13-21 ms against ~1 ms),
    # for terms 12 orders of magnitude below the float32 rounding of the kernel's taps. Only
    # when the smallest can be that small: the masking itself cost ~0.1 ms at L = 64. (GPUs
    # multiply denormals at full speed, and a check there would synchronise.)
    limit = 0.5 * math.log(torch.finfo(exponent.dtype).tiny)
    if log_re.device.type == "cpu" and log_re.min().item() * (n - 1) * step < limit:
        exponent.masked_fill_(exponent < limit, -math.inf)
    # In place where autograd allows (exp's backward uses its output, mul's its operands):
    # each [H, n, N] temporary not allocated is one fewer fresh buffer to fault in.
    magnitude = exponent.exp_()
    phase = lags * log_im[:, None]
    return torch.cos(phase).mul_(magnitude), torch.sin(phase).mul_(magnitude)


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
