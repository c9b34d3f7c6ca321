"""FFT length selection, and the size limit of the fused (Triton) kernel."""

from functools import cache

# Largest FFT that fftconv sends to the fused Triton kernels (L + K - 1 <= 4096); beyond it,
# the blocked decomposition into pieces of this size. The kernels themselves launch up to
# kernels.fft_triton.FUSED_CAPACITY (16384: every size fits an H100's shared memory in offline
# sm_90 compiles), but only 4096 and below have been timed on a GPU, with the earlier kernel;
# this moves once the fused kernel has been timed against the blocked path at 8K and 16K.
MAX_FUSED_FFT = 4096
# Beyond this length the diagonal-SSM layers pass state between chunks of it
# (kernels.state_passing) instead of convolving with a length-L filter. Not the fused size:
# chunks of 2048 (the fused kernel's K = L limit) measured slower than one long convolution,
# on CPU (H3 width 256, B=1, L=4096, fwd+bwd: 1640 ms chunked vs 258 ms, 1 thread), and the
# chunked H3 layer took 32 ms at L=4096 on an H100 against 7.0 ms unchunked at L=2048
# (benchmarks/results/layer_speed_cuda.json, run with chunks of 2048).
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
