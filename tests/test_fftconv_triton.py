"""The triton backend of fftconv against the float64 oracle, under TRITON_INTERPRET=1 on CPU
(on a CUDA machine the same tests run the compiled kernels on the GPU).

Both methods: the fused FFT kernel ("fft", and the blocked decomposition beyond its size) and
the direct Toeplitz-tile kernel ("toeplitz"). The interpreter runs tl.dot as numpy matmuls:
slow, so the sizes stay small, and the blocked path is reached by lowering the fused size. The
fused kernels at every FFT size up to their capacity (16384, beyond fftconv's dispatch
threshold) are called directly, with a batch of 2 and one channel.
fp32 inputs: the fused kernel's fp32 DFTs (twiddles rounded once from fp64) agree with the
oracle to ~1e-5 of the output's scale at these sizes, the Toeplitz kernel to ~1e-6; tolerance
1e-4. fp16 / bf16 inputs: the math is fp32 with the fused kernel's products on tf32-rounded
factors (10 mantissa bits), and the results are rounded to the input dtype (by autograd too,
in the oracle's gradients): about one ulp, 2^-10 / 2^-7 relative, of the sums behind each
entry; tolerances 2e-3 / 1.6e-2 of that scale (check_against_oracle).
"""

import importlib
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
pytest.importorskip("triton")

from test_kernels import direct_conv, make_inputs, second_order_grads, tied_conv  # noqa: E402

import kernels.blocked  # noqa: E402
from kernels import fft_triton, fftconv  # noqa: E402
from kernels.blocked import blocked_conv  # noqa: E402
from kernels.dispatch import backends, choose_method  # noqa: E402
from kernels.fft_triton import FUSED_CAPACITY, PLANS, TritonFFTConv, fft_size  # noqa: E402


def assert_close_scaled(got, want, tol, scale=None):
    """max |got - want| <= tol * max |scale| (by default want: errors scale with the output,
    not per entry)."""
    scale = want if scale is None else scale
    assert (got.double() - want).abs().max() <= tol * scale.abs().max().clamp(min=1e-30)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_against_oracle(args, tol, conv=fftconv, **options):
    """conv(*args, **options) and the gradients of all present args vs the oracle's.

    Each entry of the output and of every gradient is a sum of products, and rounding the
    products' factors (tf32 in the fused kernel, like fp16's 10 mantissa bits) moves it by up
    to a fraction of the sum of their magnitudes, which can far exceed the entry when terms
    cancel (dD: one sum over B x L). So errors are scaled by the oracle run on |args| with |gy|,
    which gives those sums of magnitudes. gy is drawn from a fixed seed: the same draw
    whatever ran before."""
    args = [a.detach().to(DEVICE).requires_grad_() if a is not None else None for a in args]
    y = conv(*args, **options)
    ref = direct_conv(*args)
    assert y.dtype == args[0].dtype
    seeded = torch.Generator().manual_seed(0)
    gy = torch.randn(y.shape, generator=seeded, dtype=torch.float64).to(y.device)
    magnitudes = [a.detach().abs().double().requires_grad_() if a is not None else None
                  for a in args]  # fmt: skip
    ref_abs = direct_conv(*magnitudes)
    assert_close_scaled(y, ref, tol, ref_abs)
    present = [a for a in args if a is not None]
    got = torch.autograd.grad(y, present, gy.to(y.dtype))
    want = torch.autograd.grad(ref, present, gy)
    scales = torch.autograd.grad(ref_abs, [a for a in magnitudes if a is not None], gy.abs())
    for a, b, scale in zip(got, want, scales, strict=True):
        assert a.dtype == args[0].dtype
        assert_close_scaled(a, b, tol, scale)


SHAPES = [(1, 1), (17, 3), (17, 17), (64, 1), (64, 64), (100, 64), (256, 3), (256, 256)]


@pytest.mark.parametrize("method", ["fft", "toeplitz"])
@pytest.mark.parametrize("L, K", SHAPES + [(300, 200)])
@pytest.mark.parametrize("gates, skip", [(True, True), (False, False)])
def test_triton_forward_and_grads(method, L, K, gates, skip):
    args = make_inputs(2, 3, L, K, torch.float32, gates, skip, seed=L + K)
    check_against_oracle(args, 1e-4, backend="triton", method=method)


@pytest.mark.parametrize("method", ["fft", "toeplitz"])
def test_triton_shared_filters(method):
    """k [2, K] and D [2] shared by pairs of channels: the oracle repeats them by hand, so
    their gradients are sums over each pair."""
    u, _, _, pre, post = make_inputs(2, 4, 17, 17, torch.float32, seed=5)
    _, k, D, _, _ = make_inputs(1, 2, 1, 17, torch.float32, seed=6)
    leaves = [t.detach().to(DEVICE).requires_grad_() for t in (u, k, D, pre, post)]
    y = fftconv(*leaves, backend="triton", method=method)
    index = torch.arange(4, device=DEVICE) // 2
    ref = direct_conv(leaves[0], leaves[1][index], leaves[2][index], *leaves[3:])
    assert_close_scaled(y, ref, 1e-4)
    gy = torch.randn(y.shape, dtype=torch.float64).to(y.device)
    got = torch.autograd.grad(y, leaves, gy.float())
    for a, b in zip(got, torch.autograd.grad(ref, leaves, gy)):
        assert_close_scaled(a, b, 1e-4)


def fused(u, k, D, pregate, postgate):
    """The fused kernels themselves, whatever fftconv's dispatch threshold (no skip term)."""
    assert D is None
    return TritonFFTConv.apply(u, k, pregate, postgate)


@pytest.mark.parametrize(
    "L, K",
    [(400, 300), (1500, 500), (3000, 1000)]  # FFT sizes 1024, 2048, 4096
    + [(4000, 4000), (5000, 100), (5000, 5000), (9000, 300)],  # 8192 and 16384
)
def test_triton_fused_every_size(L, K, backward_path):
    """Every FFT size from 1024 on (256 and 512 are covered above), each with its own plan
    (tile shape, slab and chunk widths); up to 16384 by calling the fused kernels directly,
    with either backward path at every size. Gates on, fp32; forward and all gradients."""
    assert fft_size(L, K) in PLANS
    args = make_inputs(2, 1, L, K, torch.float32, gates=True, skip=False, seed=L + K)
    check_against_oracle(args, 1e-4, conv=fused)


@pytest.fixture(params=["fused", "unfused"])
def backward_path(request, monkeypatch):
    """Runs the test with the backward pass in one launch (_fused_backward) or in three
    (_unfused_backward) at every FFT size; yields that name and, once the test ran, checks that
    this path and only it was taken."""
    fused = request.param == "fused"
    monkeypatch.setattr(fft_triton, "FUSED_BACKWARD_MAX", FUSED_CAPACITY if fused else 0)
    calls = {"fused": 0, "unfused": 0}
    for name in calls:
        run = getattr(fft_triton, f"_{name}_backward")

        def spy(*a, _run=run, _name=name):
            calls[_name] += 1
            return _run(*a)

        monkeypatch.setattr(fft_triton, f"_{name}_backward", spy)
    yield request.param
    assert calls[request.param] > 0 and sum(calls.values()) == calls[request.param]


@pytest.mark.parametrize("B, rows", [(5, 2), (3, 1), (4, 4)])
def test_triton_filter_gradient_batch_split(B, rows, monkeypatch):
    """The unfused backward's filter-gradient kernel splits the batch over programs, rows per
    program, and sums their partial gradients: with a last program half empty (5 rows, 2 per
    program), one row per program, and the whole batch in one. Every gradient against the
    oracle."""
    monkeypatch.setattr(fft_triton, "FUSED_BACKWARD_MAX", 0)
    monkeypatch.setattr(fft_triton, "DK_ROWS", rows)
    args = make_inputs(B, 2, 100, 64, torch.float32, gates=True, skip=False, seed=B)
    check_against_oracle(args, 1e-4, conv=fused)


@pytest.mark.parametrize(
    "wanted", [("u",), ("k",), ("pre",), ("post",), ("u", "post"), ("k", "pre"), ("u", "k")]
)
@pytest.mark.parametrize("L, K", [(100, 64), (200, 200)])  # FFT sizes 256 (one slab), 512 (two)
def test_triton_backward_gradient_subsets(wanted, L, K, backward_path):
    """Either backward path computes only what is asked for (the kernels' NEED_* flags and the
    launches they skip): each subset of the inputs requiring grad gets the oracle's gradients,
    the rest none."""
    u, k, _, pre, post = make_inputs(2, 3, L, K, torch.float32, gates=True, skip=False, seed=L)
    args = dict(u=u, k=k, pre=pre, post=post)
    args = {n: a.detach().requires_grad_(n in wanted) for n, a in args.items()}
    y = fused(args["u"], args["k"], None, args["pre"], args["post"])
    ref = direct_conv(args["u"], args["k"], None, args["pre"], args["post"])
    gy = torch.randn_like(y)
    inputs = [args[n] for n in wanted]
    wants = torch.autograd.grad(ref, inputs, gy.double())
    for got, want in zip(torch.autograd.grad(y, inputs, gy), wants):
        assert_close_scaled(got, want, 1e-4)


@pytest.mark.parametrize(
    "B, L, K, rows_plan, dk_rows",
    [
        # 3 programs, the last half empty; the filter gradient's programs take 3 rows, 2 at a
        # time, so their second pair holds a row of the next program, which must not count
        (5, 100, 64, (16, 16, 16, 16, 2, 2), 3),
        (3, 100, 64, (16, 16, 16, 16, 2, 4), 4),  # one program, one of its rows past the batch
        (4, 200, 200, (32, 16, 16, 16, 4, 2), 4),  # n = 512: two slabs of two chunks each
    ],
)
def test_triton_rows_per_program(B, L, K, rows_plan, dk_rows, monkeypatch, backward_path):
    """Every kernel with several batch rows at a time (Plan.rows), their tiles stacked for the
    first DFT stage and side by side for the second, against the oracle: the forward; the fused
    backward, summing its rows' filter-gradient spectra; and the unfused one's two launches of
    the convolution kernel (dpostgate, and du / dpregate through the conjugate spectrum) and
    its filter-gradient kernel. Three channels, so that a program's rows must all come from its
    own channel."""
    monkeypatch.setitem(PLANS, fft_size(L, K), rows_plan)
    monkeypatch.setattr(fft_triton, "DK_ROWS", dk_rows)
    assert fft_triton.plan(fft_size(L, K), torch.float32).rows == rows_plan[-1]
    args = make_inputs(B, 3, L, K, torch.float32, gates=True, skip=False, seed=B + L)
    check_against_oracle(args, 1e-4, conv=fused)


@pytest.fixture
def tf32_dots(monkeypatch):
    """Interpreted tl.dot(..., input_precision="tf32") drops the low 13 mantissa bits of its
    fp32 operands, as the tensor cores do, so that errors are a GPU's (the interpreter itself
    multiplies in full fp32 whatever the precision asked for)."""
    if DEVICE == "cuda":
        return
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def tf32_dot(self, a, b, d, input_precision, *rest):
        if input_precision == ir.INPUT_PRECISION.TF32:
            a, b = (
                interpreter.TensorHandle((x.data.view(np.int32) & -8192).view(np.float32), x.dtype)
                for x in (a, b)
            )
        return create_dot(self, a, b, d, input_precision, *rest)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", tf32_dot)


def relative_errors(conv, args) -> list[float]:
    """||got - want|| / ||want|| for the output and the gradients of (u, k, pregate, postgate)
    against the oracle's from the same (rounded) inputs."""
    args = [a.detach().to(DEVICE).requires_grad_() for a in args]
    want_args = [a.detach().double().requires_grad_() for a in args]
    y, ref = conv(*args), direct_conv(want_args[0], want_args[1], None, *want_args[2:])
    gy = torch.randn(y.shape, dtype=torch.float64, device=DEVICE)
    got = (y, *torch.autograd.grad(y, args, gy.float()))
    want = (ref, *torch.autograd.grad(ref, want_args, gy))
    return [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, want)]


def test_triton_fused_tensor_core_accuracy(tf32_dots, monkeypatch):
    """With tensor-core rounding: fp32 inputs keep fp32-level accuracy through the tf32x3
    products at the largest size (the previous kernel measured 3-6e-7 on an H100), and fp16
    inputs stay near their own rounding (5e-4; tf32 truncation made it 2e-3 before). Without
    tf32x3, fp32 would lose three orders of magnitude: the emulation bites."""

    def errors(L, K, dtype):
        u, k, _, pre, post = make_inputs(2, 1, L, K, dtype, skip=False, seed=1)
        k = (k.detach().double() / K**0.5).float()
        return relative_errors(TritonFFTConv.apply, (u, k, pre, post))

    assert fft_size(5000, 5000) == 16384
    assert max(errors(5000, 5000, torch.float32)) < 1e-6
    assert max(errors(400, 300, torch.float16)) < 1e-3
    monkeypatch.setitem(fft_triton.DOT_PRECISION, torch.float32, "tf32")
    assert min(errors(400, 300, torch.float32)) > 1e-4


def test_triton_toeplitz_beyond_fused_size():
    """The Toeplitz kernel has no length limit: L past the fused FFT size, a short filter."""
    args = make_inputs(1, 1, 17000, 3, torch.float32)
    check_against_oracle(args, 1e-4, backend="triton", method="toeplitz")


def strided(conv, u_blh, k, D, pregate, post_row):
    """conv on a transposed u (a layer's [B, L, H] activations) and an expanded postgate, as
    a function of contiguous leaves: the kernels take contiguous copies and must write every
    gradient laid out as they read it."""
    B, L, H = u_blh.shape
    return conv(u_blh.transpose(1, 2), k, D, pregate, post_row.expand(B, H, L))


@pytest.mark.parametrize("method", ["fft", "toeplitz"])
def test_triton_strided_inputs(method):
    u, k, D, pre, post = make_inputs(2, 3, 40, 40, torch.float32)
    args = [u.detach().transpose(1, 2).contiguous().requires_grad_(), k, D, pre, post[:1]]
    got = strided(lambda *a: fftconv(*a, backend="triton", method=method), *args)
    want = strided(direct_conv, *args)
    assert_close_scaled(got, want, 1e-4)
    gy = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    for a, b in zip(
        torch.autograd.grad(got, args, gy), torch.autograd.grad(want, args, gy.double())
    ):
        assert_close_scaled(a, b, 1e-4)


@pytest.mark.parametrize("method", ["fft", "toeplitz"])
def test_triton_double_backward(method):
    """create_graph=True: the Functions differentiate a torch reference of their forward pass
    (kernels.double_backward) instead of returning gradients cut off from the inputs; and the
    fused FFT's second backward through a retained graph recomputes the same way."""
    args = [
        a.detach().to(DEVICE).requires_grad_() for a in make_inputs(2, 2, 17, 12, torch.float32)
    ]
    got = second_order_grads(lambda *a: fftconv(*a, backend="triton", method=method), args)
    want = second_order_grads(direct_conv, args)
    for a, b in zip(got, want):
        assert_close_scaled(a, b, 1e-4)
    y = fftconv(*args, backend="triton", method=method).sum()
    first = torch.autograd.grad(y, args, retain_graph=True)
    for a, b in zip(torch.autograd.grad(y, args), first):
        assert_close_scaled(a, b, 1e-6)
    # Tied arguments (u computed from k, one tensor as both gates): each slot's own partial.
    x, k = args[0], args[1]
    got = second_order_grads(
        tied_conv(lambda *a: fftconv(*a, backend="triton", method=method)), (x, k)
    )
    for a, b in zip(got, second_order_grads(tied_conv(direct_conv), (x, k))):
        assert_close_scaled(a, b, 1e-4)
    y = tied_conv(lambda *a: fftconv(*a, backend="triton", method=method))(x, k).sum()
    first = torch.autograd.grad(y, (x, k), retain_graph=True)
    for a, b in zip(torch.autograd.grad(y, (x, k)), first):
        assert_close_scaled(a, b, 1e-6)


@pytest.mark.parametrize("method", ["fft", "toeplitz"])
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_triton_low_precision(method, dtype, tol):
    for L, K in [(64, 64), (300, 200)]:
        args = make_inputs(2, 2, L, K, dtype, seed=L)
        check_against_oracle(args, tol, backend="triton", method=method)


@pytest.fixture
def blocked_calls(monkeypatch):
    """Lowers the fused FFT size to 256, so that small shapes take the blocked path; yields
    the list of its calls."""
    # The module: the package's attribute "fftconv" is the function.
    monkeypatch.setattr(importlib.import_module("kernels.dispatch"), "MAX_FUSED_FFT", 256)
    calls = []

    def spy(*a):
        calls.append(a)
        return blocked_conv(*a)

    monkeypatch.setattr(kernels.blocked, "blocked_conv", spy)
    return calls


@pytest.mark.parametrize("L, K", [(300, 1), (200, 200), (300, 100), (258, 257), (1000, 40)])
@pytest.mark.parametrize("gates, skip", [(True, True), (False, False)])
def test_triton_blocked_beyond_fused_size(L, K, gates, skip, blocked_calls):
    """Pieces of the fused kernel, with block lengths that do not divide L or K."""
    args = make_inputs(2, 3, L, K, torch.float32, gates, skip, seed=L + K)
    check_against_oracle(args, 1e-4, backend="triton", method="fft")
    assert len(blocked_calls) == 1


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_triton_blocked_low_precision(dtype, tol, blocked_calls):
    check_against_oracle(make_inputs(2, 2, 300, 100, dtype), tol, backend="triton", method="fft")
    assert len(blocked_calls) == 1


@pytest.mark.parametrize("L", [40, 300])
def test_triton_empty_batch(L, blocked_calls):
    """B = 0 in the fused kernel (L = 40) and beyond it (300), where the blocked path would
    rearrange zero batch rows: an empty output and a zero filter gradient."""
    u, k, D, pre, post = make_inputs(0, 3, L, L, torch.float32)
    y = fftconv(u, k, D, pre, post, backend="triton", method="fft")
    assert y.shape == (0, 3, L)
    y.sum().backward()
    assert k.grad.shape == k.shape and not k.grad.any()


@pytest.mark.parametrize(
    "L, K, max_fft", [(200, 200, 16), (1000, 7, 10), (50, 50, 3), (5, 5, 3), (999, 333, 64)]
)
def test_blocked_decomposition_float64(L, K, max_fft):
    """kernels.blocked with torch pieces: exact in float64, no piece above max_fft."""
    u, k, *_ = make_inputs(2, 3, L, K, torch.float64, seed=K)
    sizes = []

    def piece(x, f):
        sizes.append(x.shape[-1] + f.shape[-1] - 1)
        return fftconv(x, f, backend="torch")

    z = blocked_conv(u, k, piece, max_fft)
    ref = direct_conv(u, k)
    torch.testing.assert_close(z, ref, rtol=1e-10, atol=1e-10)
    assert max(sizes) <= max_fft
    gz = torch.randn_like(z)
    for a, b in zip(torch.autograd.grad(z, (u, k), gz), torch.autograd.grad(ref, (u, k), gz)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_cuda_default_backend_by_shape():
    """backend=None on CUDA tensors: triton for short filters (its Toeplitz kernel) and for FFT
    sizes L + K - 1 <= TRITON_FFT_MAX (1024), torch's cuFFT path beyond, and never triton for
    float64 or off CUDA. The rule by hand, on a stand-in for a CUDA tensor."""
    from types import SimpleNamespace

    from kernels.dispatch import _default_backend

    cuda = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert _default_backend(cuda, 512, 512) == "triton"  # 1023 <= 1024
    assert _default_backend(cuda, 513, 513) == "torch"
    assert _default_backend(cuda, 16384, 256) == "triton"  # Toeplitz tiles
    assert _default_backend(cuda, 16384, 257) == "torch"
    assert _default_backend(SimpleNamespace(is_cuda=True, dtype=torch.float64), 64, 3) == "torch"
    assert _default_backend(torch.zeros(1, device="cpu"), 64, 3) == "torch"


def test_triton_backend_choice_and_limits():
    assert "triton" in backends()
    assert choose_method(4, 4096, 256, "triton") == "toeplitz"
    assert choose_method(4, 4096, 257, "triton") == "fft"
    u, k = torch.randn(1, 2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="float64"):
        fftconv(u.double(), k.double(), backend="triton")
    with pytest.raises(ValueError, match="method"):
        fftconv(u, k, backend="triton", method="conv1d")
    assert fft_size(3000, 3000) == 8192  # beyond fftconv's dispatch threshold, within capacity
    assert fft_size(9000, 7385) == FUSED_CAPACITY == 16384
    with pytest.raises(ValueError, match="FUSED_CAPACITY = 16384"):
        fft_size(9000, 7386)  # the fused kernels themselves; fftconv goes blocked beyond them
