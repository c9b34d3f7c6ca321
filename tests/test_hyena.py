"""Tests of the Hyena mixer: shapes, causality, step == forward, a plain-loop float64 oracle of
the gated convolution recurrence, the implicit filter against its documented formula, filters
that depend on the lag only, the max_len limit and build validation.

The oracles use only the module's parameters (and, for the recurrence, its generated filters);
they share no code with layers/hyena.py or kernels/.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import layers

D_MODEL, SEQ_LEN, BATCH = 16, 12, 2
SMALL = {"filter_order": 8, "num_pe_features": 3, "max_len": 32}
VARIANTS = [{"order": order, "short_filter": taps} for order in (1, 2, 3) for taps in (1, 3)]


def variant_id(params: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in params.items())


def make(dtype=torch.float64, **params) -> layers.Hyena:
    torch.manual_seed(0)
    mixer = layers.build("hyena", d_model=D_MODEL, **{**SMALL, **params})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # break init symmetries (Sine frequencies all 1)
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return mixer.to(dtype)


def inputs(length=SEQ_LEN, dtype=torch.float64, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, length, D_MODEL, generator=generator, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("params", VARIANTS, ids=variant_id)
def test_shapes(params, dtype):
    mixer = make(dtype, **params)
    x = inputs(dtype=dtype)
    y = mixer(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert mixer.filters(SEQ_LEN).shape == (params["order"], D_MODEL, SEQ_LEN)
    state = mixer.init_state(BATCH)
    assert state["proj"].shape == (
        BATCH,
        (params["order"] + 1) * D_MODEL,
        params["short_filter"] - 1,
    )
    for i in range(1, params["order"] + 1):
        assert state[f"conv{i}"].shape == (BATCH, D_MODEL, 0)
    assert all(s.dtype == dtype for s in state.values())


@pytest.mark.parametrize("params", VARIANTS, ids=variant_id)
def test_causal(params):
    mixer = make(**params)
    x = inputs()
    for j in (0, 5, SEQ_LEN - 1):
        perturbed = x.clone()
        perturbed[:, j] += 10 * inputs(seed=2)[:, 0]
        y, y_perturbed = mixer(x), mixer(perturbed)
        torch.testing.assert_close(y_perturbed[:, :j], y[:, :j], rtol=0, atol=1e-12)
        assert (y_perturbed[:, j] - y[:, j]).abs().max() > 1e-3


@pytest.mark.parametrize("params", VARIANTS, ids=variant_id)
def test_step_matches_forward(params):
    mixer = make(**params)
    x = inputs()
    y = mixer(x)
    state = mixer.init_state(BATCH)
    for t in range(SEQ_LEN):
        y_t, state = mixer.step(x[:, t], state)
        torch.testing.assert_close(y_t, y[:, t], rtol=1e-10, atol=1e-10)
        assert state["conv1"].shape[-1] == t + 1  # the history length is the position


def loop_oracle(mixer: layers.Hyena, x: torch.Tensor) -> torch.Tensor:
    """The Hyena recurrence with Python loops, from the module's weights and its filters."""
    N, S, (_, L, D) = mixer.order, mixer.short_filter, x.shape
    proj = F.linear(x, mixer.in_proj.weight, mixer.in_proj.bias)  # [B, L, (N+1) D]
    w, w_bias = mixer.short_weight, mixer.short_bias  # [(N+1) D, S], [(N+1) D]
    z = torch.zeros_like(proj)
    for t in range(L):
        z[:, t] = w_bias
        for j in range(S):  # tap j multiplies the input S - 1 - j positions back
            s = t - (S - 1 - j)
            if s >= 0:
                z[:, t] += w[:, j] * proj[:, s]
    v, gates = z[..., :D], [z[..., i * D : (i + 1) * D] for i in range(1, N + 1)]
    h = mixer.filters(L)  # [N, D, L]
    u = v
    for i in range(N):
        new = torch.zeros_like(u)
        for t in range(L):
            acc = mixer.bias[i] * u[:, t]
            for s in range(t + 1):
                acc = acc + h[i, :, t - s] * u[:, s]
            new[:, t] = gates[i][:, t] * acc
        u = new
    return F.linear(u, mixer.out_proj.weight, mixer.out_proj.bias)


@pytest.mark.parametrize("params", VARIANTS, ids=variant_id)
def test_matches_loop_oracle(params):
    mixer = make(**params)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), loop_oracle(mixer, x), rtol=1e-10, atol=1e-10)


def test_filters_follow_the_documented_formula():
    mixer = make(order=2, max_len=64, num_pe_features=4, fast_decay_pct=0.2, slow_decay_pct=2.0)
    L, K = 20, 4
    ffn = mixer.filter_ffn
    expected = torch.zeros(2, D_MODEL, L, dtype=torch.float64)
    with torch.no_grad():
        for t in range(L):
            periods = [64 * (4 / 64) ** (k / (K - 1)) for k in range(K)]
            angles = [2 * math.pi * t / p for p in periods]
            pe = torch.tensor(
                [t / 64] + [math.cos(a) for a in angles] + [math.sin(a) for a in angles],
                dtype=torch.float64,
            )
            hidden = torch.sin(ffn[1].freq * (ffn[0].weight @ pe + ffn[0].bias))
            hidden = torch.sin(ffn[3].freq * (ffn[2].weight @ hidden + ffn[2].bias))
            out = (ffn[4].weight @ hidden + ffn[4].bias).reshape(2, D_MODEL)
            for c in range(D_MODEL):
                pct = 0.2 + (2.0 - 0.2) * c / (D_MODEL - 1)
                # exp(-alpha pct) = 1e-2 at t = pct * max_len
                window = math.exp(-math.log(100) / pct * t / 64)
                expected[:, c, t] = out[:, c] * window
        torch.testing.assert_close(mixer.filters(L), expected, rtol=1e-10, atol=1e-12)
    # The slowest channel decays 10x more slowly than the fastest.
    window = mixer.decay_window(64)
    torch.testing.assert_close(
        window[0, 13].log() / window[-1, 13].log(), torch.tensor(10.0).double()
    )


def test_bfloat16_filters_round_the_fp32_ones():
    # A bf16 module's positions and angles are computed in fp32 and rounded once: in bf16,
    # arange(1024) has 513 distinct values, and the filters were off by 36-58% past lag 64.
    mixer = make(max_len=1024)
    with torch.no_grad():
        want = mixer.float().filters(1024).double()
        got = mixer.bfloat16().filters(1024).double()
    err = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert err.max() < 0.03  # bf16 weights and rounding along the filter MLP


def test_filters_depend_on_lag_only():
    mixer = make()
    with torch.no_grad():
        torch.testing.assert_close(mixer.filters(8), mixer.filters(12)[..., :8], rtol=0, atol=1e-12)
        # Hence a prefix of the input gives the prefix of the output.
        x = inputs()
        torch.testing.assert_close(mixer(x[:, :8]), mixer(x)[:, :8], rtol=0, atol=1e-12)


def test_longer_than_max_len_raises():
    mixer = make(max_len=8)
    mixer(inputs(length=8))
    with pytest.raises(ValueError, match="sequence length 12 exceeds max_len=8"):
        mixer(inputs(length=12))
    state = mixer.init_state(BATCH)
    x = inputs(length=9)
    for t in range(8):
        _, state = mixer.step(x[:, t], state)
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_len=8"):
        mixer.step(x[:, 8], state)


def test_defaults_registry_and_no_ssm_parameters():
    mixer = layers.build("hyena", d_model=64)
    assert "hyena" in layers.names() and isinstance(mixer, layers.Hyena)
    assert (mixer.order, mixer.short_filter, mixer.max_len) == (2, 3, 2048)
    assert layers.ssm_parameters(mixer) == []
    x = torch.randn(2, 20, 64)
    assert mixer(x).shape == x.shape


@pytest.mark.parametrize(
    "params, param",
    [
        ({"orders": 2}, "unknown parameter 'orders'; expected one of"),
        ({"d_state": 8}, "unknown parameter 'd_state'"),
        ({"order": 0}, "order"),
        ({"order": True}, "order"),
        ({"order": 2.0}, "order"),
        ({"filter_order": 0}, "filter_order"),
        ({"short_filter": 0}, "short_filter"),
        ({"max_len": 0}, "max_len"),
        ({"num_pe_features": 0}, "num_pe_features"),
        ({"fast_decay_pct": 0.0}, "fast_decay_pct"),
        ({"fast_decay_pct": -0.1}, "fast_decay_pct"),
        ({"slow_decay_pct": "1.5"}, "slow_decay_pct"),
        ({"fast_decay_pct": 2.0, "slow_decay_pct": 1.0}, "fast_decay_pct <= slow_decay_pct"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_build_rejects_bad_parameters(params, param):
    with pytest.raises(ValueError, match=param):
        layers.build("hyena", **{"d_model": 16, **params})
