"""H3, "Hungry Hungry Hippos" (Dao, Fu et al. 2023), with the knobs of the paper's ablations.

Default (the paper and its release, head_dim 1), for x [B, L, D]:
    q, k, v = three biased Linear(D, D) of x
    k' = shift_ssm(k) + D_k k           learned FIR filter of d_state taps (remembers tokens)
    y  = diag_ssm(k' * v) + D (k' * v)  S4D kernel, bilinear (compares them over time)
    out = Linear(q * y)                 no norm or activation inside the layer
With head_dim = hd > 1 there are H = D / hd heads; per head h the second SSM sees hd x hd
channels kv[h, i, j] = k'[h, i] v[h, j] sharing head h's parameters, and
out[h, j] = sum_i q[h, i] (ssm(kv[h, i, j]) + D_h kv[h, i, j]). Up to REGROUPED_MAX_LEN
positions that sum is taken in another order, as linear attention with the head's filter as a
Toeplitz mask (exact, and cheaper at short lengths; see the constant).

Ablation knobs:
    first_ssm   "shift" (default) | "diag" (diag + diag) | "none" (k' = k)
    second_ssm  "diag" (default) | "shift" (shift + shift with first_ssm="shift")
    kv_gate     False: kv[h, i, j] = k'[h, i] + v[h, j], an outer sum instead of the outer
                product - the layer keeps every projection and its parameter count but loses
                the multiplicative k-v interaction (linear in x up to the q gate).
    q_gate      False: no q projection; out[h, j] = sum_i y[h, i, j].
    learn_shift_b  True: the shift SSMs learn B (from e1), as in H3's released checkpoints.
"""

from __future__ import annotations

import inspect

import torch
from einops import rearrange
from torch import nn

from kernels import causal_toeplitz, contiguous_grad, with_skip
from layers.base import Mixer, State, register
from layers.ssm import SSM_KINDS, check_diagonal_args, make_ssm

# Multi-head H3 up to this length takes its second SSM and head sum regrouped, as linear
# attention with a Toeplitz mask: out[h, :, t] = sum_{s <= t} (q_t . k'_s) T_h[t - s] v_s, where
# T_h is head h's filter with D_h at tap 0. The same sums in another order, so exact; its work
# is O(B H L^2 hd) for H heads, against the convolution of B H hd^2 channels and their
# [B, H hd^2, L] tensors. `python3 -m benchmarks.layer_speed --h3-forms` (hd=8, B=32, 1
# thread, AMD EPYC, fwd+bwd median ms, regrouped vs convolution): width 64 L=20 10.7 vs 16.3,
# L=30 14.8 vs 23.1, L=64 34.1 vs 49.3, L=128 91.7 vs 117, but L=256 409 vs 240, the
# [B, H, L, L] scores out of cache; width 128 L=64 74.2 vs 105, L=128 218 vs 260.
REGROUPED_MAX_LEN = 128


@register("h3")
class H3(Mixer):
    """Args: d_model D; d_state (taps of a shift SSM, real state size of a diagonal one);
    head_dim (must divide D); first_ssm, second_ssm, kv_gate, q_gate, learn_shift_b (see the module
    docstring); init ("lin" | "inv"), discretization ("bilinear" | "zoh"), dt_min, dt_max for
    the diagonal SSMs.

    State for ``step``: {"k": state of the first SSM over D channels (absent when
    first_ssm="none"), "kv": state of the second SSM over H * hd * hd channels}.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        head_dim: int = 1,
        first_ssm: str = "shift",
        second_ssm: str = "diag",
        kv_gate: bool = True,
        q_gate: bool = True,
        learn_shift_b: bool = False,
        init: str = "lin",
        discretization: str = "bilinear",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ):
        super().__init__(d_model)
        d = self.d_model
        self.head_dim = self._int("head_dim", head_dim)
        self._divides("head_dim", self.head_dim, "heads of head_dim channels")
        first_ssm = self._choice("first_ssm", first_ssm, ("none", *SSM_KINDS))
        second_ssm = self._choice("second_ssm", second_ssm, SSM_KINDS)
        self.kv_gate = self._bool("kv_gate", kv_gate)
        self.q_gate = self._bool("q_gate", q_gate)
        diagonal_args = check_diagonal_args(self.name, init, discretization, dt_min, dt_max)
        learn_shift_b = self._bool("learn_shift_b", learn_shift_b)
        # A setting that no SSM of this variant reads is an error, not silently ignored.
        kinds = (first_ssm, second_ssm)
        if learn_shift_b and "shift" not in kinds:
            raise ValueError(f"{self.name}: learn_shift_b=True needs a shift SSM")
        if "diag" not in kinds:
            defaults = inspect.signature(H3).parameters
            for param, value in zip(("init", "discretization", "dt_min", "dt_max"), diagonal_args):
                if value != defaults[param].default:
                    raise ValueError(
                        f"{self.name}: {param}={value!r} is for a diagonal SSM, and this H3 "
                        f"has none (first_ssm={first_ssm!r}, second_ssm={second_ssm!r})"
                    )
        ssm_args = (d_state, *diagonal_args, learn_shift_b)

        self.q_proj = nn.Linear(d, d) if self.q_gate else None
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        no_ssm = first_ssm == "none"
        self.k_ssm = None if no_ssm else make_ssm(first_ssm, d, *ssm_args, owner=self.name)
        self.kv_ssm = make_ssm(second_ssm, d // self.head_dim, *ssm_args, owner=self.name)
        self.output_linear = nn.Linear(d, d)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """x [..., D] -> q (None without the q gate), k, v [..., D]."""
        q = None if self.q_proj is None else self.q_proj(x)
        return q, self.k_proj(x), self.v_proj(x)

    def _heads_in(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """k', v [B, D, *T] -> second-SSM input [B, H * hd * hd, *T] (T: time axis or none)."""
        # k' and v arrive as strided views (the shift SSM's output, a transposed projection);
        # the outer product of strided operands comes out strided and its reshape copies it.
        # Copying the small operands instead: see _heads_out.
        k, v = k.contiguous(), v.contiguous()
        k = rearrange(k, "b (h i) ... -> b h i 1 ...", i=self.head_dim)
        v = rearrange(v, "b (h j) ... -> b h 1 j ...", j=self.head_dim)
        kv = k * v if self.kv_gate else k + v
        return rearrange(kv, "b h i j ... -> b (h i j) ...")

    def _heads_out(self, q: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """q [B, D, *T] or None, y [B, H * hd * hd, *T] -> sum_i q_i y_ij: [B, D, *T].

        The [B, D, *T] tensors are made contiguous both ways (q, and the output's gradient, a
        transposed [B, L, D] view), so that the products over all hd * hd channels, forward
        and backward, run on contiguous memory: with _heads_in's copies, fwd+bwd of a layer
        (D=64, hd=8, B=32, L=30, 1 thread, 240 steps in rotation) took 12.0 ms median against
        15.6 with none and 13.4 with only these.
        """
        y = rearrange(y, "b (h i j) ... -> b h i j ...", i=self.head_dim, j=self.head_dim)
        if q is not None:
            y = y * rearrange(q.contiguous(), "b (h i) ... -> b h i 1 ...", i=self.head_dim)
        return contiguous_grad(rearrange(y.sum(2), "b h j ... -> b (h j) ..."))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(x, prefill=False)[0]

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        """``forward`` and the state after the last position (each SSM's prefill)."""
        return self._mix(x, prefill=True)

    def _mix(self, x: torch.Tensor, prefill: bool) -> tuple[torch.Tensor, State]:
        """The parallel pass x [B, L, D] -> [B, L, D]; with ``prefill``, also the state."""
        state = {}

        def ssm(name: str, u: torch.Tensor, **gates) -> torch.Tensor:
            module = getattr(self, f"{name}_ssm")
            if not prefill:
                return module(u, **gates)
            y, state[name] = module.prefill(u, **gates)
            return y

        # Channels first for the convolutions: [B, D, L].
        q, k, v = (None if t is None else rearrange(t, "b l d -> b d l") for t in self._qkv(x))
        if self.k_ssm is not None:
            k = ssm("k", k)
        if self.head_dim == 1:
            # One channel per head: the gates go into the convolution itself (fused in fftconv),
            # y = q * (ssm(k' * v) + D k' * v).
            if self.kv_gate:
                y = ssm("kv", k, pregate=v, postgate=q)
            else:
                y = ssm("kv", k + v, postgate=q)
        elif self.kv_gate and not prefill and x.shape[1] <= REGROUPED_MAX_LEN:
            return self.output_linear(self._heads_regrouped(q, k, v)), state
        else:
            y = self._heads_out(q, ssm("kv", self._heads_in(k, v)))
        return self.output_linear(rearrange(y, "b d l -> b l d")), state

    def _heads_regrouped(self, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor):
        """q [B, D, L] or None, k', v [B, D, L] -> [B, L, D]: the second SSM and the head sum,
        _heads_out(q, kv_ssm(_heads_in(k', v))), as linear attention with a Toeplitz mask (see
        REGROUPED_MAX_LEN). Without the q gate every q_t is all ones."""
        L = k.shape[-1]
        taps = with_skip(self.kv_ssm.filter(L), self.kv_ssm.D)  # [H, K]
        mask = causal_toeplitz(taps, L)  # [H, L (t), L (s)]

        def heads(x):
            return rearrange(x, "b (h i) l -> b h l i", i=self.head_dim)

        k, v = heads(k), heads(v)
        if q is None:
            scores = k.sum(-1).unsqueeze(-2)  # [B, H, 1, L (s)]
        else:
            scores = heads(q) @ k.transpose(-1, -2)  # [B, H, L (t), L (s)]
        out = (scores * mask) @ v  # [B, H, L, hd]
        return rearrange(out, "b h l j -> b l (h j)")

    def _zero_state(self, batch_size: int) -> State:
        state = {"kv": self.kv_ssm.init_state(batch_size, copies=self.head_dim**2)}
        if self.k_ssm is not None:
            state["k"] = self.k_ssm.init_state(batch_size)
        return state

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        # The same helpers as forward, on [B, D] tensors without a time axis.
        q, k, v = self._qkv(x_t)
        new_state = {}
        if self.k_ssm is not None:
            k, new_state["k"] = self.k_ssm.step(k, state["k"])
        y, new_state["kv"] = self.kv_ssm.step(self._heads_in(k, v), state["kv"])
        return self.output_linear(self._heads_out(q, y)), new_state
