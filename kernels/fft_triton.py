"""Fused FFT convolution in Triton: one kernel per direction, nothing in between leaves chip.

Shapes as in kernels.fft_torch: u, pregate, postgate [B, H, L]; k [H, K] fp32 with the skip
term D folded into tap 0. Inputs may be fp32, fp16 or bf16; the math is fp32, the tl.dot
operands at DOT_PRECISION for the input dtype (tensor cores: tf32, or tf32x3 for fp32 inputs).

The DFT of size n (a power of two, n >= L + K - 1, n >= 256 so that every matrix is at least
16 x 16 for tl.dot) is done as matrix products (Cooley-Tukey in Monarch form), real and
imaginary parts as separate fp32 tiles. With n = A * B * C and the signal as a row-major
[A, B*C] tile x (t = t1 BC + t2 C + t3), the spectrum index f = f1 + A f2 + AB f3 and
w_m = exp(-2 pi i / m), three stages:
    1. size-A DFTs down the columns: Fa @ x, times tw1[f1, (t2, t3)] = w_n^(f1 (t2 C + t3));
    2. to [B, A*C] (a tile permute), size-B DFTs down the columns: Fb @ ., times
       tw2[f2, t3] = w_BC^(f2 t3);
    3. as [B*A, C], size-C DFTs along the rows: . @ Fc, giving Y[(f2, f1), f3].
Two stages (C = 1, Y[f1, f2] = . @ Fb) for n < THREE_LEVEL_MIN; three beyond, where two
would need [128, 128] fp32 tiles that do not fit an H100's shared memory (measured: the
two-stage forward at n = 16384 asked for 256 KiB, the backward at 8192 for 352 KiB, of the
227 KiB there are) and cost n (A + B) multiply-adds per stage pair instead of n (A + B + C).
The inverse runs the stages backwards with conjugates. The filter spectrum is computed once
per call (torch.fft on [H, n]) and stored in the Y layout, shared by every batch row; the
programs of one channel run next to each other so that it stays in L2.

Fused length limit: n <= MAX_FUSED_FFT = 16384, i.e. L + K - 1 <= 16384 (L <= 8192 if K = L).
Longer sequences go to the blocked decomposition (kernels.blocked, pieces of this kernel) or,
for SSM filters, to state passing (layers).
Runs under TRITON_INTERPRET=1 on CPU tensors, which is how the tests check it.
"""

from __future__ import annotations

import math
from functools import cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.fft_sizes import MAX_FUSED_FFT
from kernels.fft_torch import backward_inputs

_MIN_FFT = 256
THREE_LEVEL_MIN = 8192  # the FFT size from which the DFT has three stages (see above)

# tl.dot operand precision by input dtype, and warps per program by FFT size. "ieee": fp32
# FMAs (no tensor cores); "tf32x3": three tf32 tensor-core products, about fp32 accuracy;
# "tf32": one, operands rounded to 10 mantissa bits. Module attributes so that
# benchmarks/triton_gpu.py can time the alternatives; its results are behind the choices.
DOT_PRECISION = {torch.float32: "tf32x3", torch.float16: "tf32", torch.bfloat16: "tf32"}
NUM_WARPS = {256: 4, 512: 4, 1024: 4, 2048: 4, 4096: 4, 8192: 8, 16384: 16}


class Factors(NamedTuple):
    """n = A * B * C; C = 1 for the two-stage DFT."""

    A: int
    B: int
    C: int

    @property
    def n(self) -> int:
        return self.A * self.B * self.C

    @property
    def spectrum_shape(self) -> tuple[int, int]:
        """The tile shape of Y: [A, B] (two stages) or [B * A, C] (three)."""
        return (self.A, self.B) if self.C == 1 else (self.B * self.A, self.C)


def fft_factors(L: int, K: int) -> Factors:
    """The DFT factors for length L and K taps: the smallest power of two n >= L + K - 1."""
    n = max(_MIN_FFT, 1 << (L + K - 2).bit_length())
    if n > MAX_FUSED_FFT:
        raise ValueError(
            f"fftconv[triton]: L + K - 1 = {L + K - 1} exceeds the fused {MAX_FUSED_FFT}"
        )
    C = 16 if n >= THREE_LEVEL_MIN else 1
    B = 1 << (int(math.log2(n // C)) // 2)
    return Factors(n // (B * C), B, C)


def launch_options(dtype: torch.dtype, n: int) -> dict:
    """The precision and warp count of a launch for inputs of ``dtype`` and FFT size n."""
    return {"P": DOT_PRECISION[dtype], "num_warps": NUM_WARPS[n]}


@cache
def _packed_matrices(f: Factors, device: torch.device) -> torch.Tensor:
    """Fa, Fb, tw1 (and Fc, tw2 for three stages), each as re then im, flattened in that
    order into one fp32 buffer (the offsets in _mat calls below); computed in fp64."""
    A, B, C = f

    def expi(num, den):  # exp(-2 pi i num / den), rounded to fp32 once
        angle = 2 * math.pi * num.double() / den
        return [torch.cos(angle), -torch.sin(angle)]

    def dft(m):
        return expi(torch.outer(torch.arange(m), torch.arange(m)), m)

    mats = dft(A) + dft(B) + expi(torch.outer(torch.arange(A), torch.arange(B * C)), f.n)
    if C > 1:
        mats += dft(C) + expi(torch.outer(torch.arange(B), torch.arange(C)), B * C)
    return torch.cat([m.reshape(-1) for m in mats]).float().to(device)


def _filter_spectrum(k: torch.Tensor, f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    """fft(k, n) in the layout of Y, flattened: [H, n], entry (f1, f2) of [A, B] holding
    khat[f1 + A f2], or entry ((f2, f1), f3) of [B*A, C] holding khat[f1 + A f2 + AB f3]."""
    A, B, C = f
    k_f = torch.fft.fft(k.double(), n=f.n).reshape(k.shape[0], C, B, A)  # [h, f3, f2, f1]
    k_f = k_f.permute(0, 3, 2, 1) if C == 1 else k_f.permute(0, 2, 3, 1)
    k_f = k_f.reshape(k.shape[0], f.n)
    return k_f.real.float().contiguous(), k_f.imag.float().contiguous()


@triton.jit
def _mat(ptr, offset: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """The [R, C] row-major matrix at ptr + offset."""
    return tl.load(ptr + offset + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])


@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _cdot(ar, ai, br, bi, P: tl.constexpr):
    """(ar + i ai) @ (br + i bi) as real tl.dot calls."""
    re = tl.dot(ar, br, input_precision=P) - tl.dot(ai, bi, input_precision=P)
    im = tl.dot(ar, bi, input_precision=P) + tl.dot(ai, br, input_precision=P)
    return re, im


@triton.jit
def _swap_outer(x, R0: tl.constexpr, R1: tl.constexpr, C: tl.constexpr):
    """A row-major [R0, R1*C] tile indexed (r0, r1, c) as the [R1, R0*C] tile (r1, r0, c)."""
    return tl.reshape(tl.permute(tl.reshape(x, (R0, R1, C)), (1, 0, 2)), (R1, R0 * C))


@triton.jit
def _dft(x, m, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, P: tl.constexpr):
    """Spectrum (re, im) of a real row-major [A, B*C] tile, in the layout of Y (module doc);
    m points at the packed matrices."""
    OB: tl.constexpr = 2 * A * A  # offsets of Fb, tw1, Fc and tw2 in the packed buffer
    OT: tl.constexpr = OB + 2 * B * B
    OC: tl.constexpr = OT + 2 * A * B * C
    OW: tl.constexpr = OC + 2 * C * C
    ar = tl.dot(_mat(m, 0, A, A), x, input_precision=P)
    ai = tl.dot(_mat(m, A * A, A, A), x, input_precision=P)
    ar, ai = _cmul(ar, ai, _mat(m, OT, A, B * C), _mat(m, OT + A * B * C, A, B * C))
    fbr = _mat(m, OB, B, B)
    fbi = _mat(m, OB + B * B, B, B)
    if C == 1:
        yr, yi = _cdot(ar, ai, fbr, fbi, P)
    else:
        ar = _swap_outer(ar, A, B, C)
        ai = _swap_outer(ai, A, B, C)
        br, bi = _cdot(fbr, fbi, ar, ai, P)
        twr = _mat(m, OW, B, C)
        twi = _mat(m, OW + B * C, B, C)
        br, bi = _cmul(
            tl.reshape(br, (B, A, C)), tl.reshape(bi, (B, A, C)), twr[:, None, :], twi[:, None, :]
        )
        yr, yi = _cdot(
            tl.reshape(br, (B * A, C)),
            tl.reshape(bi, (B * A, C)),
            _mat(m, OC, C, C),
            _mat(m, OC + C * C, C, C),
            P,
        )
    return yr, yi


@triton.jit
def _idft_real(zr, zi, m, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, P: tl.constexpr):
    """Real part of the inverse DFT of a spectrum in the layout of Y, as a row-major
    [A, B*C] tile (the stages of _dft backwards, conjugated, and divided by n)."""
    OB: tl.constexpr = 2 * A * A
    OT: tl.constexpr = OB + 2 * B * B
    OC: tl.constexpr = OT + 2 * A * B * C
    OW: tl.constexpr = OC + 2 * C * C
    fbr = _mat(m, OB, B, B)
    fbi = _mat(m, OB + B * B, B, B)
    if C == 1:
        br, bi = _cdot(zr, zi, fbr, -fbi, P)
    else:
        dr, di = _cdot(zr, zi, _mat(m, OC, C, C), -_mat(m, OC + C * C, C, C), P)
        twr = _mat(m, OW, B, C)
        twi = _mat(m, OW + B * C, B, C)
        dr, di = _cmul(
            tl.reshape(dr, (B, A, C)), tl.reshape(di, (B, A, C)), twr[:, None, :], -twi[:, None, :]
        )
        er, ei = _cdot(fbr, -fbi, tl.reshape(dr, (B, A * C)), tl.reshape(di, (B, A * C)), P)
        br = _swap_outer(er, B, A, C)
        bi = _swap_outer(ei, B, A, C)
    br, bi = _cmul(br, bi, _mat(m, OT, A, B * C), -_mat(m, OT + A * B * C, A, B * C))
    # Re(conj(Fa) @ (br + i bi)) = Re(Fa) @ br + Im(Fa) @ bi
    re = tl.dot(_mat(m, 0, A, A), br, input_precision=P)
    re += tl.dot(_mat(m, A * A, A, A), bi, input_precision=P)
    return re / (A * B * C)


@triton.jit
def _tile_index(R: tl.constexpr, C: tl.constexpr):
    return tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]


@triton.jit
def _forward_kernel(
    u_ptr, pre_ptr, post_ptr, kr_ptr, ki_ptr, mats_ptr, y_ptr, B, H, L,
    FA: tl.constexpr, FB: tl.constexpr, FC: tl.constexpr, YR: tl.constexpr, YC: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, P: tl.constexpr,
):  # fmt: skip
    # Consecutive programs take the batch rows of one channel, which share its spectrum.
    h = tl.program_id(0) // B
    row = (tl.program_id(0) % B) * H + h
    t = _tile_index(FA, FB * FC)
    mask = t < L
    offs = row * L + t
    v = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:
        v *= tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    spec = h * FA * FB * FC + _tile_index(YR, YC)
    kr = tl.load(kr_ptr + spec)
    ki = tl.load(ki_ptr + spec)
    vr, vi = _dft(v, mats_ptr, FA, FB, FC, P)
    zr, zi = _cmul(vr, vi, kr, ki)
    z = _idft_real(zr, zi, mats_ptr, FA, FB, FC, P)
    if HAS_POST:
        z *= tl.load(post_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    u_ptr, pre_ptr, post_ptr, gy_ptr, kr_ptr, ki_ptr, mats_ptr,
    gu_ptr, gpre_ptr, gpost_ptr, gk_ptr, H, L, K, B: tl.constexpr,
    FA: tl.constexpr, FB: tl.constexpr, FC: tl.constexpr, YR: tl.constexpr, YC: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
    NEED_U: tl.constexpr, NEED_PRE: tl.constexpr, NEED_POST: tl.constexpr, NEED_K: tl.constexpr,
    P: tl.constexpr,
):  # fmt: skip
    # One program per channel: it loops over the batch, so the filter spectrum is loaded once
    # and dk's spectrum (a sum over the batch) accumulates in registers.
    h = tl.program_id(0)
    t = _tile_index(FA, FB * FC)
    mask = t < L
    spec = h * FA * FB * FC + _tile_index(YR, YC)
    kr = tl.load(kr_ptr + spec)
    ki = tl.load(ki_ptr + spec)
    acc_r = tl.zeros((YR, YC), dtype=tl.float32)
    acc_i = tl.zeros((YR, YC), dtype=tl.float32)
    for b in range(B):
        offs = (b * H + h) * L + t
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = u
        if HAS_PRE:
            pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            v = u * pre
        gz = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_POST or NEED_K:
            vr, vi = _dft(v, mats_ptr, FA, FB, FC, P)
        if NEED_POST:  # z is recomputed, never stored
            zr, zi = _cmul(vr, vi, kr, ki)
            z = _idft_real(zr, zi, mats_ptr, FA, FB, FC, P)
            tl.store(gpost_ptr + offs, (gz * z).to(gpost_ptr.dtype.element_ty), mask=mask)
        if HAS_POST:
            gz *= tl.load(post_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gr, gi = _dft(gz, mats_ptr, FA, FB, FC, P)
        if NEED_K:  # dk = sum_b corr(gz, v): spectrum gz_hat * conj(v_hat)
            acc_r += gr * vr + gi * vi
            acc_i += gi * vr - gr * vi
        if NEED_U or NEED_PRE:  # dv = corr(gz, k): spectrum gz_hat * conj(k_hat)
            gv = _idft_real(gr * kr + gi * ki, gi * kr - gr * ki, mats_ptr, FA, FB, FC, P)
            if NEED_U:
                gu = gv * pre if HAS_PRE else gv
                tl.store(gu_ptr + offs, gu.to(gu_ptr.dtype.element_ty), mask=mask)
            if NEED_PRE:
                tl.store(gpre_ptr + offs, (gv * u).to(gpre_ptr.dtype.element_ty), mask=mask)
    if NEED_K:
        gk = _idft_real(acc_r, acc_i, mats_ptr, FA, FB, FC, P)
        tl.store(gk_ptr + h * K + t, gk, mask=t < K)


def _geometry(L: int, K: int, dtype: torch.dtype) -> tuple[Factors, dict]:
    f = fft_factors(L, K)
    YR, YC = f.spectrum_shape
    return f, dict(FA=f.A, FB=f.B, FC=f.C, YR=YR, YC=YC, **launch_options(dtype, f.n))


class TritonFFTConv(torch.autograd.Function):
    """y = postgate * causal_conv(u * pregate, k); the backward kernel recomputes the forward."""

    @staticmethod
    def forward(ctx, u, k, pregate, postgate):
        B, H, L = u.shape
        f, geometry = _geometry(L, k.shape[-1], u.dtype)
        u, pregate, postgate = (_contiguous(x) for x in (u, pregate, postgate))
        y = torch.empty_like(u)
        _forward_kernel[(B * H,)](
            u, _or(pregate, u), _or(postgate, u), *_filter_spectrum(k, f),
            _packed_matrices(f, u.device), y, B, H, L,
            HAS_PRE=pregate is not None, HAS_POST=postgate is not None, **geometry,
        )  # fmt: skip
        ctx.save_for_backward(u, k, pregate, postgate)
        return y

    @staticmethod
    def backward(ctx, gy):
        (u, k, pregate, postgate), needs, (g_u, g_pre, g_post) = backward_inputs(ctx)
        need_u, need_k, need_pre, need_post = needs
        B, H, L = u.shape
        K = k.shape[-1]
        f, geometry = _geometry(L, K, u.dtype)
        g_k = torch.empty_like(k) if need_k else None
        _backward_kernel[(H,)](
            u, _or(pregate, u), _or(postgate, u), gy.contiguous(), *_filter_spectrum(k, f),
            _packed_matrices(f, u.device), _or(g_u, u), _or(g_pre, u), _or(g_post, u),
            _or(g_k, k), H, L, K, B=B,
            HAS_PRE=pregate is not None, HAS_POST=postgate is not None,
            NEED_U=need_u, NEED_PRE=need_pre, NEED_POST=need_post, NEED_K=need_k, **geometry,
        )  # fmt: skip
        return g_u, g_k, g_pre, g_post


def _contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return x.contiguous() if x is not None else None


def _or(x: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """x, or a tensor the kernel never touches (the flag for x is off) in its pointer slot."""
    return x if x is not None else placeholder
