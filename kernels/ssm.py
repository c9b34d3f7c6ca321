"""Convolution kernels of the state-space models used by the layers.

Diagonal SSM (S4D): x_t = dA x_{t-1} + dB u_t, y_t = 2 Re(C x_t), with N/2 complex modes per
channel standing for N real states (conjugate pairs). Unrolled, y = K * u with
K[l] = 2 Re sum_n C_n dB_n dA_n^l - a Vandermonde product.

Shift SSM (H3): A is the shift matrix, so the state is the last N inputs and the kernel is a
learned FIR filter of N taps.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from einops import rearrange

from kernels.double_backward import reference_grads

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
        dB = torch.expm1(dtA) / A  # not dA - 1: it cancels to 0 in fp32 for |dt A| < 6e-8
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
    if L < 1:
        raise ValueError(f"s4d_kernel: the kernel length L must be >= 1, got {L}")
    if method not in DISCRETIZATIONS:  # S4DKernel and log_dA read anything but "zoh" as bilinear
        raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {method!r}")
    return S4DKernel.apply(dt, A, B, C, L, method)


class S4DKernel(torch.autograd.Function):
    """s4d_kernel as one autograd node with a hand-written backward: the discretisation, log dA
    and the Vandermonde product run without autograd, and backward writes out their chain rule.

    Vandermonde product: K[h, l] = 2 Re sum_n w[h, n] z[h, n]^l for l < L, with w = C dB and z
    = dA = exp(lam), lam = log dA (:func:`log_dA`). Write l = a + P b with P ~ sqrt(L): K[a + P
    b] = 2 Re sum_n (w_n z_n^a) z_n^(P b), a [Q, 2N] x [2N, P] matmul per channel on the real
    views of the complex factors, so that powers are needed for only P + Q ~ 2 sqrt(L) lags.
    They come from one call (:func:`_powers_at`, lags 0 .. P-1 then 0, P, .. (Q-1) P) as one
    complex tensor E [H, P + Q, N]; dA itself is its row 1 (hence P >= 2). The real views'
    dot product over (n, re / im) is sum Re(x) Re(y) + Im(x) Im(y) = Re(conj(x) y), so the
    low factor enters conjugated, and the result comes out as [H, Q, P], K in order.

    Backward, for g = dloss/dK and in conjugate form (ĝ = conj(dloss/dz) for complex z, torch's
    convention being dloss/dRe + i dloss/dIm; through a holomorphic f, ĝ_z = f'(z) ĝ_f, no
    conjugates): ĝ_w = 2 S0 and ĝ_z = 2 w S1 with S0 = sum_l g_l z^l and S1 = dS0/dz = sum_l
    (l + 1) g_(l+1) z^l (not through lam = log z: dlam/dz = 1/z is infinite where a bilinear
    dA is 0, at dt A = -2), both from the transposed product over the same grid of lags (one
    matmul per channel, then a complex product with the high powers summed over b). Then the
    chain rule to dt, A, B, C (:meth:`_parameter_grads`). Left to autograd, the Vandermonde
    product's dozen [H, N, sqrt(L)] ops took 6.0 ms of an H3 layer's 9 ms fwd+bwd at width 256,
    L = 64 on CPU. At the tasks' sizes (H = 64, N = 32, L = 20) the op count is what costs (a
    small op is 4-15 us on CPU, a complex exp of [64, 32] 112 us, a product with a strided .real
    view 4x a contiguous one): a DiagonalSSM's filter from its parameters now takes 24 ops
    forward and 35 backward, against 47 and 53 in the previous form.
    Computed in the inputs' precision with autocast off: a bf16 filter would lose its tail.
    """

    @staticmethod
    def forward(ctx, dt, A, B, C, L: int, method: str):
        P = max(2, math.isqrt(L - 1) + 1)
        Q = -(-L // P)
        with torch.autocast(dt.device.type, enabled=False):
            lags, _ = _kernel_lags(P, Q, L, dt.dtype, dt.device)
            E = torch.complex(*_powers_at(log_dA(dt, A, method), lags, (Q - 1) * P))
            low, high = E[:, :P], E[:, P:]  # z^a [H, P, N], z^(P b) [H, Q, N]
            if method == "zoh":
                y = None
                p = torch.expm1(dt[:, None] * A) / A  # dB without B, no cancellation
            else:
                y = 1 - (dt[:, None] / 2) * A  # 1 - dt A / 2
                p = dt[:, None] / y
            cb = C if B is None else C * B
            w = cb * p
            x = torch.mul(w[:, None], low).conj_physical_()  # conj(w z^a): [H, P, N]
            k = torch.bmm(_pairs(high), _pairs(x).mT)
            k.mul_(2)  # [H, Q, P]: K[a + P b] at [b, a]
        ctx.save_for_backward(dt, A, B, C, cb, p, w, y, E)
        ctx.L, ctx.P, ctx.method = L, P, method
        return k.view(k.shape[0], P * Q)[:, :L]

    @staticmethod
    def backward(ctx, g):
        dt, A, B, C, cb, p, w, y, E = ctx.saved_tensors
        L, P = ctx.L, ctx.P
        if torch.is_grad_enabled():  # create_graph=True: kernels.double_backward
            inputs = (dt, A, B, C, L, ctx.method)
            return reference_grads(_kernel_reference, inputs, ctx.needs_input_grad, g)
        H, PQ, N = E.shape
        Q = PQ - P
        with torch.autocast(g.device.type, enabled=False):
            _, lags = _kernel_lags(P, Q, L, dt.dtype, dt.device)
            # g_l and (l + 1) g_(l+1), zero past their ends
            grid = g.new_zeros((H, 2, Q * P), dtype=dt.dtype)
            grid[:, 0, :L] = g
            torch.mul(g[:, 1:], lags[1:], out=grid[:, 1, : L - 1])
            low, high = E[:, :P], E[:, P:]
            # sum_a grid[c, b, a] z^a as complex [H, 2, Q, N], then times z^(P b), summed over b
            t = torch.bmm(grid.view(H, 2 * Q, P), _pairs(low))
            s = (torch.view_as_complex(t.view(H, 2, Q, N, 2)) * high[:, None]).sum(2)
            s.mul_(2)  # [H, 2, N]: 2 S0, 2 S1
            grad_w, grad_z = s[:, 0], w * s[:, 1]
            return S4DKernel._parameter_grads(
                ctx.method, dt, A, B, C, cb, p, y, E[:, 1], grad_w, grad_z
            )

    @staticmethod
    def _parameter_grads(method, dt, A, B, C, cb, p, y, dA, grad_w, grad_z):
        """(d dt, d A, d B, d C, None, None) from the conjugate-form gradients of w = C B p(dt,
        A) and z = dA(dt, A), p being dB without B; dt is real, so its gradient is the real
        part, summed over the modes. With x = dt A, ĝ_x = dz/dx ĝ_z: zoh: dA = e^x, dz/dx = dA,
        p = (dA - 1) / A, so dp/dA = (dt dA - p) / A = dt^2 psi(x) (_zoh_psi), dp/ddt = dA.
        bilinear: y = 1 - x/2, dA = (1 + x/2) / y, dz/dx = 1 / y^2, p = dt / y, so dp/dA = dt^2
        / (2 y^2) = p^2 / 2 and dp/ddt = 1 / y^2."""
        dt = dt[:, None]
        grad_p = cb * grad_w
        if method == "zoh":
            grad_x = dA * grad_z
            grad_A = torch.addcmul(dt * dt * _zoh_psi(dt * A, dt, dA, p) * grad_p, dt, grad_x)
            grad_dt = dA * grad_p + A * grad_x
        else:
            inv_y2 = (1 / y).square_()
            grad_x = inv_y2 * grad_z
            grad_A = torch.addcmul(p * p / 2 * grad_p, dt, grad_x)
            grad_dt = torch.addcmul(inv_y2 * grad_p, A, grad_x)
        grad_B = None if B is None else (C * p * grad_w).conj_physical_()
        pb = p if B is None else p * B
        return (
            grad_dt.real.sum(-1),
            grad_A.conj_physical_(),
            grad_B,
            (pb * grad_w).conj_physical_(),
            None,
            None,
        )


# psi(x) = (x e^x - e^x + 1) / x^2 = sum_{m>=2} (m - 1) / m! x^(m-2): its first 12 terms.
_PSI_TERMS = [(m - 1) / math.factorial(m) for m in range(2, 14)]


def _zoh_psi(x, dt, dA, p):
    """psi(x) = (x e^x - e^x + 1) / x^2, x = dt A [H, N] complex, so that zoh's dp/dA = dt^2
    psi(x) (dA = e^x, p = (dA - 1) / A). The closed form (dt dA - p) / (dt x) cancels where
    |x| is small (relative error ~ eps / |x|^2: grad A was 5% off in fp64 at dt = A = -1e-5's
    scale, 1e6x off in fp32 at |Re A| = 1e-6); there the series, whose 12 terms are within
    1e-14 relative for |x| < 0.4, where the closed form's error is ~20 eps."""
    series = torch.full_like(x, _PSI_TERMS[-1])
    for c in reversed(_PSI_TERMS[:-1]):
        series = series * x + c
    return torch.where(x.abs() < 0.4, series, (dt * dA - p) / (dt * x))


def _kernel_reference(dt, A, B, C, L: int, method: str) -> torch.Tensor:
    """s4d_kernel's result [H, L] in plain torch ops (the whole [H, L, N] Vandermonde matrix),
    which a double backward differentiates (kernels.double_backward)."""
    dA, dB = s4d_discretize(dt, A, B, method)
    z_re, z_im = dA_powers(log_dA(dt, A, method), L, dA=dA)  # dA^l: [H, L, N]
    w = C * dB
    return 2 * (z_re * w.real[:, None] - z_im * w.imag[:, None]).sum(-1)


def _pairs(z: torch.Tensor) -> torch.Tensor:
    """complex [..., N] -> its real view [..., 2N], (re, im) pairs (no copy)."""
    return torch.view_as_real(z).flatten(-2)


@lru_cache(maxsize=64)
def _kernel_lags(P: int, Q: int, L: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """S4DKernel's lags: [P + Q, 1] (0 .. P-1, then 0, P, .. (Q-1) P) and [L] (0 .. L-1), made
    once per shape: each arange is an op, and the filter is made on every training step.
    Outside inference mode, so that a tensor made during generation serves training later."""
    with torch.inference_mode(False):
        a = torch.arange(max(P, L), dtype=dtype, device=device)
        return torch.cat([a[:P], a[:Q] * P])[:, None], a[:L]


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
    logs = log_dA(dt, A, method)
    low_re, low_im = dA_powers(logs, P, dA=dA)  # dA^a, a < P
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
    # |1 + x|^2 is 0 where dt A = -2 exactly (dA = 0, reachable by a mode with Im A = 0); its
    # log would be -inf, and lag 0's exponent 0 * -inf NaN for the whole channel. Floored at
    # the smallest normal, dA^l for l >= 1 is off by at most sqrt(tiny) (1e-19 in fp32).
    num = ((1 + a) ** 2 + b**2).clamp_min(torch.finfo(a.dtype).tiny)
    log_abs = 0.5 * torch.log(num / ((1 - a) ** 2 + b**2))
    return log_abs, torch.atan2(b, 1 + a) - torch.atan2(-b, 1 - a)


def dA_powers(
    log_dA: tuple[torch.Tensor, torch.Tensor],
    n: int,
    step: int = 1,
    dA: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of dA^l for l = 0, step, .. (n-1) step, each [H, n, N] real,
    from ``log_dA`` (:func:`log_dA`). Given ``dA`` itself, lag 1 is taken from it: through the
    log its gradient is lost where dA = 0 (|dA| has a kink there; dA^l, l >= 2, has none)."""
    lags = torch.arange(n, device=log_dA[0].device, dtype=log_dA[0].dtype) * step
    re, im = _powers_at(log_dA, lags[:, None], (n - 1) * step)
    if dA is None or step != 1 or n < 2:
        return re, im
    return (
        torch.cat([re[:, :1], dA.real[:, None], re[:, 2:]], 1),
        torch.cat([im[:, :1], dA.imag[:, None], im[:, 2:]], 1),
    )


def _powers_at(
    log_dA: tuple[torch.Tensor, torch.Tensor], lags: torch.Tensor, max_lag: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of dA^l for the lags [n, 1] (at most ``max_lag``), each [H, n,
    N] real.

    dA^l = exp(l Re log dA) (cos + i sin)(l Im log dA), in real arithmetic: one real exp,
    cos and sin per (mode, lag) vectorise on CPU where a complex exp does not (~10x faster),
    and the Vandermonde matrix is built in parallel with an exact gradient. Modes last: a
    product broadcast along the last dimension ran 3.5x slower on CPU than along a middle one
    ([256, 32, 8]: 78 against 22 us).
    """
    log_re, log_im = log_dA
    exponent = lags * log_re[:, None]
    # On CPU, magnitudes below sqrt(smallest normal) (1e-19 in fp32) are set to 0: products of
    # smaller ones are denormals, which x86 multiplies ~20x slower. They made the Vandermonde
    # matmul of S4DKernel 13-20x slower (L = 4K, H = 256, 32 modes: 13-21 ms against ~1 ms),
    # for terms 12 orders of magnitude below the float32 rounding of the kernel's taps. Only
    # when the smallest can be that small: the check costs an op and a read-back. (GPUs
    # multiply denormals at full speed, and a check there would synchronise.) threshold_ is
    # one pass where a mask and masked_fill_ were two.
    limit = 0.5 * math.log(torch.finfo(exponent.dtype).tiny)
    if log_re.device.type == "cpu" and log_re.min().item() * max_lag < limit:
        F.threshold_(exponent, limit, -math.inf)
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
