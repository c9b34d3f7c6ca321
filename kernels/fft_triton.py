"""Fused FFT convolution in Triton: each pass over a row stays on chip from input to output.

Shapes as in kernels.fft_torch: u, pregate, postgate [B, H, L]; k [H, K] fp32 with the skip
term D folded into tap 0. Inputs may be fp32, fp16 or bf16; the math is fp32.

DFT of size n = n1 * n2 (powers of two, n >= L + K - 1, 256 <= n <= FUSED_CAPACITY) as two
stages of matrix products (Monarch / four-step form). The signal as an [n2, n1] tile,
X[t2, t1] = x[t1 n2 + t2], has the spectrum
    Y = F2 @ ((X @ F1) * T),   Y[f2, f1] = xhat[f1 + n1 f2]   (natural order, read row-major),
with F1, F2 the DFT matrices of sizes n1, n2 and twiddles T[t2, f1] = w_n^(t2 f1); real and
imaginary parts are separate fp32 tiles, so a complex product is a few real tl.dot calls, each
with n2 rows (the M of the tensor-core instruction). The inverse runs the steps backwards with
conjugates; only its real part is formed.

Slabs. Spectrum column f1 depends only on column f1 of X @ F1, so a convolution is a loop over
slabs of S spectrum columns, each going forward, through the pointwise product and back:
    A = X @ F1[:, s]   (a loop over chunks of C columns of X, loaded straight from memory),
    Y_s = F2 @ (A * T[:, s]),   Z_s = Y_s * khat[:, s],
    z += Re((conj(F2) @ Z_s) * conj(T[:, s])) @ conj(F1)[s, :].
Only z, the [n2, n1] fp32 output, lives across the loop; the rest is slab- or chunk-sized. Each
DFT-matrix tile is loaded next to the product that uses it; Triton hoists the loop-invariant F2
out of the loop and keeps it in shared memory, except where STREAM makes its loads volatile
(fp32 at n2 = 128, whose four 64 KiB parts would not fit). The filter spectrum (torch.fft of k,
[H, n] complex) is computed once per forward in natural order and kept for the backward pass.

Rows per program (Plan.rows = R, a power of two): both kernels may take R batch rows of one
channel at a time. Their [n2, C] signal tiles are stacked into one [R n2, C] operand of the
first stage (X @ F1 is row-wise), and their [n2, S] slabs set side by side, [n2, R S], for the
second (F2 @ B is column-wise), one permute in between each way (_side_by_side, _stack). Each
DFT-matrix tile, twiddle tile and filter-spectrum tile is then loaded once per R rows instead
of once per row, and every product is R times larger. The motive is the H100 profile below: at
L = K = 1024 (n = 2048, bf16) a program reads F1 twice (8 KB each), F2 (32 KB), the twiddles
(16 KB) and the filter spectrum (16 KB), about 80 KB from L2, for the 6 KB of inputs of its one
row, and its products are too small to keep the tensor cores busy. All plans have R = 1 until a
GPU session times the variants in benchmarks/triton_gpu.py (VARIANTS); offline sm_90 compiles
(benchmarks/results/triton_resources_sm90_rows.json, bf16) put the convolution kernel at 0-200
B of spills for R = 2 at n <= 2048 and R = 4 at n <= 1024, the filter-gradient kernel at 0-56 B
up to n = 1024 and about 1 KB at 2048.

Backward: dpostgate = gy * conv(v, k), dv = corr(gy * postgate, k) (a convolution with the
conjugate spectrum; du = dv * pregate, dpregate = dv * u) and dk = sum_b corr(gz_b, v_b). Up to
FFT size FUSED_BACKWARD_MAX they come from one launch (_fused_backward_kernel): per slab, the
spectra of v and gz are computed once and serve all three, and each program's rows' dk spectra
are summed and inverted into a partial dk that torch sums over the programs. Beyond it, where
that kernel's three live [n2, n1] accumulators spill kilobytes, three launches: two of the
forward kernel and a filter-gradient kernel (_backward_kernel: one program per channel and
max(DK_ROWS, R) batch rows, taken R at a time, summing their spectra inside each slab).

Precision. Every product is a tf32 tensor-core product whose operands are exact tf32 numbers:
the DFT matrices rounded to the nearest tf32 once on the host (hi), the data in the kernel
(_split); the tensor cores would truncate instead. fp16 / bf16 inputs: one product per real
product. fp32 inputs: tf32x3 written out, a @ b ~= a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi with
lo = x - hi (exact), accumulated in place; Triton's own tf32x3 sums the two small products in a
second accumulator as large as the first (offline: 249 against 126 registers per thread for
two products into a 128 x 128 z at 8 warps). Relative error ||got - ref|| / ||ref|| of the
output and all gradients, interpreted with tensor-core truncation emulated (as in the tests),
B = 2, H = 2, L = K = 1000, k / sqrt(K), gates: fp32 1.9-2.4e-7 (2.3-2.9e-7 at n = 16384),
fp16 4.5-5.2e-4, bf16 1.7-3.8e-3; the previous kernel under the same emulation: fp16 2.1-3.2e-3
(its H100 figure: 2.1e-3), bf16 3.5-5.6e-3; on the H100 it measured fp32 at 3-6e-7.

What limits n, per program on an H100 (227 KiB of shared memory per block; 64K registers per
SM, at most 255 per thread): shared memory holds one product's operands plus the hoisted F2 (2
n2^2 floats, twice that for fp32); z takes n / (32 warps) registers per thread. The previous
kernel held all six DFT matrices and whole complex spectra in each program: its backward asked
for 360448 / 393216 bytes of shared memory at n = 8192 in bf16 / fp32 (what the H100 reported)
and 655360 / 917504 at 16384. In slabs every size to 16384 fits. The plans in PLANS were timed
on an H100 and are the fastest that fit; they spill registers (wide slabs keep more live), the
price of the speed: every variant's shared memory, registers and spill bytes are in
benchmarks/results/triton_resources_sm90.json (benchmarks/triton_resources.py, offline sm_90
compiles).

Speed on an H100 (B=16, H=768, K=L, bf16, median of do_bench; forward / forward + backward
ms, the backward then in three launches, before _fused_backward_kernel;
benchmarks/results/triton_gpu_h100*.json): L=1024 0.56 / 2.10, 2048 1.23 / 4.49, 4096 2.80
/ 10.6, 8192 8.24 / 32.7, against torch's cuFFT path 0.60 / 1.73, 1.18 / 3.33, 2.32 / 6.66,
4.66 / 13.3 (that run's L=256 rows timed the Toeplitz-tile kernel, which the triton backend
picks for K <= 256; n = 512 is untimed). That is 3-6% of the device's copy bandwidth: the work is
bound by the latency of small dependent tl.dot chains per program (about 57 TFLOP/s of tf32 at
L=1024, a tenth of the tensor cores' rate), not by memory. fftconv therefore sends CUDA tensors
here only up to kernels.dispatch.TRITON_FFT_MAX, where it ties or wins, and to torch beyond.
Runs under TRITON_INTERPRET=1 on CPU tensors, which is how the tests check it.
"""

from __future__ import annotations

import functools
import math
from functools import cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.double_backward import reference_grads
from kernels.fft_torch import backward_inputs, conv_reference

# The largest FFT size the fused kernels can be launched with (L + K - 1 <= 16384).
FUSED_CAPACITY = 16384
_MIN_FFT = 256  # every tl.dot dimension must be at least 16

# tl.dot precision by input dtype ("tf32x3": three tf32 products, see the module docstring;
# "tf32": one, operands rounded to 10 mantissa bits). "ieee" (fp32 FMAs, no tensor cores) was
# 44x slower than tf32 on an H100 (22.6 vs 0.51 ms forward at B=16, H=768, L=K=1024 bf16, the
# kernel of commit 1ba5eba, its benchmarks/results/triton_gpu_h100_call1.json).
# kernels.toeplitz_triton passes it to tl.dot; the fused kernels here read it as tf32x3 or tf32.
DOT_PRECISION = {torch.float32: "tf32x3", torch.float16: "tf32", torch.bfloat16: "tf32"}
# None: each size's plan decides; an int overrides it (benchmarks/triton_gpu.py times this).
NUM_WARPS: int | None = None
# Batch rows per program of the filter-gradient kernel (see _backward_kernel).
DK_ROWS = 4
# The largest FFT size whose backward pass is the one fused launch (_fused_backward_kernel);
# beyond it, three launches (_unfused_backward). Set by offline sm_90 compiles, not yet timed
# (benchmarks/triton_gpu.py times both paths). The fused kernel keeps z, dv and the dk
# accumulator live at once: in fp16 / bf16 it spills nothing up to n = 2048 (40 B with
# unaligned lengths), but 4.4-6.1 KB at 4096 and 6.0-8.2 KB beyond, where the unfused kernels
# spill 0.2-0.7 KB (forward) and 2.3-3.3 KB (filter gradient) at 4096; in fp32 it spills 2.1-2.6
# KB at 2048, the unfused ones 0.1-0.2 and 1.0-1.3 KB
# (benchmarks/results/triton_resources_sm90.json).
FUSED_BACKWARD_MAX = 2048


class Plan(NamedTuple):
    """How the kernels cut an FFT of size n1 * n2 (see the module docstring)."""

    n1: int  # stage-1 DFT size: columns of the [n2, n1] tile
    n2: int  # stage-2 DFT size: rows of every tile, the M of every tl.dot
    S: int  # spectrum columns per slab
    C: int  # signal columns per stage-1 chunk
    warps: int
    stream: bool  # load F2 before each use instead of keeping it in shared memory (fp32 only)
    rows: int = 1  # batch rows a program stacks (both kernels; a power of two)


# Per FFT size: (n1, n2, S, C, warps), timed on an H100 (forward, B=16, H=768, K=L, bf16,
# median ms of do_bench, benchmarks/results/triton_gpu_h100_tuning.json) among plans that fit
# its shared memory in offline sm_90 compiles (benchmarks/triton_resources.py). The fewest,
# widest slabs won: one slab holding the whole spectrum (S = C = n1) wherever it fits, e.g. n =
# 2048: 0.56 against 1.17 for 64 x 32 in slabs of 16; 4096: 1.22 against 1.55 (slabs of 32);
# 8192: 2.76 against 3.41 (32) and 4.04 (16). At 16384 slabs of 64 took 7.74 against 8.14 for
# 32, within run-to-run spread, so it keeps 32, which spill less. n2 is the M of every product
# (n2 >= 64: Hopper warpgroup MMAs, M = 64 per 4 warps); 8 warps with n2 = 64 once crashed the
# process with an illegal memory access (n = 1024, 16 x 64), so 8 warps only go with n2 = 128
# (plan() refuses the rest). n = 512's plan is untimed: the rows timed for it ran the Toeplitz
# kernel (K = 256, see kernels.dispatch.TRITON_TOEPLITZ_MAX_TAPS).
# Register spills remain (figures in benchmarks/results/triton_resources_sm90.json). An optional
# sixth entry is Plan.rows (default 1: no plan sets it yet, see the module docstring).
PLANS = {
    256: (16, 16, 16, 16, 2),
    512: (32, 16, 16, 32, 4),
    1024: (16, 64, 16, 16, 4),
    2048: (32, 64, 32, 32, 4),
    4096: (64, 64, 64, 64, 4),
    8192: (64, 128, 64, 64, 8),
    16384: (128, 128, 32, 64, 8),
}
# fp32 inputs keep twice the tiles (the hi and lo parts of tf32x3): one slab of 64 columns at
# n = 8192 asks for 256 KiB of shared memory, past an H100's 227.
_FP32_PLANS = {8192: (64, 128, 16, 32, 8)}
# No software pipelining: num_stages > 1 multi-buffers the loads of the chunk loop and added
# shared memory and spills everywhere it was tried (e.g. 8192 fp32 forward: 260 B of spills
# with 1 stage, 464 with 2, 608 with 3).
_NUM_STAGES = 1


def fft_size(L: int, K: int) -> int:
    """The power-of-two FFT size of the fused kernels for length L and K taps."""
    n = max(_MIN_FFT, 1 << (L + K - 2).bit_length())
    if n > FUSED_CAPACITY:
        raise ValueError(
            f"fftconv[triton]: L + K - 1 = {L + K - 1} exceeds the fused kernels' capacity "
            f"FUSED_CAPACITY = {FUSED_CAPACITY}"
        )
    return n


def plan(n: int, dtype: torch.dtype, entry: tuple[int, ...] | None = None) -> Plan:
    """The plan for an FFT of size n (a power of two in 256 .. FUSED_CAPACITY) and inputs of
    ``dtype`` from ``entry`` (n1, n2, S, C, warps[, rows]), by default PLANS[n] or for fp32
    _FP32_PLANS[n] where it has one: fp32 streams F2 once it is 128 x 128 (its hi and lo
    parts, 4 x 64 KiB, do not fit next to the rest)."""
    fp32 = dtype == torch.float32
    if entry is None:
        entry = _FP32_PLANS[n] if fp32 and n in _FP32_PLANS else PLANS[n]
    n1, n2, S, C, warps, *rows = entry
    warps = NUM_WARPS or warps
    if warps > 4 and n2 < 128:  # see the comment above PLANS
        raise ValueError(
            f"fftconv[triton]: plan {entry} for n = {n}: {warps} warps need n2 >= 128 (8 warps "
            "with n2 = 64 crashed an H100 with an illegal memory access)"
        )
    return Plan(n1, n2, S, C, warps, fp32 and n2 >= 128, *rows)


def _tf32_hi_host(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest tf32 (10 mantissa bits), as _split does in the kernel."""
    return ((x.view(torch.int32) + 0x1000) & -8192).view(torch.float32)


@cache
def _packed_matrices(n1: int, n2: int, device: torch.device) -> torch.Tensor:
    """One fp32 buffer: the hi parts of F1 [n1, n1] as (re, im) pairs, F2 [n2, n2] re and im as
    two planes; then their lo parts, likewise; then the twiddles T [n2, n1] as pairs. Each entry
    is computed in fp64 and rounded once; hi is its tf32 rounding, lo the rest (exact).
    (Pairs: see _pair_offsets; F2 planes: see _f2.)"""
    a1 = torch.arange(n1, dtype=torch.float64)
    a2 = torch.arange(n2, dtype=torch.float64)
    f1 = torch.exp(-2j * math.pi * torch.outer(a1, a1) / n1)
    f2 = torch.exp(-2j * math.pi * torch.outer(a2, a2) / n2)
    dft = torch.cat([torch.view_as_real(f1).reshape(-1), f2.real.reshape(-1), f2.imag.reshape(-1)])
    dft = dft.float()
    hi = _tf32_hi_host(dft)
    tw = torch.view_as_real(torch.exp(-2j * math.pi * torch.outer(a2, a1) / (n1 * n2))).float()
    return torch.cat([hi, dft - hi, tw.reshape(-1)]).to(device)


def _filter_spectrum(k: torch.Tensor, n: int) -> torch.Tensor:
    """fft(k, n) as (re, im) pairs, [H, n, 2] fp32 in natural order (the kernels' [n2, n1]
    layout)."""
    return torch.view_as_real(torch.fft.fft(k.double(), n=n)).float()


@triton.jit
def _split(x, X3: tl.constexpr):
    """(hi, lo) of data x: hi its nearest tf32 (low 13 mantissa bits cleared; the tensor cores
    would truncate instead, a bias that made fp16 errors 3-4x larger), lo = x - hi (exact) for
    tf32x3, else hi again (unused)."""
    hi = ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
    lo = hi
    if X3:
        lo = x - hi
    return hi, lo


@triton.jit
def _dm(a, m_hi, m_lo, acc, X3: tl.constexpr):
    """acc + a @ m for data a and a DFT matrix m given as hi + lo parts: one tensor-core
    product, or for tf32x3 three (the small ones first), all accumulated into acc. The data is
    split here, next to its use (split once up front, the parts stayed live longer: fp32 at
    2048 then spilled 76 B)."""
    a_hi, a_lo = _split(a, X3)
    if X3:
        acc = tl.dot(a_lo, m_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, m_lo, acc, input_precision="tf32")
    return tl.dot(a_hi, m_hi, acc, input_precision="tf32")


@triton.jit
def _md(m_hi, m_lo, b, acc, X3: tl.constexpr):
    """acc + m @ b for a DFT matrix m (hi + lo) and data b, as _dm."""
    b_hi, b_lo = _split(b, X3)
    if X3:
        acc = tl.dot(m_hi, b_lo, acc, input_precision="tf32")
        acc = tl.dot(m_lo, b_hi, acc, input_precision="tf32")
    return tl.dot(m_hi, b_hi, acc, input_precision="tf32")


@triton.jit
def _pair_offsets(R: tl.constexpr, C: tl.constexpr, stride):
    """Offsets [R, C, 2] of an [R, C] tile of complex numbers stored as (re, im) pairs, rows
    ``stride`` floats apart: one load then gives both parts (each tile load keeps address
    registers live)."""
    offs = tl.arange(0, R)[:, None] * stride + 2 * tl.arange(0, C)[None, :]
    return offs[:, :, None] + tl.arange(0, 2)[None, None, :]


@triton.jit
def _ctile(ptr, rows, cols, stride):
    """(re, im) of the complex tile [len(rows), len(cols)] at ptr: entry (i, j) at row rows[i],
    column cols[j] of a matrix of (re, im) pairs, rows ``stride`` floats apart (see
    _pair_offsets). Index vectors rather than ranges: stacked rows repeat the same tile."""
    offs = rows[:, None] * stride + 2 * cols[None, :]
    return tl.split(tl.load(ptr + offs[:, :, None] + tl.arange(0, 2)[None, None, :]))


@triton.jit
def _stacked(R: tl.constexpr, N2: tl.constexpr):
    """(r, t2) of the R * N2 rows of a tile stacking R batch rows' [N2, ...] tiles: [R * N2]
    each, batch row r's tile row t2."""
    m = tl.arange(0, R * N2)
    if R == 1:
        return tl.zeros_like(m), m
    return m // N2, m % N2


@triton.jit
def _side_by_side(x, R: tl.constexpr, N2: tl.constexpr, S: tl.constexpr):
    """[R * N2, S] (R tiles stacked) -> [N2, R * S] (the same tiles side by side), so that one
    product F2 @ x serves all R."""
    if R > 1:
        x = tl.reshape(tl.permute(tl.reshape(x, (R, N2, S)), (1, 0, 2)), (N2, R * S))
    return x


@triton.jit
def _sum_side_by_side(x, R: tl.constexpr, N2: tl.constexpr, S: tl.constexpr):
    """[N2, R * S] -> [N2, S]: the sum of the R side-by-side tiles."""
    if R > 1:
        x = tl.sum(tl.reshape(x, (N2, R, S)), axis=1)
    return x


@triton.jit
def _stack(x, R: tl.constexpr, N2: tl.constexpr, S: tl.constexpr):
    """[N2, R * S] -> [R * N2, S], the inverse of _side_by_side."""
    if R > 1:
        x = tl.reshape(tl.permute(tl.reshape(x, (N2, R, S)), (1, 0, 2)), (R * N2, S))
    return x


@triton.jit
def _cmat(ptr, R: tl.constexpr, C: tl.constexpr, stride, LO: tl.constexpr, X3: tl.constexpr):
    """(re, im, re_lo, im_lo) of a tile of F1 (pairs): its hi parts, and for tf32x3 its lo parts
    (LO floats further on; else the hi parts again, unused)."""
    offs = _pair_offsets(R, C, stride)
    re, im = tl.split(tl.load(ptr + offs))
    re_lo, im_lo = re, im
    if X3:
        re_lo, im_lo = tl.split(tl.load(ptr + LO + offs))
    return re, im, re_lo, im_lo


@triton.jit
def _f2(mats_ptr, IM: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, X3: tl.constexpr,
        STREAM: tl.constexpr):  # fmt: skip
    """(hi, lo) of the real (IM = 0) or imaginary (IM = 1) part of F2, as _cmat: a plane, so
    that it goes to shared memory as a tl.dot operand as it is (a tl.split result would first
    be copied into registers). One part at a time, each loaded right before its products; a
    volatile load (STREAM) is never hoisted out of the slab loop, so its shared-memory copy
    lives only around its use."""
    LO: tl.constexpr = 2 * N1 * N1 + 2 * N2 * N2
    ptr = mats_ptr + 2 * N1 * N1 + IM * N2 * N2
    offs = tl.arange(0, N2)[:, None] * N2 + tl.arange(0, N2)[None, :]
    hi = tl.load(ptr + offs, volatile=STREAM)
    lo = hi
    if X3:
        lo = tl.load(ptr + LO + offs, volatile=STREAM)
    return hi, lo


@triton.jit
def _spectrum_slab(
    x_ptr, g_ptr, HAS_G: tl.constexpr, row_off, t2, lim, mats_ptr, s0, twr, twi,
    N1: tl.constexpr, N2: tl.constexpr, S: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
    X3: tl.constexpr, STREAM: tl.constexpr,
):  # fmt: skip
    """Columns s0 .. s0+S of the spectra Y [N2, N1] of R rows x * g, side by side: (yr, yi),
    [N2, R * S] fp32 each. Tile row m (of R * N2, see _stacked) reads its row's samples from
    x_ptr + row_off[m], tile row t2[m], zero from sample lim[m] on (the row's length, or 0 for
    a row past the batch); twr, twi are those columns of the twiddles at rows t2, [R * N2, S]."""
    LO: tl.constexpr = 2 * N1 * N1 + 2 * N2 * N2  # offsets in _packed_matrices
    ar = tl.zeros((R * N2, S), dtype=tl.float32)
    ai = tl.zeros((R * N2, S), dtype=tl.float32)
    # A = X @ F1[:, s], C columns of X at a time (the R rows' X stacked: one product for all)
    for c0 in range(0, N1, C):
        t = t2[:, None] + (c0 + tl.arange(0, C))[None, :] * N2
        mask = t < lim[:, None]
        offs = row_off[:, None] + t
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_G:
            x *= tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        f1r, f1i, f1r_lo, f1i_lo = _cmat(mats_ptr + 2 * (c0 * N1 + s0), C, S, 2 * N1, LO, X3)
        ar = _dm(x, f1r, f1r_lo, ar, X3)
        ai = _dm(x, f1i, f1i_lo, ai, X3)
    br = _side_by_side(ar * twr - ai * twi, R, N2, S)
    bi = _side_by_side(ar * twi + ai * twr, R, N2, S)
    # Y = F2 @ B
    f2r, f2r_lo = _f2(mats_ptr, 0, N1, N2, X3, STREAM)
    yr = _md(f2r, f2r_lo, br, tl.zeros((N2, R * S), dtype=tl.float32), X3)
    yi = _md(f2r, f2r_lo, bi, tl.zeros((N2, R * S), dtype=tl.float32), X3)
    f2i, f2i_lo = _f2(mats_ptr, 1, N1, N2, X3, STREAM)
    yr = _md(f2i, f2i_lo, -bi, yr, X3)
    yi = _md(f2i, f2i_lo, br, yi, X3)
    return yr, yi


@triton.jit
def _inverse_slab(
    zr, zi, acc, mats_ptr, s0, twr, twi,
    N1: tl.constexpr, N2: tl.constexpr, S: tl.constexpr, R: tl.constexpr, X3: tl.constexpr,
    STREAM: tl.constexpr,
):  # fmt: skip
    """acc + n * Re(inverse DFT) of R spectra that are zero outside columns s0 .. s0+S, where
    they are (zr, zi) [N2, R * S] (side by side, as _spectrum_slab gives them): the [N2, N1]
    tiles of the R time signals, laid out as X and stacked, [R * N2, N1]."""
    LO: tl.constexpr = 2 * N1 * N1 + 2 * N2 * N2
    # C = conj(F2) @ Z
    f2r, f2r_lo = _f2(mats_ptr, 0, N1, N2, X3, STREAM)
    cr = _md(f2r, f2r_lo, zr, tl.zeros((N2, R * S), dtype=tl.float32), X3)
    ci = _md(f2r, f2r_lo, zi, tl.zeros((N2, R * S), dtype=tl.float32), X3)
    f2i, f2i_lo = _f2(mats_ptr, 1, N1, N2, X3, STREAM)
    cr = _stack(_md(f2i, f2i_lo, zi, cr, X3), R, N2, S)
    ci = _stack(_md(f2i, f2i_lo, -zr, ci, X3), R, N2, S)
    # D = C * conj(T); Re(D @ conj(F1)[s, :]) = dr @ F1r[s, :] + di @ F1i[s, :]
    dr = cr * twr + ci * twi
    di = ci * twr - cr * twi
    f1r, f1i, f1r_lo, f1i_lo = _cmat(mats_ptr + 2 * s0 * N1, S, N1, 2 * N1, LO, X3)
    acc = _dm(dr, f1r, f1r_lo, acc, X3)
    return _dm(di, f1i, f1i_lo, acc, X3)


@triton.jit
def _twiddles(mats_ptr, s0, t2, N1: tl.constexpr, N2: tl.constexpr, S: tl.constexpr):
    """Columns s0 .. s0+S of T (re, im) at rows t2: [len(t2), S] each."""
    TW: tl.constexpr = 4 * N1 * N1 + 4 * N2 * N2
    return _ctile(mats_ptr + TW, t2, s0 + tl.arange(0, S), 2 * N1)


@triton.jit
def _forward_kernel(
    x_ptr, gin_ptr, k_ptr, mats_ptr, out_ptr, gout_ptr, out2_ptr, gout2_ptr, B, H, L,
    N1: tl.constexpr, N2: tl.constexpr, S: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
    HAS_GIN: tl.constexpr, HAS_GOUT: tl.constexpr, OUT2: tl.constexpr, CONJ: tl.constexpr,
    X3: tl.constexpr, STREAM: tl.constexpr,
):  # fmt: skip
    """z = IDFT(DFT(x * gin) * khat) for R batch rows of one channel (conj(khat) if CONJ);
    out = z * gout, out2 = z * gout2. khat: [H, n] complex (re, im pairs) at k_ptr. Grid: H *
    ceil(B / R) programs; rows past B are masked off.

    The forward pass (x = u, gin = pregate, gout = postgate) and, in the backward pass,
    dpostgate (gout = gy) and dv = corr(gy * postgate, k) (CONJ; x = gy, gin = postgate; out,
    out2 = du (gout = pregate), dpregate (gout2 = u)).

    R > 1 stacks the rows' tiles, so that each DFT-matrix tile and the channel's spectrum are
    loaded once for R rows and every product is R times larger (_stacked, _side_by_side).
    """
    # Consecutive programs take the batch rows of one channel, which share its spectrum: it
    # is read from HBM once and from L2 after.
    P = tl.cdiv(B, R)
    h = tl.program_id(0) // P
    r, t2 = _stacked(R, N2)
    b = (tl.program_id(0) % P) * R + r
    row_off = (b.to(tl.int64) * H + h) * L  # int64: B H L may pass 2^31
    lim = tl.where(b < B, L, 0)
    # The spectrum's columns for the side-by-side layout: s0 + j % S at column j.
    k_cols = tl.arange(0, R * S) % S
    z = tl.zeros((R * N2, N1), dtype=tl.float32)
    for s0 in range(0, N1, S):
        twr, twi = _twiddles(mats_ptr, s0, t2, N1, N2, S)
        yr, yi = _spectrum_slab(
            x_ptr, gin_ptr, HAS_GIN, row_off, t2, lim, mats_ptr, s0, twr, twi,
            N1, N2, S, C, R, X3, STREAM,
        )  # fmt: skip
        kr, ki = _ctile(k_ptr + 2 * h * N1 * N2, tl.arange(0, N2), s0 + k_cols, 2 * N1)
        if CONJ:
            ki = -ki
        z = _inverse_slab(
            yr * kr - yi * ki, yr * ki + yi * kr, z, mats_ptr, s0, twr, twi,
            N1, N2, S, R, X3, STREAM,
        )  # fmt: skip
    t = t2[:, None] + tl.arange(0, N1)[None, :] * N2
    mask = t < lim[:, None]
    offs = row_off[:, None] + t
    z = z / (N1 * N2)
    out = z
    if HAS_GOUT:
        out = z * tl.load(gout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if OUT2:
        out2 = z * tl.load(gout2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out2_ptr + offs, out2.to(out2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    u_ptr, pre_ptr, post_ptr, gy_ptr, mats_ptr, gk_ptr, B, H, L, K, RB: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, S: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, X3: tl.constexpr, STREAM: tl.constexpr,
):  # fmt: skip
    """Partial filter gradients: program (h, p) sums the spectra gz_hat_b * conj(v_hat_b) of
    batch rows b = p*RB .. p*RB+RB-1 (gz = gy * postgate, v = u * pregate), one slab at a time,
    and writes the first K taps of their inverse, corr(gz_b, v_b) summed over those rows, to
    gk[p, h] ([P, H, K] fp32; the caller sums over p). Grid: (H, P = ceil(B / RB)). The rows go
    R at a time, stacked as in _forward_kernel; rows past B or past the program's RB read as
    zeros. Splitting the batch over programs: with one program per channel looping over all 16
    rows, this kernel took 5x a forward launch at B=16, H=768, L=256 on an H100 (768 programs
    for 132 SMs); RB is a constexpr because a loop to a runtime bound does not run under
    TRITON_INTERPRET (Triton 3.5, numpy 2)."""
    h = tl.program_id(0)
    p = tl.program_id(1)
    r, t2 = _stacked(R, N2)
    _, t2_one = _stacked(1, N2)
    gk = tl.zeros((N2, N1), dtype=tl.float32)
    for s0 in range(0, N1, S):
        twr, twi = _twiddles(mats_ptr, s0, t2, N1, N2, S)
        acc_r = tl.zeros((N2, S), dtype=tl.float32)
        acc_i = tl.zeros((N2, S), dtype=tl.float32)
        for i in range(0, RB, R):
            b = p * RB + i + r
            row_off = (b.to(tl.int64) * H + h) * L  # int64: B H L may pass 2^31
            lim = tl.where((b < B) & (i + r < RB), L, 0)  # a row not ours: all masked off
            vr, vi = _spectrum_slab(
                u_ptr, pre_ptr, HAS_PRE, row_off, t2, lim, mats_ptr, s0, twr, twi,
                N1, N2, S, C, R, X3, STREAM,
            )  # fmt: skip
            gr, gi = _spectrum_slab(
                gy_ptr, post_ptr, HAS_POST, row_off, t2, lim, mats_ptr, s0, twr, twi,
                N1, N2, S, C, R, X3, STREAM,
            )  # fmt: skip
            acc_r += _sum_side_by_side(gr * vr + gi * vi, R, N2, S)
            acc_i += _sum_side_by_side(gi * vr - gr * vi, R, N2, S)
        if R > 1:  # _inverse_slab's one row takes the twiddles unstacked
            twr, twi = _twiddles(mats_ptr, s0, t2_one, N1, N2, S)
        gk = _inverse_slab(acc_r, acc_i, gk, mats_ptr, s0, twr, twi, N1, N2, S, 1, X3, STREAM)
    t = t2_one[:, None] + tl.arange(0, N1)[None, :] * N2
    tl.store(gk_ptr + (p.to(tl.int64) * H + h) * K + t, gk / (N1 * N2), mask=t < K)


@triton.jit
def _fused_backward_kernel(
    u_ptr, pre_ptr, post_ptr, gy_ptr, k_ptr, mats_ptr, gu_ptr, gpre_ptr, gpost_ptr, gk_ptr,
    B, H, L, K,
    N1: tl.constexpr, N2: tl.constexpr, S: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, NEED_U: tl.constexpr,
    NEED_PRE: tl.constexpr, NEED_POST: tl.constexpr, NEED_K: tl.constexpr,
    X3: tl.constexpr, STREAM: tl.constexpr,
):  # fmt: skip
    """The whole backward pass of R batch rows of one channel in one launch: each slab of the
    spectra of v = u * pregate and gz = gy * postgate is computed once and serves all three
    products,
        dpostgate = gy * IDFT(v_hat khat),   dv = IDFT(gz_hat conj(khat)),
        dk (this program's part) = IDFT(sum over the R rows of gz_hat conj(v_hat)),
    with du = dv * pregate, dpregate = dv * u. (The unfused backward, _unfused_backward, takes
    two launches of _forward_kernel and one of _backward_kernel: four spectra per row between
    them, and u, pregate and gy read two or three times.) The NEED_* flags drop what no
    gradient needs. Grid: H * ceil(B / R) as _forward_kernel's, rows past B masked off; gk
    [ceil(B / R), H, K] fp32 takes each program's part, summed by the caller (transient memory
    of 2K / (R L) times a bf16 input's, e.g. 2x at K = L with one row per program).

    No loop over more rows per program (as _backward_kernel's DK_ROWS) to sum dk spectra
    before one inverse: a version with one, 4 rows per program, kept the row-invariant tiles
    it hoisted out of the loop live in registers (offline sm_90 compiles, bf16: 0-508 B of
    spills at n = 1024 and 1.0-2.1 KB at 2048, against 0 and 0-40 B here), and one program per
    row keeps 16 x 768 programs busy where a loop over 4 rows leaves a quarter of that.
    """
    P = tl.cdiv(B, R)
    h = tl.program_id(0) // P
    r, t2 = _stacked(R, N2)
    _, t2_one = _stacked(1, N2)
    b = (tl.program_id(0) % P) * R + r
    row_off = (b.to(tl.int64) * H + h) * L  # int64: B H L may pass 2^31
    lim = tl.where(b < B, L, 0)
    k_cols = tl.arange(0, R * S) % S
    NEED_V: tl.constexpr = NEED_U or NEED_PRE
    z = tl.zeros((R * N2, N1), dtype=tl.float32)
    dv = tl.zeros((R * N2, N1), dtype=tl.float32)
    gk = tl.zeros((N2, N1), dtype=tl.float32)
    for s0 in range(0, N1, S):
        twr, twi = _twiddles(mats_ptr, s0, t2, N1, N2, S)
        kr, ki = _ctile(k_ptr + 2 * h * N1 * N2, tl.arange(0, N2), s0 + k_cols, 2 * N1)
        if NEED_POST or NEED_K:
            vr, vi = _spectrum_slab(
                u_ptr, pre_ptr, HAS_PRE, row_off, t2, lim, mats_ptr, s0, twr, twi,
                N1, N2, S, C, R, X3, STREAM,
            )  # fmt: skip
        if NEED_V or NEED_K:
            gr, gi = _spectrum_slab(
                gy_ptr, post_ptr, HAS_POST, row_off, t2, lim, mats_ptr, s0, twr, twi,
                N1, N2, S, C, R, X3, STREAM,
            )  # fmt: skip
        if NEED_POST:
            z = _inverse_slab(
                vr * kr - vi * ki, vr * ki + vi * kr, z, mats_ptr, s0, twr, twi,
                N1, N2, S, R, X3, STREAM,
            )  # fmt: skip
        if NEED_V:  # the conjugate spectrum: a correlation
            dv = _inverse_slab(
                gr * kr + gi * ki, gi * kr - gr * ki, dv, mats_ptr, s0, twr, twi,
                N1, N2, S, R, X3, STREAM,
            )  # fmt: skip
        if NEED_K:
            acc_r = _sum_side_by_side(gr * vr + gi * vi, R, N2, S)
            acc_i = _sum_side_by_side(gi * vr - gr * vi, R, N2, S)
            if R > 1:  # _inverse_slab's one row takes the twiddles unstacked
                twr, twi = _twiddles(mats_ptr, s0, t2_one, N1, N2, S)
            gk = _inverse_slab(acc_r, acc_i, gk, mats_ptr, s0, twr, twi, N1, N2, S, 1, X3, STREAM)
    t = t2[:, None] + tl.arange(0, N1)[None, :] * N2
    mask = t < lim[:, None]
    offs = row_off[:, None] + t
    if NEED_POST:
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gpost = z / (N1 * N2) * gy
        tl.store(gpost_ptr + offs, gpost.to(gpost_ptr.dtype.element_ty), mask=mask)
    store_signal_grads(dv / (N1 * N2), u_ptr, pre_ptr, gu_ptr, gpre_ptr, offs, mask, HAS_PRE,
                       NEED_U, NEED_PRE)  # fmt: skip
    if NEED_K:
        t = t2_one[:, None] + tl.arange(0, N1)[None, :] * N2
        gk_off = ((tl.program_id(0) % P).to(tl.int64) * H + h) * K
        tl.store(gk_ptr + gk_off + t, gk / (N1 * N2), mask=t < K)


@triton.jit
def store_signal_grads(
    dv, u_ptr, pre_ptr, gu_ptr, gpre_ptr, offs, mask,
    HAS_PRE: tl.constexpr, NEED_U: tl.constexpr, NEED_PRE: tl.constexpr,
):  # fmt: skip
    """Stores du = dv * pregate (dv without a pregate) and dpregate = dv * u at ``offs`` where
    asked for, from dv, the fp32 gradient of v = u * pregate (also kernels.toeplitz_triton's)."""
    if NEED_U:
        gu = dv
        if HAS_PRE:
            gu = dv * tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gu_ptr + offs, gu.to(gu_ptr.dtype.element_ty), mask=mask)
    if NEED_PRE:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gpre_ptr + offs, (dv * u).to(gpre_ptr.dtype.element_ty), mask=mask)


def _launch_options(p: Plan, dtype: torch.dtype) -> dict:
    """The constexprs and launch options every fused kernel takes from the plan and the
    dtype."""
    precision = DOT_PRECISION[dtype]
    if precision not in ("tf32", "tf32x3"):  # e.g. a tuning run asking for "ieee"
        raise ValueError(f"fftconv[triton]: fused kernels run tf32 or tf32x3, not {precision!r}")
    x3 = precision == "tf32x3"
    return dict(N1=p.n1, N2=p.n2, S=p.S, C=p.C, X3=x3, STREAM=p.stream, num_warps=p.warps,
                num_stages=_NUM_STAGES)  # fmt: skip


def _launch_conv(x, gin, spectrum, conj, outs, p: Plan, mats: torch.Tensor) -> None:
    """One _forward_kernel launch over every row of x [B, H, L]: ``outs`` is one or two
    (output, gate or None) pairs; only the first may have no gate."""
    B, H, L = x.shape
    (out, gout), *second = outs
    out2, gout2 = second[0] if second else (None, None)
    _forward_kernel[(H * triton.cdiv(B, p.rows),)](
        x, _or(gin, x), spectrum, mats, out, _or(gout, x), _or(out2, x), _or(gout2, x),
        B, H, L, R=p.rows, HAS_GIN=gin is not None, HAS_GOUT=gout is not None,
        OUT2=out2 is not None, CONJ=conj, **_launch_options(p, x.dtype),
    )  # fmt: skip


def on_device_of_input(fn):
    """A Function's forward / backward (ctx, x, ...) run with x's CUDA device current: Triton
    launches on the current device, not on the arguments', so tensors on cuda:1 while cuda:0
    is current would run there on pointers of another GPU."""

    @functools.wraps(fn)
    def run(ctx, x, *args):
        if not x.is_cuda:
            return fn(ctx, x, *args)
        with torch.cuda.device(x.device):
            return fn(ctx, x, *args)

    return run


class TritonFFTConv(torch.autograd.Function):
    """y = postgate * causal_conv(u * pregate, k); the backward pass recomputes the forward."""

    @staticmethod
    @on_device_of_input
    def forward(ctx, u, k, pregate, postgate):
        n = fft_size(u.shape[-1], k.shape[-1])
        p = plan(n, u.dtype)
        contiguous = [_contiguous(x) for x in (u, pregate, postgate)]
        # The inputs as given (a double backward differentiates through them, and the copies
        # are made outside autograd here), then the copies the kernels read (the inputs
        # themselves where contiguous: saved twice at no cost).
        ctx.save_for_backward(u, k, pregate, postgate, *contiguous)
        u, pregate, postgate = contiguous
        y = torch.empty_like(u)
        # Kept for the backward pass: [H, n, 2] is small next to the activations it recomputes.
        ctx.spectrum = _filter_spectrum(k, n)
        mats = _packed_matrices(p.n1, p.n2, u.device)
        _launch_conv(u, pregate, ctx.spectrum, False, [(y, postgate)], p, mats)
        return y

    @staticmethod
    @on_device_of_input
    def backward(ctx, gy):
        if ctx.spectrum is None or torch.is_grad_enabled():  # as kernels.fft_torch.FFTConv
            ctx.spectrum = None
            return reference_grads(reference, ctx.saved_tensors[:4], ctx.needs_input_grad, gy)
        (_, k, _, _), needs, grads = backward_inputs(ctx, contiguous=True)
        u, pregate, postgate = ctx.saved_tensors[4:]
        B, H, L = u.shape
        K = k.shape[-1]
        p = plan(fft_size(L, K), u.dtype)
        mats = _packed_matrices(p.n1, p.n2, u.device)
        fused = p.n1 * p.n2 <= FUSED_BACKWARD_MAX
        run = _fused_backward if fused else _unfused_backward
        g_k = run(u, pregate, postgate, gy.contiguous(), ctx.spectrum, grads, K, needs, p, mats)
        g_u, g_pre, g_post = grads
        ctx.spectrum = None
        return g_u, g_k, g_pre, g_post


def _fused_backward(u, pregate, postgate, gy, k_f, grads, K, needs, p: Plan, mats):
    """Every requested gradient in one _fused_backward_kernel launch; returns dk (or None) and
    fills the [B, H, L] buffers ``grads`` = (g_u, g_pre, g_post) (None where not needed)."""
    need_u, need_k, need_pre, need_post = needs
    (g_u, g_pre, g_post), (B, H, L) = grads, u.shape
    P = triton.cdiv(B, p.rows)
    partial = torch.empty((P, H, K), device=u.device, dtype=k_f.dtype) if need_k else None
    _fused_backward_kernel[(H * P,)](
        u, _or(pregate, u), _or(postgate, u), gy, k_f, mats, _or(g_u, u), _or(g_pre, u),
        _or(g_post, u), _or(partial, k_f), B, H, L, K, R=p.rows,
        HAS_PRE=pregate is not None, HAS_POST=postgate is not None, NEED_U=need_u,
        NEED_PRE=need_pre, NEED_POST=need_post, NEED_K=need_k, **_launch_options(p, u.dtype),
    )  # fmt: skip
    return _sum_partial(partial)


def _unfused_backward(u, pregate, postgate, gy, k_f, grads, K, needs, p: Plan, mats):
    """As _fused_backward, in up to three launches: dpostgate and dv each by _forward_kernel,
    dk by _backward_kernel (the FFT sizes past FUSED_BACKWARD_MAX)."""
    need_u, need_k, need_pre, need_post = needs
    (g_u, g_pre, g_post), (B, H, L) = grads, u.shape
    if need_post:  # z is recomputed, never stored
        _launch_conv(u, pregate, k_f, False, [(g_post, gy)], p, mats)
    if need_u or need_pre:  # dv = corr(gz, k): the spectrum gz_hat * conj(k_hat)
        outs = [(g_u, pregate)] if need_u else []
        outs += [(g_pre, u)] if need_pre else []
        _launch_conv(gy, postgate, k_f, True, outs, p, mats)
    if not need_k:
        return None
    rb = min(B, max(DK_ROWS, p.rows))  # a program's rows, p.rows of them at a time
    partial = torch.empty((triton.cdiv(B, rb), H, K), device=u.device, dtype=k_f.dtype)
    _backward_kernel[(H, partial.shape[0])](
        u, _or(pregate, u), _or(postgate, u), gy, mats, partial, B, H, L, K, RB=rb, R=p.rows,
        HAS_PRE=pregate is not None, HAS_POST=postgate is not None,
        **_launch_options(p, u.dtype),
    )  # fmt: skip
    return _sum_partial(partial)


def _sum_partial(partial: torch.Tensor | None) -> torch.Tensor | None:
    """[P, H, K] partial filter gradients -> [H, K] (None stays None)."""
    if partial is None:
        return None
    return partial[0] if partial.shape[0] == 1 else partial.sum(0)


def interpreted() -> bool:
    """Whether these kernels run in Triton's interpreter (TRITON_INTERPRET=1 when they were
    defined), so on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_forward_kernel, InterpretedFunction)


def reference(u, k, pregate, postgate) -> torch.Tensor:
    """The Triton Functions' result in plain torch ops (k with D folded in), which a double
    backward differentiates (kernels.double_backward)."""
    return conv_reference(u, k, None, pregate, postgate)


def _contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return x.contiguous() if x is not None else None


def _or(x: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """x, or a tensor the kernel never touches (the flag for x is off) in its pointer slot."""
    return x if x is not None else placeholder
