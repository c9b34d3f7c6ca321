"""Tensor ops for long convolutions, SSM kernels and the MLPs' activation. Imports nothing from
the project.

- :func:`fftconv` - causal long convolution with skip term and gates (FlashConv interface).
- :func:`s4d_kernel`, :func:`s4d_discretize` - diagonal SSM (S4D) convolution kernels.
- :func:`shift_kernel` - the shift SSM kernel of H3 (a learned FIR filter).
- :func:`ssm_chunked_conv` - a diagonal SSM's convolution in chunks with state passing, used
  beyond :data:`STATE_PASSING_LEN`.
- :func:`contiguous_grad` - the identity, with its gradient made contiguous on the way back.
- :func:`causal_toeplitz` - the [L, L] matrix of a causal convolution with a filter.
- :func:`per_channel` - per-filter parameters repeated for the channels that share them.
- :func:`with_skip` - a filter with the skip weight D added to its tap 0.
- :func:`gelu_tanh` - tanh-GELU through a sigmoid, for the CPU (the MLPs' activation).
"""

from kernels.activations import gelu_tanh
from kernels.direct import causal_toeplitz, contiguous_grad, per_channel, with_skip
from kernels.dispatch import backends, fftconv
from kernels.fft_sizes import STATE_PASSING_LEN
from kernels.ssm import s4d_discretize, s4d_kernel, shift_kernel
from kernels.state_passing import ssm_chunked_conv

__all__ = [
    "STATE_PASSING_LEN",
    "backends",
    "causal_toeplitz",
    "contiguous_grad",
    "fftconv",
    "gelu_tanh",
    "per_channel",
    "s4d_discretize",
    "s4d_kernel",
    "shift_kernel",
    "ssm_chunked_conv",
    "with_skip",
]
