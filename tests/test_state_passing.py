"""kernels.state_passing: chunked diagonal-SSM convolution equals the full convolution."""

import pytest
import torch

from kernels import fftconv, s4d_kernel
from kernels.state_passing import ssm_chunked_conv


def make_ssm(H=3, N=4, seed=0):
    """Real leaves (dt, A's parts, B's and C's parts, D) of a stable diagonal SSM, float64."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    leaves = [
        torch.rand(H, generator=g, dtype=torch.float64) * 0.2 + 0.01,  # dt
        -torch.rand(H, N, generator=g, dtype=torch.float64) - 0.05,  # Re A
        r(H, N) * 3,  # Im A
        r(H, N, 2),  # B
        r(H, N, 2),  # C
        r(H),  # D
    ]
    return [p.requires_grad_() for p in leaves]


def ssm_args(leaves):
    dt, a_re, a_im, B, C, D = leaves
    return dt, torch.complex(a_re, a_im), torch.view_as_complex(B), torch.view_as_complex(C), D


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
@pytest.mark.parametrize("L, chunk", [(1, 1), (17, 1), (17, 5), (64, 16), (100, 64), (257, 100)])
def test_chunks_equal_full_convolution(L, chunk, method):
    leaves = make_ssm(seed=L + chunk)
    g = torch.Generator().manual_seed(L)
    u, pre, post = (
        torch.randn(2, 3, L, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)
    )
    # Separate graphs from the leaves, so each output can be differentiated on its own.
    got = ssm_chunked_conv(u, *ssm_args(leaves), chunk, method, pre, post)
    dt, A, B, C, D = ssm_args(leaves)
    want = fftconv(u, s4d_kernel(dt, A, B, C, L, method), D, pre, post)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(want)
    inputs = [u, pre, post, *leaves]
    for a, b in zip(torch.autograd.grad(got, inputs, gy), torch.autograd.grad(want, inputs, gy)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_chunk_longer_than_sequence_and_float32():
    dt, A, B, C, D = ssm_args(make_ssm())
    u = torch.randn(1, 3, 40, dtype=torch.float64)
    want = fftconv(u, s4d_kernel(dt, A, B, C, 40), D)
    torch.testing.assert_close(ssm_chunked_conv(u, dt, A, B, C, D, chunk=1000), want)
    low = [
        p.detach().float() if p.is_floating_point() else p.detach().to(torch.cfloat)
        for p in (dt, A, B, C, D)
    ]
    got = ssm_chunked_conv(u.float(), *low, chunk=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_empty_batch_like_the_full_convolution():
    # fftconv takes an empty batch; the chunked path raised ZeroDivisionError inside einops.
    leaves = make_ssm()
    u = torch.randn(0, 3, 20, dtype=torch.float64, requires_grad=True)
    got = ssm_chunked_conv(u, *ssm_args(leaves), chunk=7)
    assert got.shape == (0, 3, 20)
    got.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in leaves)


def test_bad_chunk():
    dt, A, B, C, D = ssm_args(make_ssm())
    with pytest.raises(ValueError, match="chunk"):
        ssm_chunked_conv(torch.randn(1, 3, 8), dt, A, B, C, D, chunk=0)


def test_diagonal_ssm_layer_passes_state_beyond_fused_length(monkeypatch):
    import layers.ssm

    torch.manual_seed(0)
    ssm = layers.ssm.DiagonalSSM(channels=6, d_state=8).double()
    u, pre, post = (torch.randn(2, 6, 150, dtype=torch.float64) for _ in range(3))
    full = ssm(u, pre, post)
    monkeypatch.setattr(layers.ssm, "STATE_PASSING_LEN", 64)  # 150 = 64 + 64 + 22
    torch.testing.assert_close(ssm(u, pre, post), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "name, params",
    [
        ("h3", {"head_dim": 2}),
        ("h3", {"first_ssm": "diag", "discretization": "zoh"}),
        ("s4d", {}),
        ("gss", {"expansion": 2, "ssm_reduction": 2}),
    ],
)
def test_layers_beyond_the_fused_length(name, params, monkeypatch):
    """Whole layers past STATE_PASSING_LEN (chunks of 4, which do not divide L = 13): the
    output, prefill then step, and the gradients of the input and of every parameter equal
    those of the full convolution, float64."""
    import layers
    import layers.h3
    import layers.ssm

    torch.manual_seed(0)
    mixer = layers.build(name, d_model=8, d_state=4, **params).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 13, 8, generator=g, dtype=torch.float64)

    def run():
        y = mixer(x)
        grads = torch.autograd.grad(y, [x, *mixer.parameters()], gy)
        with torch.no_grad():
            y_prefix, state = mixer.prefill(x[:, :11])
            steps = [y_prefix]
            for t in (11, 12):
                y_t, state = mixer.step(x[:, t], state)
                steps.append(y_t[:, None])
        return y, torch.cat(steps, dim=1), grads

    full, full_stepped, full_grads = run()
    torch.testing.assert_close(full_stepped, full.detach(), rtol=1e-10, atol=1e-10)
    monkeypatch.setattr(layers.ssm, "STATE_PASSING_LEN", 4)
    # Multi-head H3 takes its second SSM regrouped at short lengths, never beyond 8K.
    monkeypatch.setattr(layers.h3, "REGROUPED_MAX_LEN", 0)
    calls = []
    chunked_conv = layers.ssm.ssm_chunked_conv
    monkeypatch.setattr(
        layers.ssm, "ssm_chunked_conv", lambda *a: calls.append(1) or chunked_conv(*a)
    )
    chunked, chunked_stepped, chunked_grads = run()
    assert len(calls) == 2 * sum(isinstance(m, layers.DiagonalSSM) for m in mixer.modules())
    torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chunked_stepped, full.detach(), rtol=1e-10, atol=1e-10)
    for a, b in zip(chunked_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _single(*params):
    """float64 / complex128 parameters as float32 / complex64 leaves that require grad."""
    cast = lambda p: p.to(torch.complex64 if p.is_complex() else torch.float32)  # noqa: E731
    return [cast(p.detach()).requires_grad_() for p in params]


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_ssm_kernels_keep_fp32_under_bf16_autocast(method):
    """Under a bf16 autocast (precision: bf16) the SSM filter, its gradients, the prefill state
    and the chunked convolution still compute in fp32: against float64 (autocast off), to fp32
    accuracy, not bf16's ~4e-3."""
    from kernels.ssm import s4d_state

    dt, A, B, C, D = (p.detach() for p in ssm_args(make_ssm(H=4, N=8)))
    leaves = _single(dt, A, B, C)
    ref = [p.clone().requires_grad_() for p in (dt, A, B, C)]
    L, g = 300, torch.Generator().manual_seed(1)
    gy = torch.randn(4, L, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k = s4d_kernel(*leaves, L, method)
        grads = torch.autograd.grad(k, leaves, gy)
    want = s4d_kernel(*ref, L, method)
    assert k.dtype == torch.float32
    assert (k.double() - want).abs().max() < 1e-5 * want.abs().max()
    for got, expected in zip(grads, torch.autograd.grad(want, ref, gy.double()), strict=True):
        assert (got.to(expected.dtype) - expected).abs().max() < 1e-4 * expected.abs().max()
    u = torch.randn(2, 4, L, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = s4d_state(u, *leaves[:3], method)
        y = ssm_chunked_conv(u, *leaves, D.float(), 64, method)
    x_want = s4d_state(u.double(), dt, A, B, method)
    assert (x.to(torch.complex128) - x_want).abs().max() < 1e-5 * x_want.abs().max()
    y_want = ssm_chunked_conv(u.double(), dt, A, B, C, D, 64, method)
    assert (y.double() - y_want).abs().max() < 1e-5 * y_want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_conv_of_half_inputs_computes_in_fp32(dtype):
    """Half-precision signal and gates, fp32 SSM: the states are fp32, so the output is the
    float64 one rounded once to the half dtype (plus fp32 noise)."""
    dt, A, B, C, D = (p.detach() for p in ssm_args(make_ssm(H=4, N=8)))
    g = torch.Generator().manual_seed(4)
    u, pre, post = (torch.randn(2, 4, 200, generator=g).to(dtype) for _ in range(3))
    got = ssm_chunked_conv(u, *_single(dt, A, B, C), D.float(), 32, "zoh", pre, post)
    assert got.dtype == dtype
    want = ssm_chunked_conv(u.double(), dt, A, B, C, D, 32, "zoh", pre.double(), post.double())
    rounding = torch.finfo(dtype).eps
    assert (
        (got.double() - want).abs() <= 2 * rounding * want.abs() + 1e-6 * want.abs().max()
    ).all()
