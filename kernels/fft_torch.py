"""FFT causal convolution on torch tensors with a hand-written backward.

Shapes: u, pregate, postgate [B, H, L]; k [H, K] (K <= L) and the skip weights D [H] already
in the compute dtype (fp32, or fp64 for fp64 inputs). D is the filter's tap 0: it is added
to the zero-padded filter before its FFT, and its gradient is dk[:, 0].

The FFT size is the smallest even 2-3-5-smooth n >= L + K - 1, so circular wrap-around never
reaches the first L outputs. Even, because pocketfft's real FFT of an odd length is about 2x
slower (measured, 256 rows, irfft(rfft): n=16875 91 ms, 17280 44 ms, 18432 33 ms).

Where the time goes (B=1, H=128, L=4096, 1 thread): an rfft or irfft of the [128, 8192] rows
takes about 1.2 ms, but the naive version's fwd+bwd took about 40 ms for its six, the rest
being zero-padding copies, out-of-place products, gradient buffers and first-touch page
faults of fresh memory. So every pass here is counted:
- the gate product is written straight into a zero-tailed FFT buffer (no separate pad copy);
- the filter spectrum is computed once per call, shared by the batch, and kept for the
  backward pass rather than recomputed; D goes into the padded filter buffer in place (not
  into a copy of k with an autograd node of its own: that took 15% of a forward at B=1,
  H=128, L=256); when one row block holds the batch, the filter and the input go through
  one rfft call;
- the backward pass reuses the spectrum of v and the pre-postgate output z kept from the
  forward pass (only those the requested gradients need): each saves one FFT per row;
- products go in place or through ``out=`` where nothing else needs their inputs;
- on a CPU, when one row block holds the batch, the FFT input buffer (and the spectrum
  product's) is kept between calls of one shape, its zero tail written once; the backward
  pass takes its rfft input in the same buffer;
- without autograd (inference, generation's prefill) nothing is kept for a backward pass and the
  spectrum product is taken in place.
Rows are processed in blocks of about BLOCK_ELEMS samples, so that a block's buffers stay in
cache from the pregate to the postgate. benchmarks/fftconv.py's "block" sweep sets it.
"""

from __future__ import annotations

import threading

import torch

from kernels.direct import with_skip
from kernels.double_backward import reference_grads
from kernels.fft_sizes import next_fast_len

BLOCK_ELEMS = 2**21


def fft_len(L: int, K: int) -> int:
    """The FFT size for length L and K taps (see the module docstring)."""
    return 2 * next_fast_len(-(-(L + K - 1) // 2))


def _blocks(B: int, H: int, n: int, device: torch.device) -> list[tuple[slice, slice] | None]:
    """Row blocks covering [B, H] as (batch slice, channel slice) pairs, about BLOCK_ELEMS / n
    rows each on a CPU, or [None] when one block holds them all: always on a GPU, where each
    block is a round of kernel launches and big batched FFTs are what cuFFT is fast at (blocks
    of 2^19 samples made B=16, H=768, L=1024 take 11.6 ms forward on an H100, against 0.60
    in one block: benchmarks/results/triton_gpu_h100.json, and triton_gpu_h100_call1.json of
    commit 1ba5eba). None rather than full slices: each view costs a few microseconds, which
    shows at the short lengths, and one block lets the filter and the input share an rfft
    call (_spectra)."""
    rows = max(1, BLOCK_ELEMS // n)
    if device.type != "cpu" or rows >= B * H:
        return [None]
    bb, hb = (rows // H, H) if rows >= H else (1, rows)
    return [
        (slice(b0, b0 + bb), slice(h0, h0 + hb)) for b0 in range(0, B, bb) for h0 in range(0, H, hb)
    ]


def _fill_padded(out: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None = None) -> None:
    """out [..., n] = x * gate (or x) in its first L samples, zeros after, in out's dtype. One
    pass over x instead of a product, a cast and torch.fft's own zero-padding copy."""
    L = x.shape[-1]
    out.narrow(-1, L, out.shape[-1] - L).zero_()
    _fill_head(out.narrow(-1, 0, L), x, gate)


def _fill_head(head: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None) -> None:
    """head = x * gate (or x), in head's dtype (shapes alike)."""
    if gate is None:
        head.copy_(x)
    elif x.dtype == gate.dtype == head.dtype:
        torch.mul(x, gate, out=head)
    else:  # half-precision inputs: the product is taken in the compute dtype, not rounded
        head.copy_(x).mul_(gate)


def _input_spectrum(x: torch.Tensor, gate: torch.Tensor | None, n: int, dtype) -> torch.Tensor:
    """rfft of x * gate (x [b, h, L]) zero-padded to n, in ``dtype``: [b, h, n//2+1]."""
    padded = x.new_empty((*x.shape[:-1], n), dtype=dtype)
    _fill_padded(padded, x, gate)
    return torch.fft.rfft(padded)


class _Workspace:
    """The FFT input buffer of one call: [B+1, H, n] with the filter in row 0 and the input
    in rows 1: (``joint``), else [1, H, n] for the filter alone, its zeros (every row from L
    on, row 0 from K to L) written when it is made, and the views the calls write through
    made once. Nothing overwrites those zeros, so on a CPU a workspace is kept between calls
    of the same shape (_kept_workspace), and rows 1: take the backward pass's rfft input too.
    """

    __slots__ = ("padded", "k_head", "d_col", "v_rows", "v_head", "prod")

    def __init__(self, B, H, L, K, n, dtype, device, joint: bool):
        # Outside inference mode: a buffer made in it (generation's prefill) could not be
        # written later in training.
        with torch.inference_mode(False):
            self.padded = torch.empty((B + 1 if joint else 1, H, n), dtype=dtype, device=device)
        self.padded[..., L:].zero_()
        if K < L:
            self.padded[0, :, K:L].zero_()
        self.k_head, self.d_col = self.padded[0, :, :K], self.padded[0, :, 0]
        self.v_rows = self.padded[1:] if joint else None
        self.v_head = self.v_rows[..., :L] if joint else None
        self.prod = None  # the spectrum product when the forward pass keeps v_f (made once)


# Workspaces are kept per thread (threads would otherwise write one buffer at once) for the
# last few call shapes: a model's layers share one shape, and evaluation or generation may
# add another. Only on a CPU and for a call whose batch one row block holds (_blocks), where
# making the buffer, zeroing its tail and making its views on every call is a fixed cost that
# shows. B=1, H=128, K=L, 1 thread, old per-call buffer / kept one, forward (A/B in one
# process, the graph freed outside the clock): 1.125 at L=256, 1.02 at 512, 1.06 at 1K, 2K and
# 4K; fwd+bwd 1.08 at 256, 1.05 at 512. Outputs and gradients are bit-identical.
# Such a block has B*H*n <= BLOCK_ELEMS samples, so its [B+1, H, n] buffer and the product
# buffer hold at most 2 x 2 x BLOCK_ELEMS: 32 MB, 128 MB per thread for four shapes in fp32.
# A separate limit of 2^21 buffer samples once left L=8K (B=1, H=128: 2^22) making a fresh
# 16 MB buffer per call; keeping it: 1.07x forward, 1.04x fwd+bwd (median of 30 paired rounds,
# order shuffled, one process; AMD EPYC, 1 thread).
_KEPT_WORKSPACES = 4
_kept = threading.local()


def _kept_workspace(B, H, L, K, n, dtype, device) -> _Workspace | None:
    """This thread's kept joint workspace for one row block holding the batch (see above), or
    None off a CPU."""
    if device.type != "cpu":
        return None
    kept = _kept.__dict__.setdefault("by_shape", {})
    key = (B, H, L, K, dtype)
    ws = kept.get(key)
    if ws is None:
        if len(kept) >= _KEPT_WORKSPACES:
            del kept[next(iter(kept))]  # the oldest
        ws = kept[key] = _Workspace(B, H, L, K, n, dtype, device, joint=True)
    return ws


def _spectra(u, k, D, pregate, ws: _Workspace):
    """The filter spectrum [H, n//2+1] of k with D added at tap 0 and, for a joint ``ws``,
    the input spectrum [B, H, n//2+1] of u * pregate from the same rfft call (a call fewer:
    7% of a forward at B=1, H=128, L=256). Returns (k_f, v_f or None)."""
    ws.k_head.copy_(k)
    if D is not None:
        ws.d_col.add_(D)
    if ws.v_head is not None:
        _fill_head(ws.v_head, u, pregate)
    spectra = torch.fft.rfft(ws.padded)
    return spectra[0], None if ws.v_head is None else spectra[1:]


def _mul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> None:
    """out[...] = a * b (a if b is None), computed in the wider dtype and cast once."""
    if b is None:
        out.copy_(a)
    else:
        torch.mul(a, b, out=out)


def _at(x: torch.Tensor | None, block: tuple[slice, slice] | None) -> torch.Tensor | None:
    """x's rows of ``block`` (x [B, H, ...]); x itself for the whole-tensor block None."""
    return x if x is None or block is None else x[block]


def _channels(x: torch.Tensor, block: tuple[slice, slice] | None) -> torch.Tensor:
    """x's channels of ``block`` (x [H, ...])."""
    return x if block is None else x[block[1]]


def conv_forward(u, k, D, pregate, postgate, keep_v_f: bool = False, keep_z: bool = False):
    """y = postgate * ((k + D delta) * (u * pregate))[:L] by FFT, block by block (D may be None).

    Returns (y [B, H, L] in u's dtype, k_f [H, n//2+1], v_f list, z list), where the lists
    hold, per block in _blocks order, the input spectra and the pre-postgate outputs when
    asked for (kept by reference: keeping them costs no copy).
    """
    B, H, L = u.shape
    K = k.shape[-1]
    n = fft_len(L, K)
    blocks = _blocks(B, H, n, u.device)
    joint = blocks[0] is None
    ws = _kept_workspace(B, H, L, K, n, k.dtype, u.device) if joint else None
    if ws is None:
        ws = _Workspace(B, H, L, K, n, k.dtype, u.device, joint)
    k_f, v_f_whole = _spectra(u, k, D, pregate, ws)
    v_fs, zs = [], []
    # One block with a postgate in u's dtype: y is made by the product itself (an op fewer).
    single = joint and postgate is not None and u.dtype == k.dtype
    y = None if single else torch.empty_like(u)
    for blk in blocks:
        if blk is None:
            v_f = v_f_whole
        else:
            v_f = _input_spectrum(_at(u, blk), _at(pregate, blk), n, k.dtype)
        if not keep_v_f:
            prod = v_f.mul_(_channels(k_f, blk))
        elif blk is None:  # one block: into the (joint) workspace's product buffer
            if ws.prod is None:
                ws.prod = torch.empty_like(v_f)
            prod = torch.mul(v_f, k_f, out=ws.prod)
        else:
            prod = v_f * _channels(k_f, blk)
        z = torch.fft.irfft(prod, n=n)[..., :L]
        if keep_v_f:
            v_fs.append(v_f)
        if keep_z:
            zs.append(z)
        if single:
            y = z * postgate
        else:
            _mul_into(_at(y, blk), z, _at(postgate, blk))
    return y, k_f, v_fs, zs


class FFTConv(torch.autograd.Function):
    """y = postgate * irfft(rfft(u * pregate) (rfft(k) + D))[:L], in k's dtype, returned in
    u's."""

    @staticmethod
    def forward(ctx, u, k, D, pregate, postgate):
        _, need_k, need_D, _, need_post = ctx.needs_input_grad
        keep_v_f = need_k or need_D
        y, k_f, ctx.v_f, ctx.z = conv_forward(u, k, D, pregate, postgate, keep_v_f, need_post)
        # k_f may be a row of the joint spectra (see _spectra): without v_f, a copy of it
        # keeps the filter's row alive for the backward pass rather than all of them.
        ctx.k_f = k_f if ctx.v_f else k_f.clone()
        ctx.save_for_backward(u, k, pregate, postgate, D)
        return y

    @staticmethod
    def backward(ctx, gy):
        if ctx.k_f is None or torch.is_grad_enabled():
            # A second backward through a retained graph (the first freed the kept spectra,
            # conjugated in place; the reference rounds differently, by ~1e-16 relative, so
            # gradcheck's reentrancy check needs nondet_tol), or create_graph=True
            # (kernels.double_backward).
            ctx.v_f = ctx.z = ctx.k_f = None
            u, k, pregate, postgate, D = ctx.saved_tensors
            inputs = (u, k, D, pregate, postgate)
            return reference_grads(conv_reference, inputs, ctx.needs_input_grad, gy)
        need_u, need_k_only, need_D, need_pre, need_post = ctx.needs_input_grad
        need_k = need_k_only or need_D  # dD is dk[:, 0]
        needs = (need_u, need_k, need_pre, need_post)
        (u, k, pregate, postgate), _, (g_u, g_pre, g_post) = backward_inputs(ctx, needs)
        B, H, L = u.shape
        K, n = k.shape[-1], 2 * (ctx.k_f.shape[-1] - 1)
        # The spectra kept by the forward pass are ours: conjugated in place, once, here (a
        # product with a conj() view would copy it, and doing it in the forward pass would
        # make a forward without backward pay for it).
        k_f_conj = ctx.k_f.conj_physical_()
        g_k_f = torch.empty_like(ctx.k_f) if need_k else None
        blocks = _blocks(B, H, n, u.device)
        ws = _kept_workspace(B, H, L, K, n, k.dtype, u.device) if blocks[0] is None else None
        for i, blk in enumerate(blocks):
            if need_post:
                _mul_into(_at(g_post, blk), _at(gy, blk), ctx.z[i])
            if ws is None:
                gz_f = _input_spectrum(_at(gy, blk), _at(postgate, blk), n, k.dtype)
            else:  # the input rows of the forward pass's workspace, their zero tail kept
                _fill_head(ws.v_head, gy, postgate)
                gz_f = torch.fft.rfft(ws.v_rows)
            if need_k:
                # dk[j] = sum_{b,t} gz[b,t] v[b,t-j]: a correlation, summed over the batch.
                # Blocks of the first batch rows come first (see _blocks) and write g_k_f.
                v_f_conj, g_k_f_blk = ctx.v_f[i].conj_physical_(), _channels(g_k_f, blk)
                first = int(blk is None or blk[0].start == 0)
                if first:
                    torch.mul(gz_f[0], v_f_conj[0], out=g_k_f_blk)
                for gz_f_b, v_f_conj_b in zip(gz_f[first:], v_f_conj[first:]):
                    g_k_f_blk.addcmul_(gz_f_b, v_f_conj_b)
            if need_u or need_pre:
                # dv[s] = sum_{t>=s} k[t-s] gz[t]: the correlation of gz with k.
                gv = torch.fft.irfft(gz_f.mul_(_channels(k_f_conj, blk)), n=n)[..., :L]
                if need_u:
                    _mul_into(_at(g_u, blk), gv, _at(pregate, blk))
                if need_pre:
                    _mul_into(_at(g_pre, blk), gv, _at(u, blk))
        g_k = torch.fft.irfft(g_k_f, n=n)[..., :K] if need_k else None
        g_D = g_k[:, 0].clone() if need_D else None
        ctx.v_f = ctx.z = ctx.k_f = None  # free them now, not when the graph goes
        return g_u, g_k if need_k_only else None, g_D, g_pre, g_post


def fft_conv(u, k, D=None, pregate=None, postgate=None) -> torch.Tensor:
    """The fft method: through FFTConv when a gradient may be asked for, else straight
    through conv_forward, keeping nothing and multiplying spectra in place."""
    if torch.is_grad_enabled() and (
        u.requires_grad
        or k.requires_grad
        or (D is not None and D.requires_grad)
        or (pregate is not None and pregate.requires_grad)
        or (postgate is not None and postgate.requires_grad)
    ):
        return FFTConv.apply(u, k, D, pregate, postgate)
    return conv_forward(u, k, D, pregate, postgate)[0]


def conv_reference(u, k, D=None, pregate=None, postgate=None) -> torch.Tensor:
    """fft_conv's result (u [B, H, L], k [H, K] and D [H] in the compute dtype, gates [B, H,
    L] in u's) in plain torch ops, which autograd differentiates to any order: what the
    Functions of fftconv differentiate for a double backward (kernels.double_backward)."""
    L, K = u.shape[-1], k.shape[-1]
    n = fft_len(L, K)
    v = u.to(k.dtype) if pregate is None else u.to(k.dtype) * pregate
    k_f = torch.fft.rfft(with_skip(k, D), n=n)
    z = torch.fft.irfft(torch.fft.rfft(v, n=n) * k_f, n=n)[..., :L]
    return (z if postgate is None else z * postgate).to(u.dtype)


def backward_inputs(ctx, needs=None, contiguous=False) -> tuple[tuple, tuple[bool, ...], tuple]:
    """What every fftconv autograd backward starts from: the saved (u, k, pregate, postgate)
    (saved first, in that order), which of them need a gradient (``needs``, by default
    ``ctx.needs_input_grad``, in that order), and empty gradient buffers (g_u, g_pre, g_post)
    for the [B, H, L] inputs, None where no gradient is needed: laid out as those inputs, or
    ``contiguous`` whatever their layout (for the Triton kernels, which write them as such)."""
    u, k, pregate, postgate = ctx.saved_tensors[:4]
    needs = ctx.needs_input_grad if needs is None else needs
    layout = torch.contiguous_format if contiguous else torch.preserve_format
    buffers = tuple(
        torch.empty_like(x, memory_format=layout) if need else None
        for x, need in ((u, needs[0]), (pregate, needs[2]), (postgate, needs[3]))
    )
    return (u, k, pregate, postgate), needs, buffers
