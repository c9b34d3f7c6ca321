"""Hyena, "Hyena Hierarchy" (Poli et al. 2023): gated implicit long convolutions.

For x [B, L, D] and order N:
    z = Linear(D, (N + 1) D)(x), then a short causal depthwise conv (short_filter taps)
    v, x_1 .. x_N = the N + 1 chunks of D channels of z, in that order
    h_1 .. h_N [D, L] = implicit filters of lags t = 0 .. L-1 (below)
    u = v;  for i = 1 .. N:  u = x_i * (h_i * u + b_i u)    (* causal convolution, fftconv)
    out = Linear(D, D)(dropout(u))
Order 2 is the paper's default; it has the shape of H3 (a gated short conv of keys, a long
convolution, a query gate) with explicit filters in place of SSM kernels.

Implicit filter (paper Sec. 3.3: h_t = Window(t) * FFN(PositionalEncoding(t))):
    pe(t) = [t / max_len, cos(w_k t), sin(w_k t) for k < K]        2K + 1 features,
        K = num_pe_features; w_k = 2 pi / P_k with periods P_k geometric from max_len
        positions down to 4 (one period of max_len when K = 1).
    FFN = Linear(2K + 1, W) -> Sine -> Linear(W, W) -> Sine -> Linear(W, N D),
        W = filter_order; Sine(a) = sin(f a) with a learned frequency f per unit, f = 1 at init.
    window_c(t) = exp(-alpha_c t / max_len), alpha_c set so that the window falls to 1e-2 at
        t = pct_c * max_len, pct_c spaced linearly over the D channels from fast_decay_pct
        to slow_decay_pct (channel c has the same window in every order).
Every feature is a function of the lag t alone, scaled by the fixed max_len and never by the
input length, so a filter tap does not change with L (the paper scales by the sequence
length). The paper's bands are linear, e^{2 pi i k t / L} for k < K; here they are geometric,
because with L = max_len >> the sequence lengths of the synthetic tasks, linear bands would be
nearly constant over the first few dozen lags and the filters could not resolve short lags.

Nothing here is an SSM parameter: the filter FFN trains at the normal learning rate.

Decoding: an implicit filter has no finite state-space form, so ``step`` keeps every past
input of each long convolution and computes the new output as the explicit causal sum with
taps 0 .. t, regenerating those taps from the FFN on each call. Position t thus costs O(t)
time and the state O(t) memory, unlike H3's constant-time step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kernels import fftconv
from layers.base import Mixer, State, check_float, factory_kwargs, register

DECAY_TARGET = 1e-2  # the window value reached at t = pct * max_len
MIN_PERIOD = 4  # shortest positional-encoding period, in positions


class Sine(nn.Module):
    """sin(f * a) with a learned frequency f per unit: a [..., W] -> [..., W]."""

    def __init__(self, width: int):
        super().__init__()
        self.freq = nn.Parameter(torch.ones(width))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * a)


@register("hyena")
class Hyena(Mixer):
    """Args (see the module docstring):
        d_model: width D.
        order: N >= 1, the number of gated long convolutions (2 in the paper).
        filter_order: W, width of the filter FFN.
        short_filter: taps of the short causal depthwise conv on the projections (1: a
            per-channel scale and bias only).
        max_len: longest sequence; positional features are scaled by it.
        num_pe_features: K, the number of positional-encoding frequencies (2K + 1 features).
        fast_decay_pct, slow_decay_pct: where the fastest and the slowest decay windows reach
            1e-2, as fractions of max_len (0 < fast <= slow; above 1, never within max_len).
        dropout: on the operator's output before out_proj, in training mode only.

    State for ``step``: {"proj": the last short_filter - 1 projected inputs [B, (N+1) D,
    short_filter - 1] (zeros at the start, as the causal padding), "conv1" .. "convN": the
    inputs of each long convolution so far [B, D, T]}. T, the number of positions seen, is the
    position; each step appends one.
    """

    def __init__(
        self,
        d_model: int,
        order: int = 2,
        filter_order: int = 64,
        short_filter: int = 3,
        max_len: int = 2048,
        num_pe_features: int = 8,
        fast_decay_pct: float = 0.3,
        slow_decay_pct: float = 1.5,
        dropout: float = 0.0,
    ):
        super().__init__(d_model)
        d = self.d_model
        self.order = self._int("order", order)
        filter_order = self._int("filter_order", filter_order)
        self.short_filter = self._int("short_filter", short_filter)
        self.max_len = self._int("max_len", max_len)
        self.num_pe_features = self._int("num_pe_features", num_pe_features)
        fast = check_float(self.name, "fast_decay_pct", fast_decay_pct, 0.0, math.inf)
        slow = check_float(self.name, "slow_decay_pct", slow_decay_pct, 0.0, math.inf)
        if not 0 < fast <= slow:
            raise ValueError(
                f"{self.name}: need 0 < fast_decay_pct <= slow_decay_pct, got {fast} and {slow}"
            )
        self.decay_pct = (fast, slow)
        dropout = check_float(self.name, "dropout", dropout, 0.0, 1.0)

        channels = (self.order + 1) * d
        self.in_proj = nn.Linear(d, channels)
        # The short depthwise conv: taps [C, short_filter] (the newest input's tap last) and a
        # bias, initialised like nn.Conv1d's ~ U(+-1/sqrt(fan_in)), fan_in = short_filter.
        bound = 1 / math.sqrt(self.short_filter)
        self.short_weight = nn.Parameter(
            torch.empty(channels, self.short_filter).uniform_(-bound, bound)
        )
        self.short_bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))
        self.filter_ffn = nn.Sequential(
            nn.Linear(2 * self.num_pe_features + 1, filter_order),
            Sine(filter_order),
            nn.Linear(filter_order, filter_order),
            Sine(filter_order),
            nn.Linear(filter_order, self.order * d),
        )
        self.bias = nn.Parameter(torch.randn(self.order, d))  # b_i: the skip of convolution i
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(d, d)

    def _check_length(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(
                f"{self.name}: sequence length {length} exceeds max_len={self.max_len}"
            )

    def positional_features(self, L: int) -> torch.Tensor:
        """pe(t) for t = 0 .. L-1: [L, 2K + 1], in the module's dtype (see _feature_kwargs)."""
        fk, out_dtype = self._feature_kwargs()
        t = torch.arange(L, **fk)[:, None]
        exponent = torch.linspace(0, 1, self.num_pe_features, **fk)
        periods = self.max_len * (MIN_PERIOD / self.max_len) ** exponent
        angles = t * (2 * math.pi / periods)
        pe = torch.cat([t / self.max_len, torch.cos(angles), torch.sin(angles)], dim=-1)
        return pe.to(out_dtype)

    def decay_window(self, L: int) -> torch.Tensor:
        """window_c(t) for t = 0 .. L-1: [D, L], in the module's dtype (see _feature_kwargs)."""
        fk, out_dtype = self._feature_kwargs()
        pct = torch.linspace(*self.decay_pct, self.d_model, **fk)
        rates = math.log(1 / DECAY_TARGET) / pct
        t = torch.arange(L, **fk)
        return torch.exp(-rates[:, None] * (t / self.max_len)).to(out_dtype)

    def _feature_kwargs(self) -> tuple[dict, torch.dtype]:
        """(factory kwargs in fp32, or fp64 for an fp64 module; the module's dtype): positions
        and angles are computed in the former and rounded once. In bf16, arange(1024) has 513
        distinct values and the filters' features were off by 36-58% past lag 64."""
        fk = factory_kwargs(self)
        out_dtype = fk["dtype"]
        fk["dtype"] = torch.float64 if out_dtype == torch.float64 else torch.float32
        return fk, out_dtype

    def filters(self, L: int) -> torch.Tensor:
        """Taps h_i[c, t] of lags t = 0 .. L-1: [N, D, L]; tap t depends on t only."""
        h = self.filter_ffn(self.positional_features(L))
        return rearrange(h, "l (n d) -> n d l", n=self.order) * self.decay_window(L)

    def _short_conv(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``step``'s short conv: projections z [B, (N+1) D, T + short_filter - 1], the first
        short_filter - 1 of them the causal context -> v, [x_1 .. x_N], each [B, D, T]. A sum
        over the few taps (T = 1 here); the forward pass convolves with fftconv instead."""
        T = z.shape[-1] - self.short_filter + 1
        out = self.short_bias[:, None]
        for j in range(self.short_filter):
            out = out + self.short_weight[:, j, None] * z[..., j : j + T]
        return self._split(out)

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """[B, (N+1) D, T] -> v, [x_1 .. x_N], each [B, D, T]."""
        v, *gates = rearrange(z, "b (n d) t -> n b d t", n=self.order + 1)
        return v, gates

    def _output(self, u: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(u))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefill(x)[0]

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        """``forward`` and the state after the last position; the state is views of tensors
        the forward pass computes anyway (the projections' tail, each convolution's input)."""
        L = x.shape[1]
        self._check_length(L)
        proj = rearrange(self.in_proj(x), "b l c -> b c l")
        # The short conv is the causal convolution with the taps newest first. Through fftconv
        # rather than a sum of shifted products, whose backward zero-fills a full-size gradient
        # per tap: fwd+bwd of that conv at B=32, (N+1) D = 192, L=30 took 3.84 ms against 1.52
        # (1 thread, median of 400 alternating calls).
        u, gates = self._split(fftconv(proj, self.short_weight.flip(-1)) + self.short_bias[:, None])
        keep = self.short_filter - 1  # the last projections, zeros before the start
        state = {"proj": F.pad(proj[..., max(L - keep, 0) :], (max(keep - L, 0), 0))}
        # The gate and the skip go into the convolution itself (fused in fftconv).
        for i, (h_i, b_i, x_i) in enumerate(zip(self.filters(L), self.bias, gates), start=1):
            state[f"conv{i}"] = u
            u = fftconv(u, h_i, b_i, postgate=x_i)
        return self._output(rearrange(u, "b d l -> b l d")), state

    def _zero_state(self, batch_size: int) -> State:
        fk = factory_kwargs(self)
        channels = (self.order + 1) * self.d_model
        state = {"proj": torch.zeros(batch_size, channels, self.short_filter - 1, **fk)}
        for i in range(1, self.order + 1):
            state[f"conv{i}"] = torch.zeros(batch_size, self.d_model, 0, **fk)
        return state

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        t = state["conv1"].shape[-1]
        self._check_length(t + 1)
        window = torch.cat([state["proj"], self.in_proj(x_t)[..., None]], dim=-1)  # oldest first
        u, gates = self._short_conv(window)  # one position: [B, D, 1]
        new_state = {"proj": window[..., 1:]}
        taps = self.filters(t + 1).flip(-1)  # taps[..., s] multiplies the input at position s
        for i, (h_i, b_i, x_i) in enumerate(zip(taps, self.bias, gates), start=1):
            history = torch.cat([state[f"conv{i}"], u], dim=-1)  # [B, D, t + 1]
            new_state[f"conv{i}"] = history
            u = x_i * ((history * h_i).sum(-1, keepdim=True) + b_i[:, None] * u)
        return self._output(u[..., 0]), new_state
