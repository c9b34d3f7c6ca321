"""The SSM submodules the mixers share: :class:`DiagonalSSM` (S4D) and :class:`ShiftSSM` (H3).

Both map u [B, C, L] -> y [B, C, L] (``forward``) and u_t [B, C] -> y_t [B, C] (``step``),
with the skip term D u included; ``prefill`` is ``forward`` plus the state after the last
position, computed in parallel (what ``step`` would reach from ``init_state``).
An SSM with H heads of parameters accepts any C = H * R channels: channels h*R .. h*R + R - 1
share head h's parameters. R = 1 everywhere except in multi-head H3, where the hd x hd
outer-product channels of a head share one SSM.

All parameters are real tensors (complex ones are stored as real views [..., 2]) so that
optimizers, safetensors and DDP handle them like any other weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from kernels import (
    STATE_PASSING_LEN,
    fftconv,
    per_channel,
    s4d_discretize,
    s4d_kernel,
    shift_kernel,
    ssm_chunked_conv,
)
from kernels.ssm import DISCRETIZATIONS, s4d_state
from layers.base import check_bool, check_choice, check_float, check_int, mark_ssm

INITS = ("lin", "inv")
SSM_KINDS = ("diag", "shift")


def _check_channels(heads: int, channels: int) -> None:
    if channels % heads:
        raise ValueError(f"SSM with {heads} heads got {channels} channels, not a multiple")


def _per_channel(p: torch.Tensor, channels: int) -> torch.Tensor:
    """Head parameters [H, ...] -> [channels, ...], each head repeated channels / H times."""
    _check_channels(p.shape[0], channels)
    return per_channel(p, channels // p.shape[0])


def _step_params(ssm: nn.Module, channels: int, compute):
    """``compute(channels)``, reused across ``step`` calls while the parameters are unchanged.

    Decoding calls ``step`` once per token with the same weights; re-deriving the discretised
    per-channel parameters each time costs as much as the state update itself. The cache key
    is every parameter's version counter and storage (bumped by in-place edits,
    load_state_dict and .to()), and every decode starts without a cache (``init_state`` and
    ``prefill`` drop it): some updates leave the version counter as it is (torch 2.13's fused
    AdamW, the default optimizer here, and edits through ``.data``), so the key alone missed
    a training step between two decodes. While autograd records through the parameters
    nothing is cached: each step needs its own graph.
    """
    params = list(ssm.parameters(recurse=False))
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return compute(channels)
    key = (channels, *((p._version, p.data_ptr(), p.dtype) for p in params))
    cached = getattr(ssm, "_step_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, compute(channels))
        ssm._step_cache = cached
    return cached[1]


def _dot_last(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_n x[b, c, n] w[c, n]: x [B, C, N], w [C, N] (real) -> [B, C]. A product and a sum:
    einsum makes it one small matmul per channel, 4x slower at B=16, C=256, N=64 (1 thread)."""
    return torch.linalg.vecdot(x, w)


def check_diagonal_args(owner: str, init, discretization, dt_min, dt_max) -> tuple:
    """Validate the DiagonalSSM arguments other than sizes; returns them normalised."""
    init = check_choice(owner, "init", init, INITS)
    discretization = check_choice(owner, "discretization", discretization, DISCRETIZATIONS)
    dt_min = check_float(owner, "dt_min", dt_min, 0.0, math.inf)
    dt_max = check_float(owner, "dt_max", dt_max, 0.0, math.inf)
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"{owner}: need 0 < dt_min <= dt_max, got {dt_min} and {dt_max}")
    return init, discretization, dt_min, dt_max


class DiagonalSSM(nn.Module):
    """Diagonal state-space convolution (S4D) over H channels with N real states each.

    The N states are N/2 complex modes standing for conjugate pairs, hence y = 2 Re(C x).
    Parameters (flagged SSM parameters marked *):
        log_dt* [H]        ~ U[log dt_min, log dt_max]
        log_A_real* [H, N/2], A_imag* [H, N/2]: A = -exp(log_A_real) + i A_imag, Re A = -1/2
            at init; Im A = pi n (S4D-Lin) or (N/pi)(N/(2n+1) - 1) (S4D-Inv), n < N/2. The Inv
            formula takes N = the real state size: that matches the asymptotics of the HiPPO-LegS
            spectrum it imitates (with N/2 in its place the imaginary parts turn negative).
        B* [H, N/2, 2]     complex ones
        C [H, N/2, 2]      complex standard normal (E|C|^2 = 1: real and imaginary parts have
                           variance 1/2)
        D [H]              skip weights, standard normal
    """

    def __init__(
        self,
        channels: int,
        d_state: int = 64,
        init: str = "lin",
        discretization: str = "zoh",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        owner: str | None = None,
    ):
        super().__init__()
        owner = owner or type(self).__name__  # the mixer's name in its errors, when it has one
        channels = check_int(owner, "channels", channels)
        d_state = check_int(owner, "d_state", d_state, minimum=2)
        if d_state % 2:
            raise ValueError(f"{owner}: d_state must be even (conjugate pairs), got {d_state}")
        init, self.discretization, dt_min, dt_max = check_diagonal_args(
            owner, init, discretization, dt_min, dt_max
        )

        modes = d_state // 2
        n = torch.arange(modes, dtype=torch.float32)
        imag = math.pi * n if init == "lin" else d_state / math.pi * (d_state / (2 * n + 1) - 1)
        log_dt = torch.empty(channels).uniform_(math.log(dt_min), math.log(dt_max))
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.full((channels, modes), math.log(0.5)))
        self.A_imag = nn.Parameter(repeat(imag, "n -> h n", h=channels).clone())
        self.B = nn.Parameter(torch.view_as_real(torch.ones(channels, modes, dtype=torch.cfloat)))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(channels, modes, dtype=torch.cfloat)))
        self.D = nn.Parameter(torch.randn(channels))
        mark_ssm(self, "log_dt", "log_A_real", "A_imag", "B")

    def _continuous(self) -> tuple[torch.Tensor, ...]:
        """dt [H] and the complex A, B, C [H, N/2]."""
        if self.log_dt.dtype in (torch.float16, torch.bfloat16):
            # torch has no complex bfloat16, and a half-precision filter would lose its tail.
            raise TypeError(
                f"DiagonalSSM: parameters in {self.log_dt.dtype} are not supported; keep them "
                "in float32 and run in half precision under torch.autocast"
            )
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        B, C = torch.view_as_complex(self.B), torch.view_as_complex(self.C)
        return torch.exp(self.log_dt), A, B, C

    def forward(self, u, pregate=None, postgate=None) -> torch.Tensor:
        """u, gates [B, C, L] -> postgate * (K * v + D v) with v = u * pregate; [B, C, L].

        Beyond kernels.STATE_PASSING_LEN the convolution runs in chunks with the state passed
        between them (exact, linear in L, no length-L kernel).
        """
        channels, L = u.shape[1], u.shape[-1]
        if L > STATE_PASSING_LEN:
            parameters = (*self._continuous(), self.D)
            dt, A, B, C, D = (_per_channel(p, channels) for p in parameters)
            return ssm_chunked_conv(
                u, dt, A, B, C, D, STATE_PASSING_LEN, self.discretization, pregate, postgate
            )
        _check_channels(self.D.shape[0], channels)  # fftconv shares each head's filter
        return fftconv(u, self.filter(L), self.D, pregate, postgate)

    def filter(self, L: int) -> torch.Tensor:
        """The convolution kernel [H, L] of each head (without the skip D)."""
        dt, A, B, C = self._continuous()
        return s4d_kernel(dt, A, B, C, L, self.discretization)

    def prefill(self, u, pregate=None, postgate=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` and the state after the last position: x_L = sum_s dA^(L-1-s) dB v_s
        with v = u * pregate (kernels.s4d_state). u, gates [B, C, L] -> ([B, C, L], complex
        [B, C, N/2])."""
        self._step_cache = None  # a decode starts here (see _step_params)
        dt, A, B, _ = self._continuous()
        v = u if pregate is None else u * pregate
        dt, A, B = (_per_channel(p, u.shape[1]) for p in (dt, A, B))
        return self(u, pregate, postgate), s4d_state(v, dt, A, B, self.discretization)

    def init_state(self, batch_size: int, copies: int = 1) -> torch.Tensor:
        """Complex zeros [B, H * copies, N/2] (complex128 for float64 parameters)."""
        self._step_cache = None  # a decode starts here (see _step_params)
        dtype = torch.complex128 if self.log_dt.dtype == torch.float64 else torch.complex64
        shape = (batch_size, self.D.shape[0] * copies, self.B.shape[1])
        return torch.zeros(shape, dtype=dtype, device=self.D.device)

    def _discrete(self, channels: int) -> tuple[torch.Tensor, ...]:
        """dA, dB [channels, N/2] complex, 2 C as real pairs [channels, N] and D [channels],
        for ``step``: with x as its real view, 2 Re(C x) = (x_re, x_im) . (2 C_re, -2 C_im)."""
        dt, A, B, C = self._continuous()
        dA, dB = s4d_discretize(dt, A, B, self.discretization)
        C2 = 2 * torch.stack([C.real, -C.imag], dim=-1).flatten(-2)
        return tuple(_per_channel(p, channels) for p in (dA, dB, C2, self.D))

    def step(self, u_t, state) -> tuple[torch.Tensor, torch.Tensor]:
        """x <- dA x + dB u_t;  y_t = 2 Re(C x) + D u_t.  u_t [B, C] -> y_t [B, C]."""
        dA, dB, C2, D = _step_params(self, u_t.shape[1], self._discrete)
        # One new [B, C, N/2] tensor, updated in place (the given state is left as it is):
        # decoding is bound by such full-state passes.
        state = dA * state
        state.addcmul_(dB, u_t[..., None])
        return _dot_last(torch.view_as_real(state).flatten(-2), C2) + D * u_t, state


class ShiftSSM(nn.Module):
    """H3's shift SSM over H channels: a learned causal FIR filter of N taps plus a skip.

    A is the N x N shift matrix. With B = e1 (the paper; ``learn_b=False``) the state is the
    last N inputs, newest first, and the kernel is C itself. With ``learn_b=True`` (H3's
    released checkpoints) B [H, N] starts at e1 and trains as an SSM parameter; the kernel is
    then K[l] = sum_j C[j + l] B[j] and the state x_t = shift(x_{t-1}) + B u_t. Parameters:
    taps C [H, N] ~ normal / sqrt(N) (so the filter roughly keeps the input's variance) and
    skip D [H] ~ normal.
    """

    def __init__(
        self, channels: int, d_state: int = 64, learn_b: bool = False, owner: str | None = None
    ):
        super().__init__()
        owner = owner or type(self).__name__  # the mixer's name in its errors, when it has one
        channels = check_int(owner, "channels", channels)
        d_state = check_int(owner, "d_state", d_state)
        self.C = nn.Parameter(torch.randn(channels, d_state) / math.sqrt(d_state))
        self.D = nn.Parameter(torch.randn(channels))
        self.B = None
        if check_bool(owner, "learn_b", learn_b):
            e1 = torch.zeros(channels, d_state)
            e1[:, 0] = 1.0
            self.B = nn.Parameter(e1)
            mark_ssm(self, "B")

    def forward(self, u, pregate=None, postgate=None) -> torch.Tensor:
        """u, gates [B, C, L] -> postgate * (K * v + D v) with v = u * pregate; [B, C, L]."""
        _check_channels(self.D.shape[0], u.shape[1])  # fftconv shares each head's filter
        return fftconv(u, self.filter(u.shape[-1]), self.D, pregate, postgate)

    def filter(self, L: int) -> torch.Tensor:
        """The convolution kernel [H, min(N, L)] of each head (without the skip D)."""
        return shift_kernel(self.C, self.B, L=L)

    def prefill(self, u, pregate=None, postgate=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` and the state after the last position. u, gates [B, C, L] -> ([B, C, L],
        [B, C, N]).

        With r the last N inputs v = u * pregate newest first (zeros before the start), the
        state is r itself for B = e1, else x[n] = sum_{m <= n} B[n - m] r[m]: the causal
        convolution of r with B over the N state slots.
        """
        N = self.C.shape[1]
        v = u if pregate is None else u * pregate
        recent = v.flip(-1)[..., :N]
        recent = F.pad(recent, (0, N - recent.shape[-1]))
        if self.B is not None:
            recent = fftconv(recent, _per_channel(self.B, u.shape[1]))
        return self(u, pregate, postgate), recent

    def init_state(self, batch_size: int, copies: int = 1) -> torch.Tensor:
        """Zeros [B, H * copies, N] (with B = e1: the last N inputs, newest first)."""
        shape = (batch_size, self.C.shape[0] * copies, self.C.shape[1])
        return torch.zeros(shape, dtype=self.C.dtype, device=self.C.device)

    def step(self, u_t, state) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = shift(x_{t-1}) + B u_t; y_t = C . x_t + D u_t.  u_t [B, C] -> [B, C]."""
        channels = u_t.shape[1]
        C, D = _per_channel(self.C, channels), _per_channel(self.D, channels)
        if self.B is None:  # B = e1: push u_t into the register
            state = torch.cat([u_t[..., None], state[..., :-1]], dim=-1)
        elif torch.is_grad_enabled():  # autograd does not record out= products
            B = _per_channel(self.B, channels)
            state = F.pad(state[..., :-1], (1, 0)).addcmul_(B, u_t[..., None])
        else:  # decoding: one new tensor, each slot written once (1.4x faster than the pad)
            B, new = _per_channel(self.B, channels), torch.empty_like(state)
            torch.addcmul(state[..., :-1], B[:, 1:], u_t[..., None], out=new[..., 1:])
            torch.mul(B[:, 0], u_t, out=new[..., 0])
            state = new
        return _dot_last(state, C) + D * u_t, state


def make_ssm(
    kind: str,
    channels: int,
    d_state: int,
    init: str,
    discretization: str,
    dt_min: float,
    dt_max: float,
    learn_shift_b: bool = False,
    owner: str | None = None,
) -> DiagonalSSM | ShiftSSM:
    """A DiagonalSSM ("diag") or ShiftSSM ("shift"; ignores the diagonal-only arguments,
    and a diagonal SSM ignores ``learn_shift_b``); ``owner`` names the mixer in errors."""
    if check_choice(owner or "make_ssm", "kind", kind, SSM_KINDS) == "shift":
        return ShiftSSM(channels, d_state, learn_shift_b, owner)
    return DiagonalSSM(channels, d_state, init, discretization, dt_min, dt_max, owner)
