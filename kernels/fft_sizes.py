"""FFT length selection, and the size limit of the fused (Triton) kernel."""

from functools import cache

# Largest FFT that fftconv's triton "fft" method sends to the fused kernels (L + K - 1 <=
# 16384, their capacity kernels.fft_triton.FUSED_CAPACITY); beyond it, the blocked
# decomposition into pieces of this size. On an H100 (B=16, H=768, K=L, bf16, forward, median
# ms; benchmarks/results/triton_gpu_h100_tuning.json, run2) the blocked path in pieces of 4096
# took 20.4 at L=4096 and 68.8 at 8192 against the fused kernel's 4.97 and 9.41 (2.80 and 8.24
# with the plans timed since).
MAX_FUSED_FFT = 16384
# Beyond this length the diagonal-SSM layers pass state between chunks of it
# (kernels.state_passing) instead of convolving with a length-L filter. Not the fused size:
# chunks of 2048 (the fused kernel's K = L limit) measured slower than one long convolution,
# on CPU (H3 width 256, B=1, L=4096, fwd+bwd: 1640 ms chunked vs 258 ms, 1 thread), and the
# chunked H3 layer took 32 ms at L=4096 on an H100 against 7.0 ms unchunked at L=2048
# (benchmarks/results/layer_speed_cuda.json, run with chunks of 2048). Chunking is still
# slower on CPU after its Vandermonde products were split like S4DKernel's, by 1.6-2.5x
# (paired): `python3 -m benchmarks.state_passing --repeats 15` (H=128, 32 modes, B=1, fwd+bwd,
# 1 thread, AMD EPYC; benchmarks/results/state_passing_cpu.json), one convolution vs chunks of
# 8192 / 4096 / 2048: L=16K 171 vs 323 / 281 / 289 ms; L=4K 43 vs 108 ms (2048). What the
# threshold buys is no length-L filter or spectrum in memory (the benchmark does not measure
# memory), not speed.
STATE_PASSING_LEN = 8192


@cache
def next_fast_len(n: int) -> int:
    """Smallest m >= n whose only prime factors are 2, 3 and 5 (fast for pocketfft/cuFFT)."""
    if n < 1:
        raise ValueError(f"next_fast_len: n must be >= 1, got {n}")
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1
