"""kernels: fftconv against a float64 direct convolution; SSM kernels against recurrences."""

import pytest
import torch
import torch.nn.functional as F

from kernels import (
    direct,
    fft_torch,
    fftconv,
    gelu_tanh,
    s4d_discretize,
    s4d_kernel,
    shift_kernel,
    ssm_chunked_conv,
)
from kernels.dispatch import METHODS, choose_method
from kernels.fft_sizes import next_fast_len
from kernels.ssm import s4d_state


def direct_conv(u, k, D=None, pregate=None, postgate=None):
    """Oracle: float64 causal convolution with conv1d (a different algorithm from the FFT)."""
    u = u.double()
    v = u * pregate.double() if pregate is not None else u
    B, H, L = v.shape
    k = k.double()[:, :L]
    # conv1d is a correlation: flip the filter and left-pad by K-1 for a causal convolution.
    y = F.conv1d(F.pad(v, (k.shape[1] - 1, 0)), k.flip(-1)[:, None, :], groups=H)
    if D is not None:
        y = y + D.double()[:, None] * v
    return y * postgate.double() if postgate is not None else y


def make_inputs(B, H, L, K, dtype, gates=True, skip=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return (
        r(B, H, L),
        r(H, K),
        r(H) if skip else None,
        r(B, H, L) if gates else None,
        r(B, H, L) if gates else None,
    )


SHAPES = [(L, K) for L in (1, 2, 3, 17, 64, 255, 1024) for K in sorted({1, 3, (L + 1) // 2, L})]


@pytest.mark.parametrize("L, K", SHAPES)
@pytest.mark.parametrize("gates, skip", [(True, True), (False, False), (False, True)])
def test_forward_and_grads_float64(L, K, gates, skip):
    args = make_inputs(2, 3, L, K, torch.float64, gates, skip)
    y = fftconv(*args)
    ref = direct_conv(*args)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y)
    present = [a for a in args if a is not None]
    got = torch.autograd.grad(y, present, gy)
    want = torch.autograd.grad(ref, present, gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


METHOD_SHAPES = [
    (L, K)
    for L in (1, 2, 3, 17, 64, 255, 256, 1000, 1024, 4096)
    for K in sorted({1, 3, 64, L})
    if K <= L
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("L, K", METHOD_SHAPES)
def test_every_method_float64(method, L, K):
    """Each torch method, forced, against the oracle: values and all five gradients."""
    for gates, skip in [(True, True), (False, False), (False, True)]:
        args = make_inputs(2, 2, L, K, torch.float64, gates, skip, seed=L + K)
        y = fftconv(*args, method=method)
        ref = direct_conv(*args)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        gy = torch.randn_like(y)
        present = [a for a in args if a is not None]
        got = torch.autograd.grad(y, present, gy)
        want = torch.autograd.grad(ref, present, gy)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("L, K", [(30, 30), (100, 40)])  # one Toeplitz block, and several
def test_strided_inputs_and_gradient_float64(method, L, K):
    """A layer hands fftconv transposed views of [B, L, H] activations and gets its gradient
    back through such views; each method (the Toeplitz one makes both contiguous for its
    matmuls) against the oracle, with every input and the output's gradient strided."""
    args = make_inputs(4, 6, L, K, torch.float64, seed=L)
    leaves = [a.detach().transpose(1, 2).contiguous().requires_grad_() if a.dim() == 3 else a
              for a in args]  # fmt: skip
    strided = [a.transpose(1, 2) if a.dim() == 3 else a for a in leaves]
    assert not strided[0].is_contiguous()
    y = fftconv(*strided, method=method)
    ref = direct_conv(*strided)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn(4, L, 6, dtype=torch.float64).transpose(1, 2)
    got = torch.autograd.grad(y, leaves, gy)
    for a, b in zip(got, torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("G, r, L, K", [(2, 4, 30, 30), (3, 32, 20, 20), (2, 3, 100, 40)])
def test_shared_filters_float64(method, G, r, L, K):
    """k [G, K] and D [G] shared by groups of r channels: the oracle convolves each channel
    with its group's filter repeated by hand, so the filter and skip gradients are sums over
    each group. Covers the Toeplitz method's per-channel repeat (r = 4), its one-matmul-per-group
    form (r = 32 >= GROUP_MATMUL_MIN) and its blocked form (L > K), and the other methods'."""
    u, _, _, pre, post = make_inputs(2, G * r, L, K, torch.float64, seed=G * r)
    _, k, D, _, _ = make_inputs(1, G, 1, K, torch.float64, seed=G + r)
    assert (r >= direct.GROUP_MATMUL_MIN) == (r == 32)
    y = fftconv(u, k, D, pre, post, method=method)
    index = torch.arange(G * r) // r  # channel h takes filter h // r
    ref = direct_conv(u, k[index], D[index], pre, post)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y)
    leaves = [u, k, D, pre, post]
    got = torch.autograd.grad(y, leaves, gy)
    for a, b in zip(got, torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("block_elems", [2**7, 2**9, 2**12])
def test_fft_row_blocks_float64(monkeypatch, block_elems):
    """The fft method split into row blocks (whole batches of channels, and channel ranges of
    one batch element), with every gradient, and without autograd, against the oracle."""
    monkeypatch.setattr(fft_torch, "BLOCK_ELEMS", block_elems)
    args = make_inputs(3, 5, 40, 33, torch.float64)  # n = 80: 1, 6 and 51 rows per block
    ref = direct_conv(*args)
    y = fftconv(*args, method="fft")
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, args, gy), torch.autograd.grad(ref, args, gy)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(fftconv(*args, method="fft"), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block_elems", [1, 2**14, 2**15, 2**30])
@pytest.mark.parametrize("L, K", [(30, 30), (100, 40)])  # one Toeplitz block, and several
def test_toeplitz_filter_gradient_in_channel_blocks_float64(monkeypatch, block_elems, L, K):
    """The Toeplitz block's backward sums diagonals a few channels at a time: 1 channel per
    block, blocks of 9 (L=30) and 3 (L=100) of the 11 with the last one short, and all in one."""
    monkeypatch.setattr(direct, "_DIAGONAL_BLOCK_ELEMS", block_elems)
    args = make_inputs(2, 11, L, K, torch.float64, seed=block_elems)
    y = fftconv(*args, method="toeplitz")
    ref = direct_conv(*args)
    gy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, args, gy), torch.autograd.grad(ref, args, gy)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (3,), (4,), (0, 2), (1, 2), (2, 3, 4)])
@pytest.mark.parametrize("block_elems", [2**7, 2**21])
def test_fft_gradient_subsets_float64(monkeypatch, wanted, block_elems):
    """The fft method's backward computes only what is asked for (u, k, D, pregate, postgate
    by position): D without k, k without D, the signal alone; in one block and in several."""
    monkeypatch.setattr(fft_torch, "BLOCK_ELEMS", block_elems)
    args = [a.detach() for a in make_inputs(2, 3, 50, 20, torch.float64, seed=7)]
    for i in wanted:
        args[i].requires_grad_()
    y = fftconv(*args, method="fft")
    ref = direct_conv(*args)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y)
    present = [args[i] for i in wanted]
    for a, b in zip(torch.autograd.grad(y, present, gy), torch.autograd.grad(ref, present, gy)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_fft_kept_workspace_float64():
    """On a CPU, calls of one shape reuse a kept FFT input buffer whose zero tail is written
    once. Against the oracle: a buffer first made in inference mode and then used in training,
    filter lengths that share the FFT size (K=40 and 39: n=80), every forward pass made before
    the first backward pass (which reuses the buffer's rows), and eviction by other shapes in
    between."""
    fft_torch._kept.__dict__.clear()
    first = [a.detach() for a in make_inputs(2, 3, 40, 40, torch.float64, seed=1)]
    with torch.inference_mode():
        y = fftconv(*first, method="fft")
    torch.testing.assert_close(y, direct_conv(*first), rtol=1e-10, atol=1e-10)
    assert len(fft_torch._kept.by_shape) == 1  # the kept path is the one under test
    calls = [make_inputs(2, 3, 40, K, torch.float64, seed=s) for s, K in enumerate((40, 39, 3))]
    calls.append(make_inputs(2, 3, 40, 40, torch.float64, seed=9))
    ys = [fftconv(*args, method="fft") for args in calls]
    for K in range(4, 4 + fft_torch._KEPT_WORKSPACES):  # evicts every buffer made above
        fftconv(*make_inputs(1, 3, 40, K, torch.float64), method="fft")
    for args, y in zip(calls[::-1], ys[::-1]):
        ref = direct_conv(*args)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        gy = torch.randn_like(y)
        for a, b in zip(torch.autograd.grad(y, args, gy), torch.autograd.grad(ref, args, gy)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def second_order_grads(conv, args):
    """Gradients of a gradient penalty: |d(y . gy)/d args|^2 differentiated again, with respect
    to every input (create_graph=True through conv)."""
    y = conv(*args)
    gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    present = [a for a in args if a is not None]
    first = torch.autograd.grad(y, present, gy, create_graph=True)
    return torch.autograd.grad(sum((g**2).sum() for g in first), present)


@pytest.mark.parametrize("method", METHODS)
def test_double_backward_float64(method):
    """create_graph=True through each method, against autograd through the conv1d oracle: the
    hand-written backward passes fall back to a differentiable reference (the fft method's
    second derivatives in k, D and the gates were silently dropped before)."""
    args = make_inputs(2, 3, 20, 12, torch.float64)
    got = second_order_grads(lambda *a: fftconv(*a, method=method), args)
    want = second_order_grads(direct_conv, args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def tied_conv(conv):
    """A convolution whose arguments share tensors, as models make them: u depends on k, and
    one tensor is both gates. (x [B, H, L], k [H, K]) -> y [B, H, L]."""
    return lambda x, k: conv(x * k.sum(), k, None, x, x)


@pytest.mark.parametrize("method", METHODS)
def test_repeated_and_double_backward_with_tied_inputs_float64(method):
    """A second backward (a Jacobian) and create_graph=True take each argument's own partial
    derivative: the fallback of the hand-written backward passes once differentiated with
    respect to the inputs themselves, so a tensor in two slots, or one input computed from
    another, had its paths counted twice (the fft method's Jacobian was off by 100%)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    got_conv, want_conv = tied_conv(lambda *a: fftconv(*a, method=method)), tied_conv(direct_conv)
    jacobian = torch.autograd.functional.jacobian
    for a, b in zip(jacobian(got_conv, (x, k)), jacobian(want_conv, (x, k))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(second_order_grads(got_conv, (x, k)), second_order_grads(want_conv, (x, k))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_fft_second_backward_through_retained_graph():
    """The first backward frees the fft method's kept spectra; a second one (retain_graph, as
    torch.autograd.functional.jacobian does) recomputes by the reference and agrees."""
    args = make_inputs(1, 2, 64, 64, torch.float64)
    y = fftconv(*args, method="fft").sum()
    y.backward(retain_graph=True)
    first = [a.grad.clone() for a in args]
    y.backward()
    for a, g in zip(args, first):
        torch.testing.assert_close(a.grad, 2 * g, rtol=1e-12, atol=1e-12)
    u, k = (a.detach() for a in args[:2])
    jacobian = torch.autograd.functional.jacobian(lambda k: fftconv(u, k, method="fft"), k)
    want = torch.autograd.functional.jacobian(lambda k: direct_conv(u, k), k)
    torch.testing.assert_close(jacobian, want, rtol=1e-10, atol=1e-10)
    # gradcheck's reentrancy check compares two backward passes: the second, by the reference,
    # rounds differently (~4e-16), so it needs a tolerance.
    small = [a.detach()[..., :12].clone().requires_grad_() for a in args[:2]]
    conv = lambda u, k: fftconv(u, k, method="fft")  # noqa: E731
    assert torch.autograd.gradcheck(conv, small, nondet_tol=1e-12)


def test_method_choice():
    assert choose_method(32, 20, 20) == choose_method(32, 30, 30) == "toeplitz"  # training
    assert choose_method(1, 30, 30) == choose_method(8, 30, 30) == "fft"
    # the Toeplitz limit grows with the batch: B >= L / 2, up to L = 96
    assert choose_method(16, 32, 32) == choose_method(32, 64, 64) == "toeplitz"
    assert choose_method(16, 48, 48) == choose_method(64, 128, 128) == "fft"
    assert choose_method(500, 96, 96) == "toeplitz" != choose_method(500, 97, 97)
    assert choose_method(4, 4096, 3) == "conv1d"
    assert choose_method(4, 4096, 4096) == "fft"
    with pytest.raises(ValueError, match="method"):
        fftconv(torch.randn(1, 1, 4), torch.randn(1, 2), method="winograd")


def test_crossover_constants_patch_by_their_dotted_name(monkeypatch):
    """The dispatch module is reachable as kernels.dispatch (kernels.fftconv is the function), so
    monkeypatching a crossover by its dotted name reaches the constant choose_method reads."""
    monkeypatch.setattr("kernels.dispatch.TOEPLITZ_MAX_LEN", 0)
    assert choose_method(32, 20, 20) == "fft"


# Tolerances relative to the output's scale. fp32 inputs: fp32 rounding of the math; fp16 and
# bf16: dominated by the final cast of the output (~2^-11 and ~2^-8 relative) and of the gates.
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)]
)
def test_low_precision_inputs(dtype, tol, method):
    args = make_inputs(2, 4, 256, 64, dtype)
    y = fftconv(*args, method=method)
    assert y.dtype == dtype
    ref = direct_conv(*args)
    # Relative to the output's scale: low-precision inputs are exact in float64, so the error
    # is the rounding of the fp32 math and of the final cast.
    scale = ref.abs().max()
    assert (y.double() - ref).abs().max() / scale < tol
    y.float().sum().backward()
    assert all(a.grad.dtype == dtype for a in args)


def test_filter_longer_than_sequence_is_truncated():
    u, k, D, pre, post = make_inputs(1, 2, 5, 9, torch.float64)
    torch.testing.assert_close(fftconv(u, k, D, pre, post), direct_conv(u, k[:, :5], D, pre, post))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda u, k: (u[0], k), "u must be"),
        (lambda u, k: (u, k[:2]), "k must be"),  # 2 filters cannot be shared by 3 channels
        (lambda u, k: (u, k, torch.ones(7)), "D must be"),
        (lambda u, k: (u, k, None, u[:, :1]), "pregate must match"),
        (lambda u, k: (u[..., :0], k), r"u must be \[B, H>=1, L>=1\]"),
        (lambda u, k: (u[:, :0], k[:0]), r"u must be \[B, H>=1, L>=1\]"),  # not "k must be"
        (lambda u, k: (u, k.tolist()), "k must be a real floating tensor, got list"),
        # None was skipped as an absent optional argument: an AttributeError from inside.
        (lambda u, k: (None, k), "u must be a real floating tensor, got NoneType"),
        (lambda u, k: (u, None), "k must be a real floating tensor, got NoneType"),
        # Integers came back rounded, complex numbers without their imaginary part.
        (lambda u, k: (u.long(), k), "u must be a real floating tensor, got torch.int64"),
        (lambda u, k: (u, k.cfloat()), "k must be a real floating tensor"),
        (lambda u, k: (u, k, torch.ones(3, dtype=torch.int32)), "D must be a real floating"),
        # A wider gate widened the output (fft) or failed inside (the direct methods).
        (lambda u, k: (u, k, None, None, u.double()), "postgate must have u's dtype"),
        # Another device's D was skipped by the fft method, its k read as garbage by conv1d
        # (shown with meta tensors, which need no GPU).
        (lambda u, k: (u, k, torch.ones(3, device="meta")), "D must be on u's device cpu"),
        (lambda u, k: (u, k.to("meta")), "k must be on u's device cpu, got meta"),
    ],
)
def test_shape_errors(bad, match):
    u, k = torch.randn(2, 3, 8), torch.randn(3, 4)
    with pytest.raises(ValueError, match=match):
        fftconv(*bad(u, k))


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch(method):
    u, k, D, pre, post = make_inputs(0, 4, 8, 8, torch.float32)
    y = fftconv(u, k, D, pre, post, method=method)  # MKL's FFT refuses zero rows
    assert y.shape == (0, 4, 8)
    y.sum().backward()
    assert k.grad.shape == k.shape and not k.grad.any()


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_keeps_fp32_math(method):
    # conv1d and matmul are on autocast's lower-precision list: the direct methods would run
    # in bf16 under it, and every method's math is fp32.
    args = make_inputs(17, 4, 32, 32, torch.float32)
    ref = direct_conv(*(a.detach().double() for a in args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fftconv(*args, method=method)
    assert y.dtype == torch.float32
    assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-6


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        fftconv(torch.randn(1, 1, 4), torch.randn(1, 2), backend="cuda-magic")


def test_next_fast_len():
    smooth = lambda n: all(p in (2, 3, 5) for p in _factors(n))  # noqa: E731
    for n in range(1, 400):
        m = next_fast_len(n)
        assert m >= n and smooth(m) and not any(smooth(j) for j in range(n, m))


def _factors(n):
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_s4d_kernel_equals_recurrence(method):
    g = torch.Generator().manual_seed(1)
    H, N, L = 3, 4, 40
    dt = torch.rand(H, generator=g, dtype=torch.float64) * 0.2 + 0.01
    A = torch.complex(
        -torch.rand(H, N, generator=g, dtype=torch.float64) - 0.1,
        torch.randn(H, N, generator=g, dtype=torch.float64) * 3,
    )
    B = torch.randn(H, N, generator=g, dtype=torch.complex128)
    C = torch.randn(H, N, generator=g, dtype=torch.complex128)
    K = s4d_kernel(dt, A, B, C, L, method)
    # Oracle: the impulse response of x <- dA x + dB u, y = 2 Re(C x), with dA, dB written out
    # from the discretisation formulas directly.
    if method == "zoh":
        dA = torch.exp(dt[:, None] * A)
        dB = (dA - 1) / A * B
    else:
        dA = (1 + dt[:, None] * A / 2) / (1 - dt[:, None] * A / 2)
        dB = dt[:, None] * B / (1 - dt[:, None] * A / 2)
    got_dA, got_dB = s4d_discretize(dt, A, B, method)
    torch.testing.assert_close(got_dA, dA)
    torch.testing.assert_close(got_dB, dB)
    x = torch.zeros(H, N, dtype=torch.complex128)
    for t in range(L):
        x = dA * x + (dB if t == 0 else 0)
        torch.testing.assert_close(K[:, t], 2 * (C * x).sum(-1).real)


@pytest.mark.parametrize("L", [1, 2, 17, 1000])
def test_s4d_kernel_factorised_equals_vandermonde_sum(L):
    """s4d_kernel splits lags as a + P b (a matmul); the plain sum over all L lags agrees."""
    g = torch.Generator().manual_seed(L)
    H, N = 2, 5
    dt = torch.rand(H, generator=g, dtype=torch.float64) * 0.1 + 0.001
    A = torch.complex(
        -torch.rand(H, N, generator=g, dtype=torch.float64),
        torch.randn(H, N, generator=g, dtype=torch.float64) * 10,
    )
    B, C = (torch.randn(H, N, generator=g, dtype=torch.complex128) for _ in range(2))
    dA, dB = s4d_discretize(dt, A, B, "bilinear")
    lags = torch.arange(L, dtype=torch.float64)
    want = 2 * (C * dB)[..., None].mul(dA[..., None] ** lags).sum(1).real
    torch.testing.assert_close(s4d_kernel(dt, A, B, C, L, "bilinear"), want)


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
@pytest.mark.parametrize("L", [1, 2, 17, 300])
@pytest.mark.parametrize("with_b", [True, False])
def test_s4d_kernel_gradients_float64(method, L, with_b):
    """s4d_kernel's hand-written backward (kernels.ssm.S4DKernel: the Vandermonde product, log
    dA and the discretisation) against autograd through the plain complex sum over all L lags,
    for dt, A, B (or B = None) and C."""
    g = torch.Generator().manual_seed(L + 7)
    H, N = 3, 4
    dt = (torch.rand(H, generator=g, dtype=torch.float64) * 0.1 + 0.001).requires_grad_()
    A_re = (-torch.rand(H, N, generator=g, dtype=torch.float64) - 0.05).requires_grad_()
    A_im = (torch.randn(H, N, generator=g, dtype=torch.float64) * 10).requires_grad_()
    B, C = (
        torch.randn(H, N, generator=g, dtype=torch.complex128).requires_grad_() for _ in range(2)
    )
    params = (dt, A_re, A_im, B, C) if with_b else (dt, A_re, A_im, C)
    B = B if with_b else None
    A = torch.complex(A_re, A_im)
    got = s4d_kernel(dt, A, B, C, L, method)
    dA, dB = s4d_discretize(dt, A, B, method)
    lags = torch.arange(L, dtype=torch.float64)
    want = 2 * (C * dB)[..., None].mul(dA[..., None] ** lags).sum(1).real
    torch.testing.assert_close(got, want)
    gy = torch.randn(want.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, params, gy, retain_graph=True)  # A is shared
    for a, b in zip(got_grads, torch.autograd.grad(want, params, gy)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_bilinear_at_zero_dA_float64():
    """dt A = -2 on a real mode makes the bilinear dA exactly 0 (log dA = -inf): the kernel, its
    gradients and the state stay exact, against a recurrence and central differences (the
    kernel is smooth there)."""
    C = torch.tensor([[1.0 + 0.5j, 2.0 - 1j]], dtype=torch.complex128)
    A = torch.tensor([[-0.5 + 0j, -0.5 + 1j]], dtype=torch.complex128)
    dt = torch.tensor([4.0], dtype=torch.float64)
    gy = torch.tensor([[0.3, -1.2, 0.7, 2.0, -0.4]], dtype=torch.float64)

    def loss(dt, A):
        return (s4d_kernel(dt, A, None, C, 5, "bilinear") * gy).sum()

    dA, dB = s4d_discretize(dt, A, None, "bilinear")
    assert dA[0, 0] == 0
    x, want = torch.zeros_like(dA), []
    for t in range(5):
        x = dA * x + (dB if t == 0 else 0)
        want.append(2 * (C * x).sum(-1).real)
    torch.testing.assert_close(s4d_kernel(dt, A, None, C, 5, "bilinear"), torch.stack(want, 1))
    params = (dt.clone().requires_grad_(), A.clone().requires_grad_())
    got_dt, got_A = torch.autograd.grad(loss(*params), params)
    h = 1e-6
    fd_dt = (loss(dt + h, A) - loss(dt - h, A)) / (2 * h)
    step = torch.zeros_like(A)
    step[0, 0] = h
    fd_re = (loss(dt, A + step) - loss(dt, A - step)) / (2 * h)
    fd_im = (loss(dt, A + 1j * step) - loss(dt, A - 1j * step)) / (2 * h)
    torch.testing.assert_close(got_dt, fd_dt.reshape(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_A[0, 0], torch.complex(fd_re, fd_im), rtol=1e-6, atol=1e-6)
    u = torch.tensor([[[1.0, -2.0, 0.5]]], dtype=torch.float64)
    state = dB * (dA**2 * u[..., 0] + dA * u[..., 1] + u[..., 2])  # x_L from the zero state
    torch.testing.assert_close(s4d_state(u, dt, A, None, "bilinear"), state[None])
    # The same gradients by the other routes through dA^1: a double backward's (the plain
    # Vandermonde sum), and chunked state passing's (its decay and the state's output). Both
    # took lag 1 through log |dA|, which has no derivative at 0, and were finite but wrong.
    grads = torch.autograd.grad(loss(*params), params, create_graph=True)
    for got, want in zip(grads, (got_dt, got_A)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    v = torch.tensor([[[1.0, -2.0, 0.5, 0.25, 3.0]]], dtype=torch.float64)

    def chunked(dt, A, chunk=2):
        return (ssm_chunked_conv(v, dt, A, None, C, None, chunk, "bilinear") * gy[None]).sum()

    def whole(dt, A):
        return (fftconv(v, s4d_kernel(dt, A, None, C, 5, "bilinear")) * gy[None]).sum()

    for chunk in (1, 2):
        grads = torch.autograd.grad(chunked(*params, chunk), params)
        for got, want in zip(grads, torch.autograd.grad(whole(*params), params)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    fd = (chunked(dt + h, A) - chunked(dt - h, A)) / (2 * h)
    torch.testing.assert_close(grads[0], fd.reshape(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1e-3, 1e-5, 1e-7])
def test_zoh_kernel_gradient_at_small_dt_A(dtype, scale):
    """zoh's dB = (e^(dt A) - 1) / A and its A-derivative cancel where |dt A| is small (dB was
    0 in fp32 below 6e-8; dK/dA 5% off in fp64 at A ~ -1e-5): the kernel and its gradients
    against mpmath at 40 digits (the kernel differentiated numerically there, exactly enough)."""
    import mpmath

    mpmath.mp.dps = 40
    L = 4
    dt0, A0, C0 = scale, complex(-scale, 2 * scale), complex(0.7, -0.3)
    gy = [0.3, -1.2, 0.7, 2.0]

    def loss(dt, a_re, a_im):
        A = mpmath.mpc(a_re, a_im)
        dB = mpmath.expm1(dt * A) / A
        return sum(g * 2 * mpmath.re(C0 * dB * mpmath.exp(l * dt * A)) for l, g in enumerate(gy))

    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    dt = torch.tensor([dt0], dtype=dtype, requires_grad=True)
    A = torch.tensor([[A0]], dtype=complex_dtype, requires_grad=True)
    C = torch.tensor([[C0]], dtype=complex_dtype)
    K = s4d_kernel(dt, A, None, C, L, "zoh")
    got = torch.autograd.grad((K * torch.tensor([gy], dtype=dtype)).sum(), (dt, A))
    exact = [float(x) for x in (
        loss(dt0, A0.real, A0.imag),
        mpmath.diff(lambda x: loss(x, A0.real, A0.imag), dt0),
        mpmath.diff(lambda x: loss(dt0, x, A0.imag), A0.real),
        mpmath.diff(lambda x: loss(dt0, A0.real, x), A0.imag),
    )]  # fmt: skip
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close((K * torch.tensor([gy], dtype=dtype)).sum().item(), exact[0],
                               rtol=rtol, atol=0)  # fmt: skip
    torch.testing.assert_close(got[0].item(), exact[1], rtol=rtol, atol=0)
    torch.testing.assert_close(got[1].real.item(), exact[2], rtol=rtol, atol=0)
    torch.testing.assert_close(got[1].imag.item(), exact[3], rtol=rtol, atol=0)


def test_s4d_kernel_names_a_bad_discretization():
    """S4DKernel read anything but "zoh" as bilinear: s4d_kernel(..., "ZOH") was bilinear."""
    dt, A = torch.rand(2), torch.complex(-torch.rand(2, 3), torch.randn(2, 3))
    C = torch.randn(2, 3, dtype=torch.complex64)
    with pytest.raises(ValueError, match="discretization must be one of"):
        s4d_kernel(dt, A, None, C, 4, "ZOH")


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_s4d_powers_flush_denormals_float32(method):
    """Fast-decaying modes at L = 3000 in float32: dA_powers sets magnitudes below 1e-19 to 0
    (their products would be denormals, slow on CPU) and leaves no denormal, where the plain
    formula exp(l Re log dA) (cos, sin)(l Im log dA) gives many; every other power is that
    formula's, bit for bit. The kernel and its gradients still match the float64 oracle's."""
    from kernels.ssm import dA_powers, log_dA

    g = torch.Generator().manual_seed(5)
    H, N, L = 2, 6, 3000
    dt = torch.full((H,), 0.05, dtype=torch.float64)
    # decay rates from 0.0025 to 1 per step (dt |Re A|): e^-3000 underflows many times over
    A = torch.complex(-torch.logspace(-1.3, 1.3, N, dtype=torch.float64).expand(H, N),
                      torch.randn(H, N, generator=g, dtype=torch.float64))  # fmt: skip
    B, C = (torch.randn(H, N, generator=g, dtype=torch.complex128) for _ in range(2))
    tiny = torch.finfo(torch.float32).tiny
    log_re, log_im = log_dA(dt.float(), A.to(torch.complex64), method)
    for step in (1, 55):
        got = dA_powers((log_re, log_im), L // step, step)
        lags = (torch.arange(L // step, dtype=torch.float32) * step)[:, None]
        magnitude = torch.exp(lags * log_re[:, None])
        phase = lags * log_im[:, None]
        plain = (magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        assert ((plain[0] != 0) & (plain[0].abs() < tiny)).any()  # the formula's denormals
        for part, want in zip(got, plain):
            assert not ((part != 0) & (part.abs() < tiny)).any()
            assert (part[magnitude < 1e-19 / 2] == 0).all()
            kept = magnitude > 2e-19
            assert torch.equal(part[kept], want[kept])
    params = [x.detach().clone().requires_grad_() for x in (dt, A, B, C)]
    params32 = [x.detach().to(torch.float32 if x.is_floating_point() else torch.complex64)
                .requires_grad_() for x in (dt, A, B, C)]  # fmt: skip
    want, got = s4d_kernel(*params, L, method), s4d_kernel(*params32, L, method)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
    gy = torch.randn(want.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, params32, gy.float()),
                    torch.autograd.grad(want, params, gy)):  # fmt: skip
        torch.testing.assert_close(a.to(b.dtype), b, rtol=0, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_s4d_kernel_second_derivatives_float64(method):
    """create_graph=True through s4d_kernel (its backward then differentiates the plain
    Vandermonde sum) against finite differences of the first derivatives."""
    g = torch.Generator().manual_seed(3)
    H, N, L = 2, 3, 7
    dt = (torch.rand(H, generator=g, dtype=torch.float64) * 0.1 + 0.01).requires_grad_()
    A = torch.complex(
        -torch.rand(H, N, generator=g, dtype=torch.float64) - 0.05,
        torch.randn(H, N, generator=g, dtype=torch.float64),
    ).requires_grad_()
    B, C = (
        torch.randn(H, N, generator=g, dtype=torch.complex128).requires_grad_() for _ in range(2)
    )
    assert torch.autograd.gradgradcheck(
        lambda dt, A, B, C: s4d_kernel(dt, A, B, C, L, method), (dt, A, B, C)
    )
    # One tensor as both B and C: create_graph's first derivatives equal the plain ones (each
    # slot's own partial; they once came out twice as large).
    gy = torch.randn(H, L, generator=g, dtype=torch.float64)
    plain, graph = (
        torch.autograd.grad(s4d_kernel(dt, A, C, C, L, method), (dt, A, C), gy, create_graph=c)
        for c in (False, True)
    )
    for a, b in zip(graph, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_s4d_bad_method():
    with pytest.raises(ValueError, match="discretization"):
        s4d_discretize(torch.ones(1), torch.ones(1, 1, dtype=torch.complex64), None, "euler")


def test_empty_length_errors():
    """Length 0 is a one-line error naming it, not an isqrt or modulo error from inside."""
    dt, A = torch.rand(2), torch.complex(-torch.rand(2, 3), torch.randn(2, 3))
    C = torch.randn(2, 3, dtype=torch.complex64)
    with pytest.raises(ValueError, match="s4d_kernel: the kernel length L must be >= 1, got 0"):
        s4d_kernel(dt, A, None, C, 0)
    with pytest.raises(ValueError, match=r"ssm_chunked_conv: u must be \[B, H, L>=1\]"):
        ssm_chunked_conv(torch.randn(2, 2, 0), dt, A, None, C, None, 4)


def test_shift_kernel_equals_matrix_power():
    g = torch.Generator().manual_seed(2)
    H, N = 2, 6
    C = torch.randn(H, N, generator=g, dtype=torch.float64)
    B = torch.randn(H, N, generator=g, dtype=torch.float64)
    shift = torch.diag(torch.ones(N - 1, dtype=torch.float64), -1)
    want = torch.stack(
        [
            torch.stack([C[h] @ torch.linalg.matrix_power(shift, l) @ B[h] for l in range(N)])
            for h in range(H)
        ]
    )
    torch.testing.assert_close(shift_kernel(C, B), want)
    e1 = torch.zeros(H, N, dtype=torch.float64)
    e1[:, 0] = 1
    torch.testing.assert_close(shift_kernel(C, e1), C)  # B = e1: the taps are C
    assert shift_kernel(C, None, L=4).shape == (H, 4)


def test_gelu_tanh_matches_torch_float64():
    """kernels.gelu_tanh (x sigmoid(2 z)) against torch's tanh-GELU, float64, values and
    gradients, and against finite differences (gradcheck)."""
    x = torch.cat([torch.randn(4000, dtype=torch.float64) * 3, torch.linspace(-12, 12, 97)])
    x.requires_grad_(True)
    g = torch.randn_like(x)
    y = gelu_tanh(x)
    ref = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(y, ref, rtol=1e-13, atol=1e-15)
    (got,), (want,) = torch.autograd.grad(y, x, g), torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    x = (torch.randn(20, dtype=torch.float64) * 4).requires_grad_()
    assert torch.autograd.gradcheck(gelu_tanh, x)
    # Second derivatives (create_graph=True): the backward's saved sigmoid is no constant.
    assert torch.autograd.gradgradcheck(gelu_tanh, x)
    # gradgradcheck checks the create_graph backward against itself only; the function it
    # differentiates must be tanh-GELU too: first and second derivatives against torch's.
    x = x.detach().requires_grad_()
    (got,), (want,) = (
        torch.autograd.grad(f(x), x, g[:20], create_graph=True)
        for f in (gelu_tanh, lambda t: F.gelu(t, approximate="tanh"))
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    (got2,), (want2,) = (torch.autograd.grad(d.square().sum(), x) for d in (got, want))
    torch.testing.assert_close(got2, want2, rtol=1e-12, atol=1e-14)


def test_zoh_discretize_float32_small_dt_A():
    """s4d_discretize's zoh dB = (e^{dt A} - 1) / A must not cancel in fp32 at small dt A: it
    feeds DiagonalSSM.step, prefill's s4d_state and the chunked path. Against float64 at
    |dt A| ~ 5e-6 .. 6e-4."""
    dt = torch.tensor([1e-5, 1e-4, 1e-3], dtype=torch.float64)
    real = torch.full((3, 2), -0.5, dtype=torch.float64)
    A = torch.complex(real, torch.tensor([[0.0, 0.3]] * 3, dtype=torch.float64))
    want = (torch.exp(dt[:, None] * A) - 1) / A  # float64: relative error <= 1e-16 / |dt A|
    _, got = s4d_discretize(dt.float(), A.to(torch.complex64), None, "zoh")
    torch.testing.assert_close(got.to(torch.complex128), want, rtol=1e-6, atol=0)


def test_gelu_tanh_float32_accuracy_and_large_inputs():
    """float32 within a few ulps of the float64 reference; finite values and slopes 0 / 1 far
    out (no overflow of x^3 into a NaN at |x| = 1e4)."""
    x = torch.randn(32, 30, 256) * 3
    ref = F.gelu(x.double(), approximate="tanh")
    assert ((gelu_tanh(x).double() - ref).norm() / ref.norm()).item() < 2e-7
    # 2e13 and 1e18: x (_C1 + 3 _C2 x^2) overflows fp32 there, which made the slope NaN.
    values = [-1e18, -2e13, -1e4, -100.0, -30.0, 30.0, 100.0, 1e4, 2e13, 1e18]
    far = torch.tensor(values, requires_grad=True)
    y = gelu_tanh(far)
    (slope,) = torch.autograd.grad(y.sum(), far)
    assert torch.equal(y.detach(), torch.tensor([0.0] * 5 + values[5:]))
    assert torch.equal(slope, torch.tensor([0.0] * 5 + [1.0] * 5))


def test_chunked_gates_must_match_u():
    """As fftconv: a gate of another shape was broadcast (a [2, B, H, L] postgate made a 4-D
    output), so a caller's shape bug surfaced only beyond the state-passing length."""
    dt, A = torch.rand(2), torch.complex(-torch.rand(2, 3), torch.randn(2, 3))
    C, u = torch.randn(2, 3, dtype=torch.complex64), torch.randn(1, 2, 8)
    for name, gate in (("pregate", torch.rand(1, 2, 1)), ("postgate", torch.rand(2, 1, 2, 8))):
        with pytest.raises(ValueError, match=rf"ssm_chunked_conv: {name} must match u \(1, 2, 8\)"):
            ssm_chunked_conv(u, dt, A, None, C, None, 4, **{name: gate})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_half_signal_fp32_filter_gradient_is_fp32_accurate(method, dtype):
    """Under autocast a layer gives fftconv a half-precision signal and gates with its fp32
    filter and D: u * pregate is formed in fp32, so dk and dD are fp32-accurate. Oracle: a
    float64 loop over the lags."""
    g = torch.Generator().manual_seed(0)
    B, H, L, K = 2, 3, 64, 64
    u, pre, post, gy = (torch.randn(B, H, L, generator=g).to(dtype) for _ in range(4))
    k = torch.randn(H, K, generator=g, requires_grad=True)
    D = torch.randn(H, generator=g, requires_grad=True)
    dk, dD = torch.autograd.grad(fftconv(u, k, D, pre, post, method=method), (k, D), gy)
    v, gz = u.double() * pre.double(), gy.double() * post.double()
    want_dk = torch.stack(
        [torch.stack([(gz[:, h, j:] * v[:, h, : L - j]).sum() for j in range(K)]) for h in range(H)]
    )
    want_dD = (gz * v).sum((0, 2))
    assert (dk.double() - want_dk).abs().max() < 1e-5 * want_dk.abs().max()
    assert (dD.double() - want_dD).abs().max() < 1e-5 * want_dD.abs().max()
