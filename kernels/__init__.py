"""Tensor ops for long convolutions and SSM kernels. Imports nothing from the project.

- :func:`fftconv` - causal long convolution with skip term and gates (FlashConv interface).
- :func:`s4d_kernel`, :func:`s4d_discretize` - diagonal SSM (S4D) convolution kernels.
- :func:`shift_kernel` - the shift SSM kernel of H3 (a learned FIR filter).
"""

from kernels.fftconv import backends, fftconv
from kernels.ssm import s4d_discretize, s4d_kernel, shift_kernel

__all__ = ["backends", "fftconv", "s4d_discretize", "s4d_kernel", "shift_kernel"]
