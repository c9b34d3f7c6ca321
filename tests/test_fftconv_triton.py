"""The triton backend of fftconv against the float64 oracle, under TRITON_INTERPRET=1 on CPU.

The interpreter runs the kernels' tl.dot as numpy matmuls: slow, so the sizes stay small.
fp32 inputs: the fused kernel's fp32 DFTs (twiddles rounded once from fp64) agree with the
oracle to ~1e-5 of the output's scale at these sizes; tolerance 1e-4.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
pytest.importorskip("triton")

from test_kernels import direct_conv, make_inputs  # noqa: E402

from kernels import fftconv  # noqa: E402
from kernels.fftconv import backends  # noqa: E402


def assert_close_scaled(got, want, tol):
    """max |got - want| <= tol * max |want| (errors scale with the output, not per entry)."""
    assert (got.double() - want).abs().max() <= tol * want.abs().max().clamp(min=1e-30)


@pytest.mark.parametrize(
    "L, K", [(1, 1), (17, 3), (17, 17), (64, 1), (64, 64), (256, 3), (256, 256)]
)
@pytest.mark.parametrize("gates, skip", [(True, True), (False, False)])
def test_triton_forward_and_grads(L, K, gates, skip):
    args = make_inputs(2, 3, L, K, torch.float32, gates, skip, seed=L + K)
    y = fftconv(*args, backend="triton")
    ref = direct_conv(*args)
    assert y.dtype == torch.float32
    assert_close_scaled(y, ref, 1e-4)
    gy = torch.randn_like(y)
    present = [a for a in args if a is not None]
    got = torch.autograd.grad(y, present, gy)
    want = torch.autograd.grad(ref, present, gy.double())
    for a, b in zip(got, want):
        assert_close_scaled(a, b, 1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_triton_low_precision(dtype, tol):
    args = make_inputs(2, 2, 64, 64, dtype)
    y = fftconv(*args, backend="triton")
    assert y.dtype == dtype
    assert_close_scaled(y, direct_conv(*args), tol)
    y.float().sum().backward()
    assert all(a.grad.dtype == dtype for a in args)


def test_triton_backend_choice_and_limits():
    assert "triton" in backends()
    u, k = torch.randn(1, 2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="float64"):
        fftconv(u.double(), k.double(), backend="triton")
    with pytest.raises(ValueError, match="fused"):
        fftconv(torch.randn(1, 1, 9000), torch.randn(1, 9000), backend="triton")
