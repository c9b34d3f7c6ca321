"""Causal long convolution ``y = postgate * (k * (u * pregate) + D * (u * pregate))``: dispatch.

Shapes: u, pregate, postgate [B, H, L]; k [G, K]; D [G], where G = H (a filter per channel) or
divides H (filters shared by groups of H / G consecutive channels: channel h takes filter
h // (H / G), as multi-head H3's second SSM shares each head's filter). Taps of k beyond L can
never reach an output position, so K > L is accepted and truncated to L.

The torch backend has three exact methods (fp32 math, fp64 for fp64 inputs), picked by shape
from crossovers measured on CPU by benchmarks/fftconv.py (its crossover sweep):
- "toeplitz": matmuls with Toeplitz blocks (kernels.direct) - short L with a batch of >= L / 2;
- "conv1d": grouped conv1d (kernels.direct) - a handful of taps;
- "fft": blocked rfft with a hand-written backward (kernels.fft_torch) - everything else.
The skip term D is the filter's tap 0, so every method gets it free: folded into k, or for the fft
method added to its zero-padded filter buffer (one op fewer, and no autograd node of its own).

The triton backend runs fp32/fp16/bf16 inputs (fp32 math) at any length, by two methods:
- "toeplitz": Toeplitz tiles times signal tiles with tl.dot (kernels.toeplitz_triton) - filters
  of up to TRITON_TOEPLITZ_MAX_TAPS taps, at any L;
- "fft": one fused kernel per direction (kernels.fft_triton) when L + K - 1 fits its FFT size
  (MAX_FUSED_FFT), and beyond it the exact blocked decomposition (kernels.blocked) into pieces
  that fit.
For CUDA tensors (triton installed) backend=None picks triton where it measured faster than
the torch path on an H100 (short filters; FFT sizes up to TRITON_FFT_MAX) and torch (cuFFT)
elsewhere; backend="triton" forces it at any size.
"""

from __future__ import annotations

import importlib.util

import torch

from kernels.direct import conv1d_conv, per_channel, toeplitz_conv, with_skip
from kernels.fft_sizes import MAX_FUSED_FFT
from kernels.fft_torch import fft_conv

# Triton is optional (the "gpu" extra): imported only when used, so that the interpreter
# switch TRITON_INTERPRET=1 may be set any time before the first triton call.
_BACKENDS = ("torch", "triton") if importlib.util.find_spec("triton") else ("torch",)
METHODS = ("fft", "toeplitz", "conv1d")
TRITON_METHODS = ("fft", "toeplitz")
_DIRECT = {"toeplitz": toeplitz_conv, "conv1d": conv1d_conv}

# Crossovers, measured fwd+bwd (min of 5, methods timed in turn) on this project's 2-core x86
# CPU, 1 thread, while other jobs shared the machine, by benchmarks/fftconv.py; the rows are in
# benchmarks/results/fftconv_cpu.json ("crossover"; three earlier runs agreed within noise).
# Times in ms.
# - One [L, L] Toeplitz matmul beats the FFT at the synthetic tasks' lengths once a batch
#   amortises building the matrix and its backward, and the larger the batch, the longer the
#   lengths it wins at (its bmm gets more rows per matrix). With the Toeplitz block's own
#   backward (kernels.direct), H=64, K=L, median fft vs toeplitz, at least 1.5 s per method
#   (a focused run of benchmarks.fftconv.time_round_robin; the crossover rows of commit
#   000e742's JSON, min of 9, agreed with the rule below at every B and L of their grid, B=16
#   and 64 included. On another host (AMD EPYC, AVX2), with the fft method's kept buffers
#   (kernels.fft_torch), the current JSON's grid (medians since commit 02857ce, minima before)
#   disagrees at B=16, L=32 (1.37 fft vs 1.53 toeplitz; min 1.17 vs 1.36 and 1.80 vs 2.07 in
#   the runs before), B=32, L=64 (3.99 vs 4.34; 3.69 vs 3.91; 4.85 vs 5.29) and B=64, L=96
#   (12.3 vs 12.6);
#   paired focused runs there, toeplitz / fft time:
#   B=16 L=16 1.06, L=24 0.90, L=32 1.10; B=24 L=32 1.02, L=48 0.96; B=32 L=48 0.90, L=64
#   1.03. The FFT wins where its size is a power of two (L = 16, 32, 64), by at most 10%, so
#   the rule stands):
#   B=16 L=32 1.14 vs 1.09; B=24 (H=128) L=48 2.43 vs 2.02, L=64 3.45 vs 3.37; B=32 L=48 2.35
#   vs 1.86, L=64 2.76 vs 2.32, L=96 3.83 vs 4.14, L=128 4.90 vs 6.34; B=48 L=96 5.46 vs 5.04;
#   B=64 L=64 6.84 vs 4.28, L=96 8.79 vs 6.54, L=128 11.9 vs 11.3. Wider: B=16, H=256 L=48
#   4.09 vs 4.03, L=64 5.84 vs 7.06; B=32, H=256 L=64 10.4 vs 8.96, L=96 15.9 vs 15.9; B=32,
#   H=512 L=64 22.0 vs 17.9; B=48, H=256 L=96 28.2 vs 23.6. So toeplitz where B >= L / 2 (and
#   B >= 16) up to L = 96: each of those shapes won or tied. Below B=16 the FFT won: H=256,
#   L=32, B=1 1.76 vs 0.74 (toeplitz vs fft), B=4 1.89 vs 1.44, B=8 a tie. The forward pass
#   alone (no_grad) at evaluation batches, B=500: H=64 L=64 14.3 vs 6.5, H=512 L=30 144 vs 66,
#   L=48 78 vs 58, but L=64 126 vs 138 and L=80 152 vs 168, where 100 MB operands make the
#   per-channel gemms memory-bound. Training steps dominate a run's time, so fwd+bwd decides.
TOEPLITZ_MAX_LEN = 96
TOEPLITZ_MIN_BATCH = 16
# - Grouped conv1d wins for a handful of taps. B=4, H=64, conv1d vs fft, K=4: L=1024 3.56 vs
#   4.81, L=4096 15.1 vs 27.8, L=16384 66 vs 120. K=8 won here too but lost in an earlier run
#   (L=4096: 32 vs 19), so the threshold stays at 4. Commit 000e742's JSON (min ms): K=4 lost
#   at L=1024 (4.36 vs 4.13) and won at 4096 and 16384; K=8 lost at 4096 and tied at 16384
#   (75.8 vs 77.0). The current JSON's host won with conv1d at K = 4 at each L, and at K = 8
#   from 4096 on (medians, K=8: 6.14 vs 6.05 at 1024, 22.4 vs 24.5 at 4096, 78.6 vs 99.9 at
#   16384; its run before, minima: 5.87 vs 6.02, 23.0 vs 25.4, 83.3 vs 108): 8 would suit that
#   host at long L, 4 suits both.
CONV1D_MAX_TAPS = 4
# - Block Toeplitz at long L (kernels.direct) lost to the FFT for K >= 64 (L=4096, K=128: 40 vs
#   27) and won only at K=16, L >= 4096 (L=16384: 98 vs 112), where conv1d is as good and the
#   margin is within this machine's noise; it is not chosen automatically. method="toeplitz"
#   runs it at any shape.
# On CUDA (backend None) the fused Triton FFT is chosen only up to this FFT size, L + K - 1:
# beyond it the torch path (cuFFT) was faster forward + backward. H100, B=16, H=768, K=L, bf16,
# median ms fwd / fwd+bwd, triton vs torch (benchmarks/results/triton_gpu_h100.json; its
# L=256 rows timed the Toeplitz-tile kernel, the triton backend's pick at K = 256): L=512
# 0.38 / 1.46 vs 0.32 / 1.08 (an earlier run: 0.34 / 1.19 vs
# 0.45 / 1.87, so a tie); 1024 0.56 / 2.10 vs 0.60 / 1.73; 2048 1.23 / 4.49 vs 1.18 / 3.33;
# 4096 2.80 / 10.6 vs 2.32 / 6.66; 8192 8.24 / 32.7 vs 4.66 / 13.3.
TRITON_FFT_MAX = 1024
# On the triton backend the direct Toeplitz-tile kernel replaces the FFT up to this many taps:
# FlashConv's authors put the crossover at ~256-512 taps (REFERENCE.md). On an H100 it beat both
# the Triton FFT and the torch path at K = 64 and 256 for L = 1K to 32K (B=16, H=768, bf16,
# fwd+bwd ms at K = 256: 2.11 vs 2.59 torch at L=1K, 13.5 vs 20.9 at 16K;
# benchmarks/results/fftconv_cuda.json, "short K"); larger K is not timed yet.
TRITON_TOEPLITZ_MAX_TAPS = 256


def backends() -> tuple[str, ...]:
    """Names of the available fftconv backends."""
    return _BACKENDS


def choose_method(B: int, L: int, K: int, backend: str = "torch") -> str:
    """The fastest method of ``backend`` for batch B, length L and K <= L taps (see above)."""
    if backend == "triton":
        return "toeplitz" if K <= TRITON_TOEPLITZ_MAX_TAPS else "fft"
    if L <= TOEPLITZ_MAX_LEN and B >= max(TOEPLITZ_MIN_BATCH, L / 2):
        return "toeplitz"
    if K <= CONV1D_MAX_TAPS:
        return "conv1d"
    return "fft"


def _default_backend(u: torch.Tensor, L: int, K: int) -> str:
    """triton for CUDA tensors where one of its methods is the faster (TRITON_FFT_MAX, and
    short filters by TRITON_TOEPLITZ_MAX_TAPS), else torch."""
    if "triton" not in _BACKENDS or not u.is_cuda or u.dtype == torch.float64:
        return "torch"
    return "triton" if K <= TRITON_TOEPLITZ_MAX_TAPS or L + K - 1 <= TRITON_FFT_MAX else "torch"


def _triton_blocked(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal convolution beyond the fused size, in pieces that fit it (kernels.blocked)."""
    from kernels.blocked import blocked_conv
    from kernels.fft_triton import TritonFFTConv

    def piece(x, f):
        return TritonFFTConv.apply(x, f, None, None)

    return blocked_conv(v, k, piece, MAX_FUSED_FFT)


def _check_triton(u: torch.Tensor, float64: bool) -> None:
    """A ValueError where the triton backend cannot run u: fp64, or a CPU tensor outside
    Triton's interpreter (which Triton reads when the kernels are defined, on first use)."""
    if float64:
        raise ValueError("fftconv: the triton backend computes in fp32; use torch for float64")
    from kernels.fft_triton import interpreted

    if not u.is_cuda and not interpreted():
        raise ValueError(
            f"fftconv: the triton backend needs CUDA tensors, got {u.device.type} ones (CPU "
            "tensors run under TRITON_INTERPRET=1, set before the first triton call)"
        )


def _check_shapes(u, k, D, pregate, postgate) -> tuple[int, int, int, int]:
    """(B, H, L, G) of valid inputs; a ValueError naming the bad one otherwise."""
    for name, x in (("u", u), ("k", k), ("D", D), ("pregate", pregate), ("postgate", postgate)):
        # An integer u came back rounded and as integers; a complex one lost its imaginary part.
        # u and k are required: None is an error for them.
        optional = x is None and name not in ("u", "k")
        if not optional and not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"fftconv: {name} must be a real floating tensor, got {got}")
    for name, x in (("k", k), ("D", D), ("pregate", pregate), ("postgate", postgate)):
        # Some methods would read another device's memory or skip the tensor silently.
        if x is not None and x.device != u.device:
            raise ValueError(f"fftconv: {name} must be on u's device {u.device}, got {x.device}")
    for name, g in (("pregate", pregate), ("postgate", postgate)):
        # A wider gate would widen the output (or fail in the direct methods).
        if g is not None and g.dtype != u.dtype:
            raise ValueError(f"fftconv: {name} must have u's dtype {u.dtype}, got {g.dtype}")
    shape = u.shape
    if len(shape) != 3 or shape[1] < 1 or shape[2] < 1:
        raise ValueError(f"fftconv: u must be [B, H>=1, L>=1], got shape {tuple(shape)}")
    B, H, L = shape
    G = k.shape[0] if k.dim() == 2 and k.shape[1] >= 1 else 0
    if not G or H % G:
        raise ValueError(
            f"fftconv: k must be [G, K>=1] with G dividing H={H}, got shape {tuple(k.shape)}"
        )
    if D is not None and D.shape != (G,):
        raise ValueError(f"fftconv: D must be [G={G}] like k, got shape {tuple(D.shape)}")
    for name, g in (("pregate", pregate), ("postgate", postgate)):
        if g is not None and g.shape != shape:
            raise ValueError(
                f"fftconv: {name} must match u {tuple(shape)}, got shape {tuple(g.shape)}"
            )
    return B, H, L, G


def fftconv(
    u: torch.Tensor,
    k: torch.Tensor,
    D: torch.Tensor | None = None,
    pregate: torch.Tensor | None = None,
    postgate: torch.Tensor | None = None,
    backend: str | None = None,
    method: str | None = None,
) -> torch.Tensor:
    """Causal convolution of each channel of ``u`` with its filter, plus skip and gates.

    ``v = u * pregate``; ``y[b,h,t] = postgate * (sum_{s<=t} k[g,t-s] v[b,h,s] + D[g] v[b,h,t])``
    with ``g = h // (H / G)`` (g = h for a filter per channel).

    Args:
        u: [B, H, L] input (float32, float16, bfloat16 or float64).
        k: [G, K] filters, G = H or a divisor of it (shared by H / G consecutive channels);
            taps past L are ignored.
        D: [G] skip weights, one per filter, or None.
        pregate, postgate: [B, H, L] multiplicative gates, or None.
        backend: "torch" or "triton", or None: triton for CUDA tensors (when installed),
            torch otherwise.
        method: "fft", "toeplitz" or "conv1d" (torch), "fft" or "toeplitz" (triton), or None
            for the fastest by shape (:func:`choose_method`). All are exact; this exists to
            force one.

    Returns:
        [B, H, L] in u's dtype; the math inside is fp32 (fp64 for fp64 inputs).
    """
    # Written for few Python operations: between FFTs that evict the interpreter's caches, this
    # dispatch took 20-30 us of a 650 us call at B=1, H=128, L=256 (CPU, 1 thread), about 4x
    # its time in a tight loop. Trimming it (one shape read, no helper per cast) and an op
    # fewer in kernels.fft_torch made that forward 2-4% faster (A/B in one process).
    B, H, L, G = _check_shapes(u, k, D, pregate, postgate)
    K = min(k.shape[1], L)
    if backend is None:
        backend = _default_backend(u, L, K)
    elif backend not in _BACKENDS:
        raise ValueError(f"fftconv: unknown backend {backend!r}; available: {list(_BACKENDS)}")
    float64 = u.dtype == torch.float64
    if backend == "triton":
        _check_triton(u, float64)
    methods = METHODS if backend == "torch" else TRITON_METHODS
    if method is None:
        method = choose_method(B, L, K, backend)
    elif method not in methods:
        raise ValueError(
            f"fftconv: unknown method {method!r} for {backend}; available: {list(methods)}"
        )
    # Half-precision inputs are upcast: FFTs in fp16/bf16 lose too much for long filters.
    dtype = torch.float64 if float64 else torch.float32
    if K < k.shape[1]:
        k = k[:, :K]
    if k.dtype != dtype:
        k = k.to(dtype)
    if D is not None and D.dtype != dtype:
        D = D.to(dtype)
    # Shared filters to one per channel: only the torch toeplitz method uses them as such.
    if G != H and (backend != "torch" or method != "toeplitz"):
        k, D = per_channel(k, H // G), None if D is None else per_channel(D, H // G)
    if backend == "torch" and method == "fft" and B:  # D goes into its padded filter buffer
        return fft_conv(u, k, D, pregate, postgate)
    k = with_skip(k, D)
    if backend == "triton" and method == "toeplitz":
        from kernels.toeplitz_triton import TritonToeplitzConv

        return TritonToeplitzConv.apply(u, k, pregate, postgate)
    if backend == "triton" and L + K - 1 <= MAX_FUSED_FFT:
        from kernels.fft_triton import TritonFFTConv

        return TritonFFTConv.apply(u, k, pregate, postgate)
    # The rest take the gates outside: the torch direct methods and the triton blocked FFT.
    # (An empty batch goes to conv1d: MKL's FFT refuses zero rows, the blocked FFT's rearranges
    # zero batch rows.)
    conv = _DIRECT.get(method, conv1d_conv) if backend == "torch" or not B else _triton_blocked
    v = u.to(dtype)
    if pregate is not None:
        v = v * pregate
    # conv1d and matmul are on autocast's lower-precision list: under bf16 autocast they would
    # round v and k to bf16, where the math here is fp32 like the fft method's.
    with torch.autocast(u.device.type, enabled=False):
        z = conv(v, k)
    return (z * postgate if postgate is not None else z).to(u.dtype)
