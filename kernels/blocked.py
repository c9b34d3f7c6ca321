"""Exact causal convolution of any length from convolutions that fit a fixed FFT size.

For stateless filters (Hyena's implicit filters, K up to L) beyond the fused Triton kernel's
size there is no SSM state to pass between chunks; instead the filter and the signal are both
cut into blocks of P samples (a block-Toeplitz decomposition). With k_d = k[d P : (d+1) P],

    y[(j + d) P + t] += (k_d * window_j)[C + t],   t = 0 .. P-1,

where window_j = v[j P - C : (j+1) P] (zeros before 0) carries C = min(K, P) - 1 samples of
left context, enough for P taps. For each filter block d, all windows j = 0 .. nB-1-d (nB =
ceil(L / P)) go through one batched call of the piece convolution, whose causal convolution
of P + C samples with <= P taps needs an FFT of P + 2C: so P = (max_fft + 2) // 3 when K >= P
(e.g. 5462 for the fused 16384), and one larger block P = max_fft - 2 (K - 1) for shorter
filters. Every piece is an ordinary differentiable call, so autograd gives all gradients.

Cost, the trade-off: nB (nB + 1) / 2 windows through FFTs of size max_fft for K = L, i.e.
O(L^2 / P) work instead of one O(L log L) FFT. What it buys: exactness at any length with
every piece in the fused kernel (fp32 math, no length-L spectra in memory). On an H100 a single
cuFFT of the whole length won clearly: at B=16, H=768, L = K = 16K, bf16, 155 / 511 ms
fwd / fwd+bwd blocked against 10.4 / 27.8 for the torch path
(benchmarks/results/fftconv_cuda.json), which is why fftconv's default sends such shapes to
torch; backend="triton" still comes here. The windows take (P + C) / P <= 2x the signal's
memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange


def block_len(K: int, max_fft: int) -> int:
    """P: the block length whose pieces (P + 2 min(K, P) - 2 samples) fit max_fft."""
    return max(max_fft - 2 * (K - 1), (max_fft + 2) // 3)


def blocked_conv(
    v: torch.Tensor,
    k: torch.Tensor,
    conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    max_fft: int,
) -> torch.Tensor:
    """Causal convolution z = k * v from pieces ``conv`` computes within an FFT of max_fft.

    Args:
        v: [B, H, L] signal (gates already applied), in the compute dtype.
        k: [H, K] filters, K <= L, same dtype (skip term folded into tap 0 or not: any filter).
        conv: (x [B', H, L'], f [H, K']) -> the causal convolution [B', H, L']; called with
            L' + K' - 1 <= max_fft only.
        max_fft: the largest L' + K' - 1 that conv accepts (>= 3).

    Returns:
        z [B, H, L] in v's dtype.
    """
    B, _, L = v.shape
    K = k.shape[-1]
    P = block_len(K, max_fft)
    C = min(K, P) - 1
    blocks = -(-L // P)
    # Windows of P + C samples at stride P, ordered window-major so that the first w windows of
    # every batch row are one contiguous slice: [(blocks B), H, P + C].
    windows = F.pad(v, (C, blocks * P - L)).unfold(-1, P + C, P)
    windows = rearrange(windows, "b h w t -> (w b) h t").contiguous()
    z = v.new_zeros(B, v.shape[1], blocks * P)
    for d in range(-(-K // P)):
        piece = conv(windows[: (blocks - d) * B], k[:, d * P : (d + 1) * P].contiguous())
        z[..., d * P :] += rearrange(piece[..., C:], "(w b) h t -> b h (w t)", b=B)
    return z[..., :L]
