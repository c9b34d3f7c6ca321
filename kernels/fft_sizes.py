"""FFT length selection, and the size limit of the fused (Triton) kernel."""

from functools import cache

# Largest FFT the fused Triton kernel holds (kernels.fft_triton): L + K - 1 <= 16384.
MAX_FUSED_FFT = 16384
# Longest sequence with a full-length filter (K = L) that fits it; layers pass SSM state
# between chunks of this length beyond it (kernels.state_passing).
FUSED_MAX_LEN = MAX_FUSED_FFT // 2


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
