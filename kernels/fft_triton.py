"""Fused FFT convolution in Triton: one kernel per direction, nothing in between leaves chip.

Shapes as in kernels.fft_torch: u, pregate, postgate [B, H, L]; k [H, K] fp32 with the skip
term D folded into tap 0. Inputs may be fp32, fp16 or bf16; the math is fp32, with tl.dot
operands at DOT_PRECISION for the input dtype.

The DFT of size n = n1 * n2 (powers of two, n >= L + K - 1, n >= 256 so that every matrix is
at least 16 x 16 for tl.dot) is one Cooley-Tukey step written as matrix products (Monarch
form): a row-major [n1, n2] tile x of the signal becomes
    Y = ((F1 @ x) * tw) @ F2,   Y[f1, f2] = xhat[f1 + n1 f2],
with F1, F2 the DFT matrices of sizes n1, n2 and tw[f1, t2] = w_n^(f1 t2); real and imaginary
parts are separate fp32 tiles, so a complex product is a few real tl.dot calls. The inverse
runs the same steps backwards with conjugates. The filter spectrum is computed once per forward
(torch.fft on [H, n]), stored in the Y layout, shared by every batch row and kept for backward.

Fused length limit: n <= MAX_FUSED_FFT = 4096, i.e. L + K - 1 <= 4096 (L <= 2048 if K = L):
the [n1, n2] tiles and the six DFT matrices live in registers and shared memory, and on an
H100 (227 KiB of shared memory per block) the backward kernel asked for 352-384 KiB at
n = 8192 and the forward for 256 KiB at 16384 (benchmarks/results/triton_gpu_h100_call1.json).
Longer sequences go to the blocked decomposition (kernels.blocked, pieces of this kernel) or,
for SSM filters, to state passing (layers). A three-stage DFT (n = A B C, tile permutes between
the stages) was tried for larger n and asked for even more (commit 66bde8a, and
triton_gpu_h100_call2.json).
Runs under TRITON_INTERPRET=1 on CPU tensors, which is how the tests check it.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import triton
import triton.language as tl

from kernels.fft_sizes import MAX_FUSED_FFT
from kernels.fft_torch import backward_inputs

_MIN_FFT = 256

# tl.dot operand precision by input dtype, and warps per program by FFT size. "ieee": fp32
# FMAs, no tensor cores (22.6 ms vs tf32's 0.51 ms forward at B=16, H=768, L=K=1024 bf16 on
# an H100); "tf32x3": three tf32 tensor-core products, about fp32 accuracy (1.84 ms there;
# relative error ~5e-7); "tf32": one, operands rounded to 10 mantissa bits (relative error
# 2-3e-3 for fp16/bf16 inputs, whose own rounding is 5e-4 / 4e-3). Warps: 4 beat 8 at n <= 4096
# (0.51 vs 0.68 ms at n = 2048, 0.92 vs 1.56 at 4096). benchmarks/results/triton_gpu*.json.
# Module attributes so that benchmarks/triton_gpu.py can time the alternatives.
DOT_PRECISION = {torch.float32: "tf32x3", torch.float16: "tf32", torch.bfloat16: "tf32"}
NUM_WARPS = 4


def launch_options(dtype: torch.dtype) -> dict:
    """The tl.dot precision and the warp count of a launch for inputs of ``dtype``."""
    return {"P": DOT_PRECISION[dtype], "num_warps": NUM_WARPS}


def fft_size(L: int, K: int) -> tuple[int, int]:
    """(n1, n2) with n1 * n2 the power-of-two FFT size for length L and K taps, n1 >= n2."""
    n = max(_MIN_FFT, 1 << (L + K - 2).bit_length())
    if n > MAX_FUSED_FFT:
        raise ValueError(
            f"fftconv[triton]: L + K - 1 = {L + K - 1} exceeds the fused {MAX_FUSED_FFT}"
        )
    n2 = 1 << (int(math.log2(n)) // 2)
    return n // n2, n2


@cache
def _dft_matrices(n1: int, n2: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """F1 (re, im) [n1, n1], F2 (re, im) [n2, n2], twiddles (re, im) [n1, n2]; fp32 from fp64."""

    def expi(angle):  # exp(-i angle), computed in fp64 and rounded once
        return torch.cos(angle).float().to(device), (-torch.sin(angle)).float().to(device)

    a1 = torch.arange(n1, dtype=torch.float64)
    a2 = torch.arange(n2, dtype=torch.float64)
    n = n1 * n2
    return (
        *expi(2 * math.pi * torch.outer(a1, a1) / n1),
        *expi(2 * math.pi * torch.outer(a2, a2) / n2),
        *expi(2 * math.pi * torch.outer(a1, a2) / n),
    )


def _filter_spectrum(k: torch.Tensor, n1: int, n2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fft(k, n) in the kernel's layout [H, n1, n2] (entry [f1, f2] = khat[f1 + n1 f2])."""
    k_f = torch.fft.fft(k.double(), n=n1 * n2)
    k_f = k_f.reshape(k.shape[0], n2, n1).transpose(1, 2).contiguous()
    return k_f.real.float(), k_f.imag.float()


@triton.jit
def _load_square(ptr, R: tl.constexpr, C: tl.constexpr):
    return tl.load(ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])


@triton.jit
def _dft(x, f1r, f1i, f2r, f2i, twr, twi, P: tl.constexpr):
    """Spectrum (re, im) in the [f1, f2] layout of a real row-major [n1, n2] tile; P is the
    tl.dot input precision."""
    ar = tl.dot(f1r, x, input_precision=P)
    ai = tl.dot(f1i, x, input_precision=P)
    br = ar * twr - ai * twi
    bi = ar * twi + ai * twr
    yr = tl.dot(br, f2r, input_precision=P) - tl.dot(bi, f2i, input_precision=P)
    yi = tl.dot(br, f2i, input_precision=P) + tl.dot(bi, f2r, input_precision=P)
    return yr, yi


@triton.jit
def _idft_real(zr, zi, f1r, f1i, f2r, f2i, twr, twi, n, P: tl.constexpr):
    """Real part of the inverse DFT of a [f1, f2]-layout spectrum, as a row-major tile."""
    br = tl.dot(zr, f2r, input_precision=P) + tl.dot(zi, f2i, input_precision=P)
    bi = tl.dot(zi, f2r, input_precision=P) - tl.dot(zr, f2i, input_precision=P)
    cr = br * twr + bi * twi
    ci = bi * twr - br * twi
    return (tl.dot(f1r, cr, input_precision=P) + tl.dot(f1i, ci, input_precision=P)) / n


@triton.jit
def _forward_kernel(
    u_ptr, pre_ptr, post_ptr, kr_ptr, ki_ptr, mats_ptr, y_ptr, B, H, L,
    N1: tl.constexpr, N2: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
    P: tl.constexpr,
):  # fmt: skip
    # Consecutive programs take the batch rows of one channel, which share its spectrum: it
    # is read from HBM once and from L2 after.
    h = tl.program_id(0) // B
    row = (tl.program_id(0) % B) * H + h
    t = tl.arange(0, N1)[:, None] * N2 + tl.arange(0, N2)[None, :]
    mask = t < L
    offs = row * L + t
    v = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:
        v *= tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    f1r, f1i, f2r, f2i, twr, twi = _load_mats(mats_ptr, N1, N2)
    kr = tl.load(kr_ptr + h * N1 * N2 + t)
    ki = tl.load(ki_ptr + h * N1 * N2 + t)
    vr, vi = _dft(v, f1r, f1i, f2r, f2i, twr, twi, P)
    z = _idft_real(vr * kr - vi * ki, vr * ki + vi * kr, f1r, f1i, f2r, f2i, twr, twi, N1 * N2, P)
    if HAS_POST:
        z *= tl.load(post_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_mats(mats_ptr, N1: tl.constexpr, N2: tl.constexpr):
    """The six DFT tiles, packed one after another in mats_ptr (see _packed_matrices)."""
    f1r = _load_square(mats_ptr, N1, N1)
    f1i = _load_square(mats_ptr + N1 * N1, N1, N1)
    f2r = _load_square(mats_ptr + 2 * N1 * N1, N2, N2)
    f2i = _load_square(mats_ptr + 2 * N1 * N1 + N2 * N2, N2, N2)
    twr = _load_square(mats_ptr + 2 * N1 * N1 + 2 * N2 * N2, N1, N2)
    twi = _load_square(mats_ptr + 2 * N1 * N1 + 2 * N2 * N2 + N1 * N2, N1, N2)
    return f1r, f1i, f2r, f2i, twr, twi


@triton.jit
def _backward_kernel(
    u_ptr, pre_ptr, post_ptr, gy_ptr, kr_ptr, ki_ptr, mats_ptr,
    gu_ptr, gpre_ptr, gpost_ptr, gk_ptr, H, L, K, B: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
    NEED_U: tl.constexpr, NEED_PRE: tl.constexpr, NEED_POST: tl.constexpr, NEED_K: tl.constexpr,
    P: tl.constexpr,
):  # fmt: skip
    # One program per channel: it loops over the batch, so the filter spectrum is loaded once
    # and dk's spectrum (a sum over the batch) accumulates in registers.
    h = tl.program_id(0)
    t = tl.arange(0, N1)[:, None] * N2 + tl.arange(0, N2)[None, :]
    mask = t < L
    f1r, f1i, f2r, f2i, twr, twi = _load_mats(mats_ptr, N1, N2)
    kr = tl.load(kr_ptr + h * N1 * N2 + t)
    ki = tl.load(ki_ptr + h * N1 * N2 + t)
    acc_r = tl.zeros((N1, N2), dtype=tl.float32)
    acc_i = tl.zeros((N1, N2), dtype=tl.float32)
    for b in range(B):
        offs = (b * H + h) * L + t
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = u
        if HAS_PRE:
            pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            v = u * pre
        gz = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_POST or NEED_K:
            vr, vi = _dft(v, f1r, f1i, f2r, f2i, twr, twi, P)
        if NEED_POST:  # z is recomputed, never stored
            z = _idft_real(
                vr * kr - vi * ki, vr * ki + vi * kr, f1r, f1i, f2r, f2i, twr, twi, N1 * N2, P
            )
            tl.store(gpost_ptr + offs, (gz * z).to(gpost_ptr.dtype.element_ty), mask=mask)
        if HAS_POST:
            gz *= tl.load(post_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gr, gi = _dft(gz, f1r, f1i, f2r, f2i, twr, twi, P)
        if NEED_K:  # dk = sum_b corr(gz, v): spectrum gz_hat * conj(v_hat)
            acc_r += gr * vr + gi * vi
            acc_i += gi * vr - gr * vi
        if NEED_U or NEED_PRE:  # dv = corr(gz, k): spectrum gz_hat * conj(k_hat)
            gv = _idft_real(
                gr * kr + gi * ki, gi * kr - gr * ki, f1r, f1i, f2r, f2i, twr, twi, N1 * N2, P
            )
            if NEED_U:
                gu = gv * pre if HAS_PRE else gv
                tl.store(gu_ptr + offs, gu.to(gu_ptr.dtype.element_ty), mask=mask)
            if NEED_PRE:
                tl.store(gpre_ptr + offs, (gv * u).to(gpre_ptr.dtype.element_ty), mask=mask)
    if NEED_K:
        gk = _idft_real(acc_r, acc_i, f1r, f1i, f2r, f2i, twr, twi, N1 * N2, P)
        tl.store(gk_ptr + h * K + t, gk, mask=t < K)


@cache
def _packed_matrices(n1: int, n2: int, device: torch.device) -> torch.Tensor:
    return torch.cat([m.reshape(-1) for m in _dft_matrices(n1, n2, device)])


class TritonFFTConv(torch.autograd.Function):
    """y = postgate * causal_conv(u * pregate, k); the backward kernel recomputes the forward."""

    @staticmethod
    def forward(ctx, u, k, pregate, postgate):
        B, H, L = u.shape
        n1, n2 = fft_size(L, k.shape[-1])
        u, pregate, postgate = (_contiguous(x) for x in (u, pregate, postgate))
        y = torch.empty_like(u)
        # Kept for the backward pass: [H, n] is small next to the activations it recomputes.
        ctx.spectrum = _filter_spectrum(k, n1, n2)
        _forward_kernel[(B * H,)](
            u, _or(pregate, u), _or(postgate, u), *ctx.spectrum,
            _packed_matrices(n1, n2, u.device), y, B, H, L, N1=n1, N2=n2,
            HAS_PRE=pregate is not None, HAS_POST=postgate is not None,
            **launch_options(u.dtype),
        )  # fmt: skip
        ctx.save_for_backward(u, k, pregate, postgate)
        return y

    @staticmethod
    def backward(ctx, gy):
        (u, k, pregate, postgate), needs, (g_u, g_pre, g_post) = backward_inputs(ctx)
        need_u, need_k, need_pre, need_post = needs
        B, H, L = u.shape
        K = k.shape[-1]
        n1, n2 = fft_size(L, K)
        g_k = torch.empty_like(k) if need_k else None
        _backward_kernel[(H,)](
            u, _or(pregate, u), _or(postgate, u), gy.contiguous(), *ctx.spectrum,
            _packed_matrices(n1, n2, u.device), _or(g_u, u), _or(g_pre, u), _or(g_post, u),
            _or(g_k, k), H, L, K, B=B, N1=n1, N2=n2,
            HAS_PRE=pregate is not None, HAS_POST=postgate is not None,
            NEED_U=need_u, NEED_PRE=need_pre, NEED_POST=need_post, NEED_K=need_k,
            **launch_options(u.dtype),
        )  # fmt: skip
        ctx.spectrum = None
        return g_u, g_k, g_pre, g_post


def _contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return x.contiguous() if x is not None else None


def _or(x: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """x, or a tensor the kernel never touches (the flag for x is off) in its pointer slot."""
    return x if x is not None else placeholder
