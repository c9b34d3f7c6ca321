"""Tests of layers/: the mixer contract for every registered mixer and the H3 variants
(shapes, causality, step == forward, prefill + step == forward, float32 vs float64,
gradients), plain-loop float64 oracles for the SSM submodules and for H3, SSM-parameter flags
and build validation.

The oracles discretise the SSMs themselves from the raw parameters and run the recurrences
with Python loops; they share no code with layers/ or kernels/.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import layers
import layers.h3 as h3_module
from layers import DiagonalSSM, ShiftSSM

D_MODEL, SEQ_LEN, BATCH, D_STATE = 16, 12, 2, 8

# Small settings per mixer; a mixer not listed here runs with its defaults.
SMALL = {"s4d": {"d_state": D_STATE}, "gss": {"d_state": D_STATE}, "h3": {"d_state": D_STATE}}

H3_VARIANTS = [
    {"head_dim": 2},
    {"head_dim": 4},
    {"first_ssm": "none"},
    {"first_ssm": "diag"},
    {"first_ssm": "diag", "head_dim": 2},
    {"second_ssm": "shift"},
    {"second_ssm": "shift", "head_dim": 2},
    {"kv_gate": False},
    {"q_gate": False},
    {"kv_gate": False, "q_gate": False, "head_dim": 2},
    {"init": "inv"},
    {"discretization": "zoh"},
    {"learn_shift_b": True},
    {"learn_shift_b": True, "second_ssm": "shift", "head_dim": 2},
]
CONFIGS = (
    [(name, {}) for name in layers.names()]
    + [("attention", {"num_heads": 4}), ("attention", {"num_heads": 2, "rotary": True})]
    + [("h3", variant) for variant in H3_VARIANTS]
)


def config_id(config) -> str:
    name, params = config
    return name + "".join(f"-{k}={v}" for k, v in params.items())


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Perturb every parameter, so that no init symmetry (B = 1, equal A) hides an error."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def make(name: str, params: dict, dtype=torch.float64) -> layers.Mixer:
    torch.manual_seed(0)
    mixer = layers.build(name, d_model=D_MODEL, **{**SMALL.get(name, {}), **params})
    randomise(mixer)
    return mixer.to(dtype)


def inputs(dtype=torch.float64, seed=1, batch=BATCH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, SEQ_LEN, D_MODEL, generator=generator, dtype=dtype)


# kernels.fftconv takes its Toeplitz method from this batch size on at short lengths (the task
# batches' shape); BATCH takes the FFT or direct one. Oracle tests run both.
TOEPLITZ_BATCH = 17


# ---------------------------------------------------------------------------------------------
# The mixer contract


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_step_matches_forward(config):
    mixer = make(*config)
    x = inputs()
    y = mixer(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    start = mixer.init_state(batch_size=BATCH)
    state = start
    for t in range(SEQ_LEN):
        y_t, state = mixer.step(x[:, t], state)
        assert y_t.shape == (BATCH, D_MODEL)
        torch.testing.assert_close(y_t, y[:, t], rtol=1e-10, atol=1e-10)
    # step must not modify the state it was given: the initial state still gives position 0.
    torch.testing.assert_close(mixer.step(x[:, 0], start)[0], y[:, 0], rtol=1e-10, atol=1e-10)


def stepped_state(mixer: layers.Mixer, x: torch.Tensor) -> layers.State:
    state = mixer.init_state(batch_size=x.shape[0])
    for t in range(x.shape[1]):
        state = mixer.step(x[:, t], state)[1]
    return state


@pytest.mark.parametrize("batch", [BATCH, TOEPLITZ_BATCH])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_prefill_then_step_matches_forward(config, batch):
    mixer = make(*config)
    x = inputs(batch=batch)
    y = mixer(x)
    # One position, fewer positions than a shift SSM's taps (D_STATE), and more.
    for split in (1, D_STATE - 3, SEQ_LEN - 2):
        y_prefix, state = mixer.prefill(x[:, :split])
        torch.testing.assert_close(y_prefix, y[:, :split], rtol=1e-10, atol=1e-10)
        expected = stepped_state(mixer, x[:, :split])
        assert state.keys() == expected.keys()
        for key in state:
            torch.testing.assert_close(state[key], expected[key], rtol=1e-10, atol=1e-10)
        for t in range(split, SEQ_LEN):
            y_t, state = mixer.step(x[:, t], state)
            torch.testing.assert_close(y_t, y[:, t], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_branching_steps_without_autograd(config):
    # Without autograd a step may write in place (attention appends to spare cache capacity):
    # two steps from one state must still both be right, and so must continuing either.
    mixer = make(*config)
    x = inputs()
    branch = torch.cat([x[:, :4], inputs(seed=2)[:, 4:]], dim=1)
    with torch.no_grad():
        y, y_branch = mixer(x), mixer(branch)
        state = mixer.step(x[:, 3], mixer.prefill(x[:, :3])[1])[1]
        y_4, after_x = mixer.step(x[:, 4], state)
        y_branch_4, after_branch = mixer.step(branch[:, 4], state)
        pairs = [
            (y_4, y[:, 4]),
            (y_branch_4, y_branch[:, 4]),
            (mixer.step(x[:, 5], after_x)[0], y[:, 5]),
            (mixer.step(branch[:, 5], after_branch)[0], y_branch[:, 5]),
            (mixer.step(x[:, 4], state)[0], y[:, 4]),
        ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_attention_steps_from_a_batch_slice_of_the_state():
    # Dropping finished sequences or pruning beams keeps the first rows of a state (a view
    # starting at the cache buffer's address): the step must see those rows only.
    mixer = make("attention", {"num_heads": 2})
    x = inputs()
    with torch.no_grad():
        y = mixer(x)
        # After a step, the cache is a prefix view of a buffer with spare positions.
        state = mixer.step(x[:, 2], mixer.prefill(x[:, :2])[1])[1]
        for rows in (slice(0, 1), slice(0, 2), slice(1, 3)):
            kept = {name: t[rows] for name, t in state.items()}
            y_3, after = mixer.step(x[rows, 3], kept)
            torch.testing.assert_close(y_3, y[rows, 3], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(mixer.step(x[rows, 4], after)[0], y[rows, 4])
        # The full state still continues correctly after its slices were stepped.
        torch.testing.assert_close(mixer.step(x[:, 3], state)[0], y[:, 3])


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_attention_cache_holds_k_and_v_only_with_room_to_grow(mode):
    # The prefill cache was a view of the qkv projection (q kept alive: 3/2 of the cache) and
    # the first step copied it into a buffer of twice its length. Now: one buffer per tensor,
    # room for a quarter more positions, filled in place until full, then regrown once. Under
    # inference mode too, where views record no base and every step crashed.
    mixer = make("attention", {"num_heads": 2})
    B, T, E = 3, 64, D_MODEL // 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T + 37, D_MODEL, generator=g, dtype=torch.float64)
    with mode():
        y = mixer(x)
        y_prefix, state = mixer.prefill(x[:, :T])
        for cache in state.values():
            assert cache.untyped_storage().nbytes() == B * 2 * (T + 16) * E * cache.itemsize
        buffers = [state["k"].untyped_storage().data_ptr()]
        for t in range(T, T + 37):
            y_t, state = mixer.step(x[:, t], state)
            torch.testing.assert_close(y_t, y[:, t], rtol=1e-10, atol=1e-10)
            buffers.append(state["k"].untyped_storage().data_ptr())
    # Positions T .. T + 15 went in place, the 17th step regrew the buffer to T + 17 and a
    # quarter (20), and the 20 steps after it fill that in place.
    assert len(set(buffers[:17])) == 1 and len(set(buffers)) == 2
    assert state["k"].untyped_storage().nbytes() == B * 2 * (T + 17 + 20) * E * 8


def test_attention_steps_a_cache_made_in_inference_mode_outside_it():
    """A prefill under inference_mode, then steps under no_grad: the buffer is read-only
    outside inference mode, so the step copies it (it raised RuntimeError writing in place)."""
    mixer = make("attention", {"num_heads": 2})
    x = inputs()
    with torch.no_grad():
        y = mixer(x)
    with torch.inference_mode():
        _, state = mixer.prefill(x[:, :4])
    with torch.no_grad():
        for t in range(4, x.shape[1]):
            y_t, state = mixer.step(x[:, t], state)
            torch.testing.assert_close(y_t, y[:, t], rtol=1e-10, atol=1e-10)


def test_prefill_fallback_steps():
    # The Mixer base's prefill (for mixers without a parallel one) on a mixer that has one.
    mixer = make("s4d", {})
    x = inputs()
    y, state = layers.Mixer.prefill(mixer, x)
    y_parallel, state_parallel = mixer.prefill(x)
    torch.testing.assert_close(y, y_parallel, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state["ssm"], state_parallel["ssm"], rtol=1e-10, atol=1e-10)


def test_rotary_matches_complex_rotation():
    # Oracle: channel pair (i, i + E/2) as the complex number x_i + j x_{i+E/2}, multiplied by
    # exp(j * pos * base^(-2i/E)), one position and one pair at a time.
    from layers.attention import rotate

    E, L, base = 6, 5, 100.0
    x = torch.randn(2, L, E, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([0, 1, 2, 7, 30])
    want = torch.empty_like(x)
    for t in range(L):
        for i in range(E // 2):
            z = torch.complex(x[:, t, i], x[:, t, i + E // 2])
            angle = torch.tensor(positions[t].item() * base ** (-2 * i / E), dtype=torch.float64)
            turned = z * torch.exp(1j * angle)
            want[:, t, i], want[:, t, i + E // 2] = turned.real, turned.imag
    torch.testing.assert_close(rotate(x, positions, base), want, rtol=1e-12, atol=1e-12)


def test_rotary_scores_depend_on_relative_position_only():
    from layers.attention import rotate

    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 8, dtype=torch.float64, generator=g) for _ in range(2))

    def score(i, j):
        return (rotate(q, torch.tensor([i]), 1e4) * rotate(k, torch.tensor([j]), 1e4)).sum()

    torch.testing.assert_close(score(3, 1), score(12, 10))
    assert not torch.isclose(score(3, 1), score(3, 2))


def test_rotary_in_bfloat16_keeps_positions_apart():
    # bf16 holds integers only up to 256: angles computed in it turned positions 256 and 257
    # alike and were off by radians at 2000. Oracle: the float64 rotation, rounded to bf16.
    from layers.attention import rotate

    x = torch.randn(6, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([3, 256, 257, 1000, 2000, 4095])
    want = rotate(x, positions, 1e4)
    got = rotate(x.bfloat16(), positions, 1e4).double()
    assert (got - want).abs().max() < 0.05 * x.abs().max()  # bf16 rounding, a few ulps
    same = x[:1].expand(2, 64).bfloat16()
    assert not torch.equal(*rotate(same, torch.tensor([256, 257]), 1e4))


def test_half_precision_ssm_parameters_are_a_clear_error():
    mixer = layers.build("s4d", d_model=8, d_state=4).to(torch.bfloat16)
    with pytest.raises(TypeError, match="DiagonalSSM: parameters in torch.bfloat16 .*autocast"):
        mixer(torch.randn(2, 5, 8, dtype=torch.bfloat16))


def test_rotary_rejects_odd_head_size():
    with pytest.raises(ValueError, match="even head size"):
        layers.build("attention", d_model=6, num_heads=2, rotary=True)


def test_step_params_follow_parameter_updates():
    # Decoding reuses the discretised SSM parameters between steps (no autograd); an optimizer
    # step or load_state_dict in between must be seen by the next step.
    mixer = make("s4d", {})
    x_t = inputs()[:, 0]
    with torch.no_grad():
        state = mixer.init_state(BATCH)
        mixer.step(x_t, state)  # fills the cache
        mixer.ssm.log_dt.add_(0.5)
        mixer.ssm.A_imag.mul_(1.5)
        cached, _ = mixer.step(x_t, state)
        fresh = make("s4d", {})
        fresh.load_state_dict(mixer.state_dict())
        want, _ = fresh.step(x_t, state)
    torch.testing.assert_close(cached, want, rtol=0, atol=0)
    # Updates that leave the version counter alone (fused AdamW, edits through .data) are
    # seen by the next decode, which starts from init_state or prefill.
    opt = torch.optim.AdamW(mixer.parameters(), lr=0.1, fused=True)
    mixer(inputs()).square().mean().backward()
    versions = [p._version for p in mixer.ssm.parameters()]
    opt.step()
    assert [p._version for p in mixer.ssm.parameters()] == versions  # the case in point
    with torch.no_grad():
        mixer.ssm.D.data.add_(0.5)
        fresh.load_state_dict(mixer.state_dict())
        want, _ = fresh.step(x_t, fresh.init_state(BATCH))
        got, _ = mixer.step(x_t, mixer.init_state(BATCH))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        mixer.step(x_t, state)  # the cache again
        mixer.ssm.D.data.add_(0.5)
        fresh.load_state_dict(mixer.state_dict())
        got, want = (m.step(x_t, m.prefill(inputs())[1])[0] for m in (mixer, fresh))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # With autograd on, each step builds its own graph: two backward passes both work.
    for _ in range(2):
        mixer.step(x_t, state)[0].sum().backward()
    assert mixer.ssm.log_dt.grad is not None


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_causal(config):
    mixer = make(*config)
    x = inputs()
    j = 5
    perturbed = x.clone()
    perturbed[:, j] += 10 * inputs(seed=2)[:, 0]
    y, y_perturbed = mixer(x), mixer(perturbed)
    # FFT convolutions spread rounding error over all positions, so "unchanged" means to
    # float64 rounding rather than bit-exact.
    torch.testing.assert_close(y_perturbed[:, :j], y[:, :j], rtol=0, atol=1e-12)
    assert (y_perturbed[:, j] - y[:, j]).abs().max() > 1e-3


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_float32_agrees_with_float64(config):
    mixer64 = make(*config)
    mixer32 = copy.deepcopy(mixer64).float()
    x = inputs()
    y32 = mixer32(x.float())
    assert y32.dtype == torch.float32
    y64 = mixer64(x)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)
    for mixer, real, complex_ in ((mixer32, torch.float32, torch.complex64),
                                  (mixer64, torch.float64, torch.complex128)):  # fmt: skip
        for tensor in mixer.init_state(BATCH).values():
            assert tensor.dtype in (real, complex_) and tensor.shape[0] == BATCH
    state = mixer32.init_state(BATCH)
    for t in range(3):
        y_t, state = mixer32.step(x[:, t].float(), state)
        assert y_t.dtype == torch.float32
        torch.testing.assert_close(y_t.double(), y64[:, t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_every_parameter_gets_a_gradient(config):
    # An unused parameter would break DDP and hide a wiring error.
    mixer = make(*config)
    mixer(inputs()).square().sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", layers.names())
def test_input_jacobian_matches_finite_differences(name):
    """gradcheck in float64 (B = 2: the fft method) through the whole mixer. Its Jacobian takes
    one backward pass per output through one graph, the second and later ones by the kernels'
    reference fallback (Hyena's, whose gates come from one projection, crashed there). The
    fallback rounds differently from the first pass, by ~1e-16, hence nondet_tol."""
    mixer = make(name, {})
    x = inputs()[:, :5].requires_grad_()
    assert torch.autograd.gradcheck(mixer, (x,), nondet_tol=1e-10)


# ---------------------------------------------------------------------------------------------
# Loop oracles


def discretise(ssm: DiagonalSSM):
    """dA, dB, C [H, N/2] complex128 from the raw parameters (ZOH or bilinear)."""
    dt = ssm.log_dt.detach().double().exp()[:, None]
    A = -ssm.log_A_real.detach().double().exp() + 1j * ssm.A_imag.detach().double()
    B = torch.view_as_complex(ssm.B.detach().double().contiguous())
    C = torch.view_as_complex(ssm.C.detach().double().contiguous())
    if ssm.discretization == "zoh":
        dA = torch.exp(dt * A)
        dB = (dA - 1) / A * B
    else:
        dA = (1 + dt * A / 2) / (1 - dt * A / 2)
        dB = dt * B / (1 - dt * A / 2)
    return dA, dB, C


def diagonal_loop(ssm: DiagonalSSM, u: torch.Tensor) -> torch.Tensor:
    """x <- dA x + dB u_t, y_t = 2 Re(C x) + D u_t per channel; u [B, H * R, L]."""
    dA, dB, C = discretise(ssm)
    D = ssm.D.detach().double()
    copies = u.shape[1] // dA.shape[0]
    y = torch.zeros_like(u)
    for c in range(u.shape[1]):
        h = c // copies
        x = torch.zeros(u.shape[0], dA.shape[1], dtype=torch.complex128)
        for t in range(u.shape[2]):
            x = dA[h] * x + dB[h] * u[:, c, t, None]
            y[:, c, t] = 2 * (C[h] * x).sum(-1).real + D[h] * u[:, c, t]
    return y


def shift_loop(ssm: ShiftSSM, u: torch.Tensor) -> torch.Tensor:
    """The state-space recurrence with an explicit N x N shift matrix A, per channel:
    x_t = A x_{t-1} + B u_t, y_t = C x_t + D u_t (B = e1 unless the SSM learns B).
    u [B, H * R, L]."""
    C, D = ssm.C.detach().double(), ssm.D.detach().double()
    H, N = C.shape
    B = torch.eye(N, dtype=torch.float64)[0].expand(H, N) if ssm.B is None else ssm.B.detach()
    A = torch.diag(torch.ones(N - 1, dtype=torch.float64), -1)
    copies = u.shape[1] // H
    y = torch.zeros_like(u)
    for c in range(u.shape[1]):
        h = c // copies
        x = torch.zeros(u.shape[0], N, dtype=torch.float64)
        for t in range(u.shape[2]):
            x = x @ A.T + B[h].double() * u[:, c, t, None]
            y[:, c, t] = x @ C[h] + D[h] * u[:, c, t]
    return y


def ssm_inputs(channels: int):
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(BATCH, channels, SEQ_LEN, generator=generator, dtype=torch.float64)
            for _ in range(3)]  # fmt: skip


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
@pytest.mark.parametrize("init", ["lin", "inv"])
def test_diagonal_ssm_matches_recurrence(init, discretization):
    ssm = DiagonalSSM(3, D_STATE, init, discretization).double()
    randomise(ssm)
    u, pre, post = ssm_inputs(6)  # 2 channels per head
    expected = diagonal_loop(ssm, u)
    torch.testing.assert_close(ssm(u), expected, rtol=1e-10, atol=1e-10)
    gated = post * diagonal_loop(ssm, u * pre)
    torch.testing.assert_close(ssm(u, pregate=pre, postgate=post), gated, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("learn_b", [False, True])
@pytest.mark.parametrize("d_state", [5, 16])  # fewer taps than positions, and more
def test_shift_ssm_matches_recurrence(d_state, learn_b):
    ssm = ShiftSSM(3, d_state, learn_b).double()
    randomise(ssm)
    u, pre, post = ssm_inputs(6)
    torch.testing.assert_close(ssm(u), shift_loop(ssm, u), rtol=1e-10, atol=1e-10)
    gated = post * shift_loop(ssm, u * pre)
    torch.testing.assert_close(ssm(u, pregate=pre, postgate=post), gated, rtol=1e-10, atol=1e-10)


def ssm_loop(ssm: DiagonalSSM | ShiftSSM, u: torch.Tensor) -> torch.Tensor:
    return shift_loop(ssm, u) if isinstance(ssm, ShiftSSM) else diagonal_loop(ssm, u)


def h3_loop(mixer: layers.H3, x: torch.Tensor) -> torch.Tensor:
    """H3 from the module docstring's equations, every ablation knob, with Python loops over
    heads, i, j and time: k' = ssm1(k), kv[h, i, j] = k'[h, i] v[h, j] (or k'[h, i] + v[h, j]),
    out[h, j] = sum_i q[h, i] ssm2(kv)[h, i, j] (q = 1 without the q gate)."""
    hd = mixer.head_dim
    k, v = (F.linear(x, p.weight, p.bias).transpose(1, 2) for p in (mixer.k_proj, mixer.v_proj))
    q = torch.ones_like(k)
    if mixer.q_gate:
        q = F.linear(x, mixer.q_proj.weight, mixer.q_proj.bias).transpose(1, 2)
    if mixer.k_ssm is not None:
        k = ssm_loop(mixer.k_ssm, k)
    heads = D_MODEL // hd
    kv = torch.zeros(x.shape[0], heads * hd * hd, x.shape[1], dtype=x.dtype)
    for h in range(heads):
        for i in range(hd):
            for j in range(hd):
                ki, vj = k[:, h * hd + i], v[:, h * hd + j]
                kv[:, (h * hd + i) * hd + j] = ki * vj if mixer.kv_gate else ki + vj
    y = ssm_loop(mixer.kv_ssm, kv)  # channel (h hd + i) hd + j uses head h's parameters
    out = torch.zeros(x.shape[0], D_MODEL, x.shape[1], dtype=x.dtype)
    for h in range(heads):
        for i in range(hd):
            for j in range(hd):
                out[:, h * hd + j] += q[:, h * hd + i] * y[:, (h * hd + i) * hd + j]
    return F.linear(out.transpose(1, 2), mixer.output_linear.weight, mixer.output_linear.bias)


def linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


def s4d_loop(mixer: layers.S4D, x: torch.Tensor) -> torch.Tensor:
    """The S4D block: y = SSM(x) + D x per channel, then GLU(Linear(GELU(y)))."""
    y = diagonal_loop(mixer.ssm, x.transpose(1, 2)).transpose(1, 2)
    a, b = linear(mixer.output_linear, F.gelu(y)).chunk(2, dim=-1)
    return a * torch.sigmoid(b)


def gss_loop(mixer: layers.GSS, x: torch.Tensor) -> torch.Tensor:
    """GSS (Mehta et al.): u = GELU(x W1), v = GELU(x W2), out = (u * (SSM(v) W3)) W4."""
    u, v = F.gelu(linear(mixer.gate_proj, x)), F.gelu(linear(mixer.ssm_proj, x))
    y = diagonal_loop(mixer.ssm, v.transpose(1, 2)).transpose(1, 2)
    return linear(mixer.output_linear, u * linear(mixer.ssm_out_proj, y))


def attention_loop(mixer: layers.Attention, x: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention written out per head and query position (no rotary)."""
    d, heads = D_MODEL, mixer.num_heads
    q, k, v = linear(mixer.qkv, x).split(d, dim=-1)
    out = torch.zeros_like(x)
    for h in range(heads):
        cols = slice(h * d // heads, (h + 1) * d // heads)
        for t in range(x.shape[1]):
            scores = (q[:, t, None, cols] * k[:, : t + 1, cols]).sum(-1) / math.sqrt(d // heads)
            out[:, t, cols] = (scores.softmax(-1)[..., None] * v[:, : t + 1, cols]).sum(1)
    return linear(mixer.out_proj, out)


ORACLES = {"h3": h3_loop, "s4d": s4d_loop, "gss": gss_loop, "attention": attention_loop}
ORACLE_CONFIGS = (
    [("h3", variant) for variant in [{}, *H3_VARIANTS]]
    + [("s4d", {}), ("s4d", {"discretization": "bilinear", "init": "inv"})]
    + [("gss", {}), ("gss", {"expansion": 2, "ssm_reduction": 2})]
    + [("attention", {}), ("attention", {"num_heads": 4})]
)


@pytest.mark.parametrize("batch", [BATCH, TOEPLITZ_BATCH])
@pytest.mark.parametrize("config", ORACLE_CONFIGS, ids=config_id)
def test_mixer_matches_loop_oracle(config, batch):
    mixer = make(*config)
    x = inputs(batch=batch)
    with torch.no_grad():
        want = ORACLES[config[0]](mixer, x)
        torch.testing.assert_close(mixer(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "params",
    [
        {"head_dim": 2},
        {"head_dim": 4, "second_ssm": "shift"},
        {"head_dim": 2, "q_gate": False},
        {"head_dim": 2, "second_ssm": "shift", "learn_shift_b": True},
        {"head_dim": 2, "first_ssm": "none", "discretization": "zoh"},
    ],
    ids=str,
)
def test_h3_regrouped_matches_convolution(params, monkeypatch):
    """Multi-head H3's regrouped form (linear attention with a Toeplitz mask, taken up to
    REGROUPED_MAX_LEN) against its convolution form: the output and the gradients of the input
    and of every parameter, float64."""
    mixer = make("h3", params)
    x = inputs().requires_grad_()
    gy = torch.randn_like(x)
    calls = []
    regrouped = layers.H3._heads_regrouped
    monkeypatch.setattr(layers.H3, "_heads_regrouped", lambda *a: calls.append(1) or regrouped(*a))

    def run():
        y = mixer(x)
        return (y, *torch.autograd.grad(y, [x, *mixer.parameters()], gy))

    got = run()
    assert calls == [1]  # SEQ_LEN <= REGROUPED_MAX_LEN
    monkeypatch.setattr(h3_module, "REGROUPED_MAX_LEN", SEQ_LEN - 1)
    want = run()
    assert calls == [1]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_diagonal_ssm_init():
    N, H = D_STATE, 4
    n = torch.arange(N // 2, dtype=torch.float32)
    lin, inv = DiagonalSSM(H, N, init="lin"), DiagonalSSM(H, N, init="inv")
    torch.testing.assert_close(lin.A_imag, (math.pi * n).expand(H, -1))
    # S4D-Inv with N the real state size: positive, decreasing imaginary parts.
    torch.testing.assert_close(inv.A_imag, (N / math.pi * (N / (2 * n + 1) - 1)).expand(H, -1))
    torch.testing.assert_close(lin.log_A_real.exp(), torch.full((H, N // 2), 0.5))
    torch.testing.assert_close(torch.view_as_complex(lin.B), torch.ones(H, N // 2) + 0j)
    dt = DiagonalSSM(64, N, dt_min=1e-3, dt_max=1e-1).log_dt.exp()
    assert dt.min() >= 1e-3 * (1 - 1e-6) and dt.max() <= 1e-1 * (1 + 1e-6)


# ---------------------------------------------------------------------------------------------
# SSM flags and the registry

SSM_NAMES = {"log_dt", "log_A_real", "A_imag", "B"}


@pytest.mark.parametrize(
    "name, params, flagged",
    [
        ("attention", {}, set()),
        ("s4d", {}, {f"ssm.{p}" for p in SSM_NAMES}),
        ("gss", {}, {f"ssm.{p}" for p in SSM_NAMES}),
        ("h3", {}, {f"kv_ssm.{p}" for p in SSM_NAMES}),
        ("h3", {"first_ssm": "diag"}, {f"{m}.{p}" for m in ("k_ssm", "kv_ssm") for p in SSM_NAMES}),
        ("h3", {"second_ssm": "shift"}, set()),
        ("h3", {"learn_shift_b": True}, {"k_ssm.B"} | {f"kv_ssm.{p}" for p in SSM_NAMES}),
    ],
)
def test_ssm_parameters_are_flagged(name, params, flagged):
    mixer = make(name, params)  # converted to float64: the flags survive .to()
    for module in (mixer, copy.deepcopy(mixer)):  # and a deep copy's new Parameters
        expected = [p for n, p in module.named_parameters() if n in flagged]
        assert [id(p) for p in layers.ssm_parameters(module)] == [id(p) for p in expected]


def test_mark_ssm():
    linear = torch.nn.Linear(2, 2)
    layers.mark_ssm(linear, "weight")
    assert layers.ssm_parameters(linear) == [linear.weight]
    wrapper = torch.nn.Sequential(linear, linear)  # a shared module is listed once
    assert layers.ssm_parameters(wrapper) == [linear.weight]
    with pytest.raises(ValueError, match="Linear has no parameter 'scale'"):
        layers.mark_ssm(linear, "scale")


def test_names():
    assert {"attention", "gss", "h3", "s4d"} <= set(layers.names())
    assert layers.names() == sorted(layers.names())


@pytest.mark.parametrize("name", layers.names())
def test_init_state_checks_its_batch_size(name):
    """A torch RuntimeError (-1) or TypeError (2.5) from inside the mixer, now a ValueError
    naming the parameter; 0 sequences is a valid, empty state."""
    mixer = layers.build(name, d_model=8)
    for bad, why in (
        (-1, "must be >= 0"),
        (2.5, "must be an integer"),
        (True, "must be an integer"),
    ):
        with pytest.raises(ValueError, match=f"^{name}: batch_size {why}"):
            mixer.init_state(bad)
    y, state = mixer.step(torch.zeros(0, 8), mixer.init_state(0))
    assert y.shape == (0, 8)


def test_build_rejects_unknown_mixer():
    with pytest.raises(ValueError, match="'mamba9'.*registered"):
        layers.build("mamba9", d_model=16)


@pytest.mark.parametrize(
    "name, params, param",
    [
        ("h3", {"dstate": 64}, "unknown parameter 'dstate'; expected one of"),
        ("attention", {"d_state": 8}, "unknown parameter 'd_state'"),
        ("h3", {"d_model": 8, "name": "h3"}, "unknown parameter 'name'"),  # not build()'s own
        ("h3", {"d_model": 0}, "d_model"),
        ("s4d", {"d_model": 16.0}, "d_model"),
        # Errors name the mixer, not its DiagonalSSM submodule.
        ("h3", {"d_state": 7}, "^h3: d_state must be even"),
        ("s4d", {"d_state": 7}, "^s4d: d_state must be even"),
        ("gss", {"d_state": 7}, "^gss: d_state must be even"),
        ("s4d", {"init": "legs"}, "^s4d: init"),
        ("h3", {"d_state": True}, "d_state"),
        ("h3", {"d_state": 2**31}, "d_state must be <= 2147483647"),
        ("h3", {"head_dim": 3}, "head_dim"),
        ("h3", {"first_ssm": "conv"}, "first_ssm"),
        ("h3", {"second_ssm": "none"}, "second_ssm"),
        ("h3", {"kv_gate": "yes"}, "kv_gate"),
        ("h3", {"q_gate": 1}, "q_gate"),
        ("h3", {"init": "legs"}, "init"),
        ("h3", {"second_ssm": "shift", "discretization": "euler"}, "discretization"),
        ("h3", {"second_ssm": "shift", "discretization": "zoh"}, "discretization='zoh' is for"),
        ("h3", {"first_ssm": "none", "second_ssm": "shift", "dt_max": 0.2}, "dt_max=0.2"),
        ("h3", {"first_ssm": "diag", "learn_shift_b": True}, "learn_shift_b=True needs"),
        ("s4d", {"dt_min": 0.5, "dt_max": 0.1}, "dt_min"),
        ("gss", {"ssm_reduction": 3}, "ssm_reduction"),
        ("gss", {"expansion": 0}, "expansion"),
        ("attention", {"num_heads": 3}, "num_heads"),
        ("attention", {"dropout": 1.0}, "dropout"),
    ],
)
def test_build_rejects_bad_parameters(name, params, param):
    with pytest.raises(ValueError, match=param):
        layers.build(name, **{"d_model": 16, **params})


def test_build_names_a_missing_parameter():
    """Was a TypeError from the constructor's signature."""
    with pytest.raises(ValueError, match="^h3: missing parameter 'd_model'$"):
        layers.build("h3")


@pytest.mark.parametrize("d_model, heads", [(64, 1), (128, 2), (200, 2), (224, 2), (480, 6)])
def test_attention_default_heads_divide_d_model(d_model, heads):
    """The default was d_model // 64 heads even where that does not divide d_model (200: 3),
    an error naming num_heads, which was never set."""
    mixer = layers.build("attention", d_model=d_model)
    assert mixer.num_heads == heads and d_model // heads >= 64
    assert mixer(torch.randn(1, 3, d_model)).shape == (1, 3, d_model)


# --- documented defaults and initialisation (a mutation review found them unpinned)


@pytest.mark.parametrize(
    "name, params", [("attention", {"num_heads": 2}), ("hyena", {"max_len": 16})]
)
def test_dropout_is_applied_in_training_only(name, params):
    """dropout 0.5: in eval mode the output equals the same weights without dropout (and is
    deterministic); in training mode it is random and differs from it."""
    torch.manual_seed(0)
    mixer = layers.build(name, d_model=16, dropout=0.5, **params).double()
    plain = layers.build(name, d_model=16, dropout=0.0, **params).double()
    plain.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    mixer.eval(), plain.eval()
    with torch.no_grad():
        want = plain(x)
        torch.testing.assert_close(mixer(x), want, rtol=0, atol=0)
        mixer.train()
        a, b = mixer(x), mixer(x)
    assert not torch.allclose(a, want) and not torch.allclose(a, b)


def test_documented_defaults():
    """REFERENCE.md and the docstrings: GSS F = 4E, H = E/4; H3 d_state 64 with a bilinear
    diagonal SSM, dt in [1e-3, 1e-1]; S4D zoh; DiagonalSSM S4D-Lin; Hyena's decay windows
    reach 1e-2 at 0.3 max_len (fastest channel) and 1.5 max_len (slowest)."""
    gss = layers.build("gss", d_model=16)
    assert gss.gate_proj.out_features == 64 and gss.ssm.D.shape == (4,)
    h3 = layers.build("h3", d_model=8)
    assert h3.k_ssm.C.shape == (8, 64) and h3.kv_ssm.C.shape == (8, 32, 2)
    assert h3.kv_ssm.discretization == "bilinear"
    assert layers.build("s4d", d_model=8).ssm.discretization == "zoh"
    torch.testing.assert_close(DiagonalSSM(2, 8).A_imag[0], math.pi * torch.arange(4.0))
    torch.manual_seed(0)
    dt = layers.build("h3", d_model=256).kv_ssm.log_dt.detach().exp()
    assert 1e-3 * (1 - 1e-6) <= dt.min() < 2e-3 and 5e-2 < dt.max() <= 1e-1 * (1 + 1e-6)
    window = layers.build("hyena", d_model=2).decay_window(2048 * 3).double()
    reach = window[:, [round(0.3 * 2048), round(1.5 * 2048)]].diagonal()
    torch.testing.assert_close(
        reach, torch.full((2,), 1e-2, dtype=torch.float64), rtol=1e-2, atol=0
    )
    sines = [m for m in layers.build("hyena", d_model=4).modules() if hasattr(m, "freq")]
    assert len(sines) == 2 and all(torch.equal(m.freq, torch.ones_like(m.freq)) for m in sines)
    # Rotary attention's default base is RoPE's 10000: the same weights with it given agree.
    torch.manual_seed(0)
    rope = layers.build("attention", d_model=8, num_heads=2, rotary=True).double()
    explicit = layers.build("attention", d_model=8, num_heads=2, rotary=True, rotary_base=1e4)
    explicit = explicit.double()
    explicit.load_state_dict(rope.state_dict())
    x = torch.randn(1, 40, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rope(x), explicit(x), rtol=0, atol=0)


def test_diagonal_ssm_init_distributions():
    """log dt ~ U[log dt_min, log dt_max] (log-uniform, not uniform in dt); C complex normal
    with E|C|^2 = 1; D standard normal. 4096 channels: sampling error ~1-2%."""
    torch.manual_seed(0)
    ssm = DiagonalSSM(4096, 4, dt_min=1e-3, dt_max=1e-1)
    log_dt = ssm.log_dt.detach()
    lo, hi = math.log(1e-3), math.log(1e-1)
    assert abs(log_dt.mean().item() - (lo + hi) / 2) < 0.05 * (hi - lo)
    assert abs(log_dt.std().item() - (hi - lo) / math.sqrt(12)) < 0.05 * (hi - lo)
    assert abs(ssm.C.detach().square().sum(-1).mean().item() - 1) < 0.05  # E|C|^2
    d = ssm.D.detach()
    assert abs(d.mean().item()) < 0.05 and abs(d.std().item() - 1) < 0.05


@pytest.mark.parametrize("d_state", [4, 64])
def test_shift_ssm_init(d_state):
    """Taps C ~ normal / sqrt(N); with learn_b the learned B starts at e1, so the layer starts
    as the paper's shift SSM: the same filter as learn_b=False with the same C."""
    torch.manual_seed(0)
    assert abs(ShiftSSM(4096, d_state).C.detach().var().item() * d_state - 1) < 0.05
    learned = ShiftSSM(3, d_state, learn_b=True).double()
    fixed = ShiftSSM(3, d_state).double()
    fixed.load_state_dict({k: v for k, v in learned.state_dict().items() if k != "B"})
    e1 = torch.zeros(3, d_state, dtype=torch.float64)
    e1[:, 0] = 1
    torch.testing.assert_close(learned.B.detach(), e1, rtol=0, atol=0)
    u = torch.randn(2, 3, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(learned(u), fixed(u), rtol=1e-12, atol=1e-12)
