"""Generation: LanguageModel.prefill, sandbox.generate (greedy and sampling against brute-force
oracles), the released-H3 state-dict layout (sandbox.released) and `sandbox generate`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from einops import rearrange

from sandbox.cli import main
from sandbox.config import ModelConfig
from sandbox.generate import filter_logits, generate, sample
from sandbox.model import LanguageModel
from sandbox.released import ReleasedCheckpointError, load_released, to_released

VOCAB, D_MODEL, MAX_LEN = 11, 16, 24
H3_PARAMS = {"d_state": 8, "learn_shift_b": True}
HYBRID = {"mixer": "h3", "mixer_params": H3_PARAMS, "n_layers": 3, "attn_layers": [1]}
ATTENTION = {"mixer": "attention", "mixer_params": {"num_heads": 2}}
CASES = [
    HYBRID,
    ATTENTION,
    {"mixer": "s4d", "mixer_params": {"d_state": 8}},
    {"mixer": "gss", "mixer_params": {"d_state": 8}},
    {"mixer": "hyena", "mixer_params": {"max_len": MAX_LEN}},
]


def make_model(seed: int = 0, **config) -> LanguageModel:
    """A float64 model with every weight perturbed, so that no init symmetry hides an error."""
    torch.manual_seed(seed)
    model = LanguageModel(ModelConfig(d_model=D_MODEL, **config), VOCAB, MAX_LEN).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def prompts(batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# prefill


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["mixer"] + str(c.get("attn_layers", "")))
def test_prefill_then_step_equals_forward(case):
    model = make_model(**case)
    ids = prompts(length=9)
    logits = model(ids)
    prefix_logits, state = model.prefill(ids[:, :4])
    torch.testing.assert_close(prefix_logits, logits[:, :4], rtol=1e-9, atol=1e-9)
    assert state["pos"] == 4
    last, _ = model.prefill(ids[:, :4], last_only=True)
    torch.testing.assert_close(last, logits[:, 3:4], rtol=1e-9, atol=1e-9)
    for t in range(4, 9):
        step_logits, state = model.step(ids[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("case", [HYBRID, ATTENTION], ids=["hybrid", "attention"])
def test_greedy_equals_rerunning_the_forward(case):
    model = make_model(**case)
    result = generate(model, prompts(), max_new_tokens=8, temperature=0)
    expected = prompts()
    for _ in range(8):  # the oracle: the whole sequence through forward, argmax of the last row
        expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(result.tokens, expected)
    assert result.new_tokens == 8 and result.prompt_len == 5
    assert result.prefill_s > 0 and result.decode_s > 0 and math.isfinite(result.tokens_per_s)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = make_model(**HYBRID)

    def run(seed, **kwargs):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompts(), 10, generator=g, **kwargs).tokens

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    assert torch.equal(run(0, top_k=1), generate(model, prompts(), 10, temperature=0).tokens)


def brute_force_kept(logits: torch.Tensor, top_k, top_p) -> set[int]:
    """Token ids that top-k then top-p keep, for one row, by sorting and counting."""
    ranked = sorted(range(len(logits)), key=lambda i: -logits[i].item())
    kept = ranked[: top_k or len(ranked)]
    kept = [t for t in ranked if logits[t] >= logits[kept[-1]]]  # ties with the k-th stay
    if top_p is not None:
        probs = torch.softmax(logits[kept], dim=0).tolist()
        mass, nucleus = 0.0, []
        for token, p in zip(kept, probs):
            nucleus.append(token)
            mass += p
            if mass >= top_p:
                break
        # Tokens tied with the nucleus's least likely one stay, as top-k keeps its ties.
        kept = [t for t in kept if logits[t] >= logits[nucleus[-1]]]
    return set(kept)


@pytest.mark.parametrize("top_k, top_p", [(3, None), (None, 0.5), (None, 0.9), (5, 0.7), (1, 0.3)])
def test_filters_match_brute_force_and_sampling_respects_them(top_k, top_p):
    logits = 2 * torch.randn(4, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Ties: a row of four equal logits, and a row whose ties straddle the nucleus's edge (top-p
    # kept only the lower ids of equally likely tokens).
    logits[2, :4], logits[2, 4:] = 0.0, -5.0
    logits[3, :6] = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    filtered = filter_logits(logits, top_k, top_p)
    for row, out in zip(logits, filtered):
        kept = brute_force_kept(row, top_k, top_p)
        assert {i for i in range(20) if out[i] > -math.inf} == kept
        torch.testing.assert_close(out[list(kept)], row[list(kept)])
    # Many draws through generate's sampler: never a filtered token.
    model = make_model(**HYBRID)
    g = torch.Generator().manual_seed(0)
    result = generate(model, prompts(batch=64), 4, temperature=1.5, top_k=top_k, top_p=top_p,
                      generator=g)  # fmt: skip
    model_logits = model(result.tokens[:, :-1])[:, 4:] / 1.5
    for b in range(64):
        for t in range(4):
            token = result.tokens[b, 5 + t].item()
            assert token in brute_force_kept(model_logits[b, t], top_k, top_p)


@pytest.mark.parametrize("top_k, top_p", [(None, None), (3, None), (None, 0.9)])
def test_sampling_draws_the_tempered_filtered_softmax(top_k, top_p):
    # Oracle: softmax(logits / T) renormalised over the tokens brute_force_kept keeps;
    # 40000 seeded draws put every frequency within 0.01 of it (4 sd is below 0.01).
    from sandbox.generate import sample

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=torch.float64)
    T, n = 1.5, 40_000
    kept = sorted(brute_force_kept(logits / T, top_k, top_p))
    want = torch.zeros(6, dtype=torch.float64)
    want[kept] = torch.exp(logits[kept] / T) / torch.exp(logits[kept] / T).sum()
    draws = sample(logits.expand(n, 6), T, top_k, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / n
    torch.testing.assert_close(freq, want, rtol=0, atol=0.01)


def test_eos_and_vocab_limit():
    model = make_model(**HYBRID)
    greedy = generate(model, prompts(), 6, temperature=0).tokens
    eos = greedy[0, 5].item()  # row 0's first new token
    result = generate(model, prompts(), 6, temperature=0, eos_id=eos)
    assert (result.tokens[0, 5:] == eos).all()
    first_eos = (greedy[1, 5:] == eos).nonzero()
    n = result.new_tokens
    assert n == (6 if len(first_eos) == 0 else first_eos[0].item() + 1)
    assert torch.equal(result.tokens[1], greedy[1, : 5 + n])
    limited = generate(model, prompts(batch=16), 6, generator=torch.Generator(), vocab_size=3)
    assert (limited.tokens[:, 5:] < 3).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0.0"),
        ({"top_p": -0.5}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": "0.5"}, r"top_p must be a number in \(0, 1\], got '0.5'"),
        ({"top_p": math.nan}, r"top_p must be a number in \(0, 1\], got nan"),  # was [-inf, inf)
        ({"top_p": math.inf}, r"top_p must be a number in \(0, 1\], got inf"),
        ({"prompt_ids": torch.tensor([[1.0, 2.0]])}, "prompt_ids must hold integer token ids"),
        ({"max_new_tokens": MAX_LEN}, "max_seq_len"),  # learned positions run out
        ({"vocab_size": VOCAB + 1}, f"vocab_size must be <= {VOCAB}"),
        ({"vocab_size": 0}, "vocab_size must be >= 1"),
        # Ids outside the embedding were an IndexError from inside the model.
        ({"prompt_ids": torch.tensor([[1, VOCAB]])}, f"prompt token id {VOCAB} is outside"),
        ({"prompt_ids": torch.tensor([[-1, 2]])}, "prompt token id -1 is outside"),
        # An end-of-sequence id no token can be: accepted, and it never fired.
        ({"eos_id": VOCAB}, f"eos_id must be < {VOCAB}"),
        ({"eos_id": -1}, "eos_id must be >= 0"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, message):
    model = make_model(**HYBRID)
    with pytest.raises(ValueError, match=message):
        generate(model, **{"prompt_ids": prompts(), "max_new_tokens": 3, **kwargs})
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, prompts()[:, :0], 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 2.0}, "top_p")],
)
def test_sample_checks_its_arguments(kwargs, message):
    """sample() is public: a negative temperature reversed the distribution there."""
    with pytest.raises(ValueError, match=message):
        sample(torch.zeros(2, 5), **kwargs)


def test_generate_checks_a_mixer_length_limit_first_and_tiny_temperatures():
    # Hyena's max_len ran out only after the prompt pass and a few steps.
    model = make_model(mixer="hyena", mixer_params={"max_len": MAX_LEN})
    with pytest.raises(ValueError, match=f"exceeds a mixer's max_len {MAX_LEN}"):
        generate(model, prompts(length=5), MAX_LEN - 3)
    assert generate(model, prompts(length=5), MAX_LEN - 4).tokens.shape[1] == MAX_LEN + 1
    # A tiny positive temperature is greedy (its raw logits / T overflowed into NaN).
    greedy = generate(model, prompts(), 4, temperature=0).tokens
    tiny = generate(model, prompts(), 4, temperature=1e-300, generator=torch.Generator())
    assert torch.equal(tiny.tokens, greedy)


# ---------------------------------------------------------------------------------------------
# Released H3 layout


def released_dict(head_dim: int = 1, vocab: int = VOCAB, d: int = D_MODEL) -> dict:
    """A state dict written by hand in the release's documented layout: d_state 64 (32 complex
    modes), two layers, attention at layer 1."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return 0.3 * torch.randn(*shape, generator=g, dtype=torch.float64)

    heads = d // head_dim
    state = {"backbone.embeddings.word_embeddings.weight": r(vocab, d)}
    for i in range(2):
        pre = f"backbone.layers.{i}."
        shapes = {"norm1": d, "norm2": d, "mlp.fc1": (4 * d, d), "mlp.fc2": (d, 4 * d)}
        if i == 1:
            shapes |= {"mixer.Wqkv": (3 * d, d), "mixer.out_proj": (d, d)}
        else:
            shapes |= {
                f"mixer.{p}": (d, d) for p in ("q_proj", "k_proj", "v_proj", "output_linear")
            }
            state |= {
                pre + "mixer.ssm_k_kernel.kernel.B": r(d, 64),
                pre + "mixer.ssm_k_kernel.kernel.C": r(1, d, 64),
                pre + "mixer.ssm_k_D": r(d),
                pre + "mixer.kernel.kernel.log_dt": r(heads) - 3,
                pre + "mixer.kernel.kernel.B": r(heads, 32, 2),
                pre + "mixer.kernel.kernel.inv_A_real": r(heads, 32) - 0.7,
                pre + "mixer.kernel.kernel.A_imag": math.pi
                * torch.arange(32.0, dtype=torch.float64).repeat(heads, 1),
                pre + "mixer.kernel.kernel.C": r(1, heads, 32, 2),
                pre + "mixer.D": r(heads),
            }
        for name, shape in shapes.items():
            out = shape if isinstance(shape, int) else shape[0]
            state[f"{pre}{name}.weight"] = r(shape) + (1 if "norm" in name else 0)
            state[f"{pre}{name}.bias"] = r(out)
    state |= {"backbone.ln_f.weight": r(d) + 1, "backbone.ln_f.bias": r(d)}
    return state


def causal_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y[..., h, t] = sum_{s <= t} k[h, t - s] u[..., h, s]; u [..., H, L], k [H, <= L]."""
    L = u.shape[-1]
    k = F.pad(k, (0, L - k.shape[-1]))
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    toeplitz = torch.where(lag >= 0, k[:, lag.clamp(min=0)], 0.0)  # [H, t, s]
    return torch.einsum("hts,...hs->...ht", toeplitz, u)


def released_h3(sd: dict, pre: str, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The release's H3 forward (src/models/ssm/h3.py and its kernels) from its state dict."""

    def linear(name, t):
        return t @ sd[f"{pre}{name}.weight"].T + sd[f"{pre}{name}.bias"]

    q, k, v = (rearrange(linear(n, x), "b l d -> b d l") for n in ("q_proj", "k_proj", "v_proj"))
    L, N = x.shape[1], 64
    B, C = sd[pre + "ssm_k_kernel.kernel.B"], sd[pre + "ssm_k_kernel.kernel.C"][0]
    shift = torch.fft.irfft(torch.fft.rfft(B, n=2 * N).conj() * torch.fft.rfft(C, n=2 * N), n=2 * N)
    k = causal_conv(k, shift[:, : min(N, L)]) + sd[pre + "ssm_k_D"][:, None] * k
    dt = sd[pre + "kernel.kernel.log_dt"].exp()[:, None]
    A = -sd[pre + "kernel.kernel.inv_A_real"].exp() + 1j * sd[pre + "kernel.kernel.A_imag"]
    B = torch.view_as_complex(sd[pre + "kernel.kernel.B"])
    C = torch.view_as_complex(sd[pre + "kernel.kernel.C"][0])
    dA = (1 + dt * A / 2) / (1 - dt * A / 2)
    kernel = 2 * (C * B * dt / (1 - dt * A / 2))[..., None] * dA[..., None] ** torch.arange(L)
    kernel = kernel.real.sum(1)  # [H, L]
    kv = rearrange(k, "b (h i) l -> b i 1 h l", i=head_dim) * rearrange(
        v, "b (h j) l -> b 1 j h l", j=head_dim
    )
    y = causal_conv(kv, kernel) + sd[pre + "D"][:, None] * kv
    y = (y * rearrange(q, "b (h i) l -> b i 1 h l", i=head_dim)).sum(1)
    return linear("output_linear", rearrange(y, "b j h l -> b l (j h)"))


def released_model(sd: dict, ids: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The release's SSMLMHeadModel forward (pre-norm blocks, tied head) from its state dict."""

    def norm(name, t):
        return F.layer_norm(t, t.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    x = sd["backbone.embeddings.word_embeddings.weight"][ids]
    for i in range(2):
        pre = f"backbone.layers.{i}."
        h = norm(pre + "norm1", x)
        if i == 0:
            x = x + released_h3(sd, pre + "mixer.", h, head_dim)
        else:
            qkv = h @ sd[pre + "mixer.Wqkv.weight"].T + sd[pre + "mixer.Wqkv.bias"]
            q, k, v = rearrange(qkv, "b l (three h e) -> three b h l e", three=3, h=2)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out = sd[pre + "mixer.out_proj.weight"]
            x = x + rearrange(att, "b h l e -> b l (h e)") @ out.T + sd[pre + "mixer.out_proj.bias"]
        h = norm(pre + "norm2", x)
        h = F.gelu(h @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"], approximate="tanh")
        x = x + h @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
    return norm("backbone.ln_f", x) @ sd["backbone.embeddings.word_embeddings.weight"].T


def released_config(head_dim: int = 1, **extra) -> ModelConfig:
    params = {"d_state": 64, "learn_shift_b": True, "head_dim": head_dim, **extra}
    return ModelConfig(mixer="h3", mixer_params=params, d_model=D_MODEL, n_layers=2,
                       attn_layers=[1], attn_params={"num_heads": 2}, pos_emb=False)  # fmt: skip


@pytest.mark.parametrize("head_dim", [1, 2])
def test_hand_made_released_dict_computes_the_release_function(head_dim):
    sd = released_dict(head_dim)
    model = LanguageModel(released_config(head_dim), VOCAB, MAX_LEN).double()
    load_released(model, sd)
    ids = prompts(length=12)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids), released_model(sd, ids, head_dim), rtol=1e-9, atol=1e-9
        )
    exported = to_released(model)
    assert torch.equal(exported["lm_head.weight"], sd["backbone.embeddings.word_embeddings.weight"])
    assert exported.keys() == sd.keys() | {"lm_head.weight"}
    for key, value in sd.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0)


def test_released_round_trip_and_legacy_names():
    config = ModelConfig(mixer="h3", mixer_params={**H3_PARAMS, "head_dim": 2}, d_model=D_MODEL,
                         n_layers=3, attn_layers=[1], attn_params={"num_heads": 2})  # fmt: skip
    ours = LanguageModel(config, VOCAB, MAX_LEN).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ids = prompts(length=10)
    state = to_released(ours)
    fresh = LanguageModel(config, VOCAB, MAX_LEN).double()
    load_released(fresh, state)
    torch.testing.assert_close(fresh(ids), ours(ids), rtol=0, atol=0)
    # The release's older names: s4seq.encoder. prefix, embedding., and each norm one slot
    # earlier (the stem's norm first, which the release renames ln_0, and the last layer's
    # norm2 as the final norm).
    legacy = {}
    slot = {"layers.0.norm1.": "norm.", "ln_f.": "layers.2.norm2."}
    for i in range(3):
        slot[f"layers.{i}.norm2."] = f"layers.{i}.norm1."
        if i:
            slot[f"layers.{i}.norm1."] = f"layers.{i - 1}.norm2."
    for key, value in state.items():
        if key == "backbone.embeddings.word_embeddings.weight":
            key = "embedding.weight"
        elif key.startswith("backbone."):
            prefix, _, param = key[len("backbone.") :].rpartition(".")
            key = "s4seq.encoder." + slot.get(prefix + ".", prefix + ".") + param
        legacy[key] = value
    fresh = LanguageModel(config, VOCAB, MAX_LEN).double()
    load_released(fresh, legacy)
    torch.testing.assert_close(fresh(ids), ours(ids), rtol=0, atol=0)


def test_released_bad_keys_raise_naming_the_key():
    model = LanguageModel(released_config(), VOCAB, MAX_LEN)
    sd = released_dict()
    key = "backbone.layers.0.mixer.kernel.kernel.C"
    with pytest.raises(ReleasedCheckpointError, match=f"missing key '{key}'"):
        load_released(model, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ReleasedCheckpointError, match=f"'{key}' has shape \\[16, 32, 2\\]"):
        load_released(model, {**sd, key: sd[key][0]})
    with pytest.raises(ReleasedCheckpointError, match="unexpected key 'backbone.layers.0.mixer.x'"):
        load_released(model, {**sd, "backbone.layers.0.mixer.x": torch.zeros(1)})
    with pytest.raises(ReleasedCheckpointError, match="lm_head.weight"):
        load_released(model, {**sd, "lm_head.weight": torch.zeros(VOCAB, D_MODEL)})
    plain_h3 = LanguageModel(released_config(learn_shift_b=False), VOCAB, MAX_LEN)
    with pytest.raises(ReleasedCheckpointError, match="layer 0's mixer 'h3'"):
        load_released(plain_h3, sd)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_generates_from_a_run_directory_and_a_released_checkpoint(tmp_path, capsys):
    from sandbox.data.tokenizer import ByteTokenizer
    from sandbox.io import save_checkpoint
    from sandbox.pretrain import build_model
    from sandbox.pretrain_config import load_pretrain_config

    config_path = tmp_path / "tiny.yaml"
    config = {
        "data": {"tokenizer": "bytes", "seq_len": 32},
        "model": released_config().model_dump(),
        "train": {"max_steps": 1},
    }
    config_path.write_text(yaml.safe_dump(config))
    config = load_pretrain_config(config_path)
    model = build_model(config)  # vocabulary 257 padded to 264
    tokenizer = ByteTokenizer()
    prompt = torch.tensor([tokenizer.encode("hippo")])
    greedy = generate(model, prompt, 5, temperature=0, eos_id=256, vocab_size=257).tokens
    expected = tokenizer.decode(greedy[0].tolist()) + "\n"
    # A pretrain run directory (what load_pretrained reads), and a released-layout file.
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "model.safetensors", model, info={"config": config.model_dump()})
    released = tmp_path / "model.pt"
    torch.save(to_released(model), released)
    for source in ([str(run_dir)], [str(released), "--config", str(config_path)]):
        args = ["generate", *source, "--prompt", "hippo"]
        assert main([*args, "--max-new-tokens", "5", "--temperature", "0"]) == 0
        out = capsys.readouterr()
        assert out.out == expected and "new tokens" in out.err
        assert main([*args, "--top-k", "3", "--top-p", "0.9", "--seed", "1"]) == 0
        capsys.readouterr()
        for bad in (["--top-p", "2"], ["--temperature", "-1"], ["--prompt", ""]):
            assert main([*args, *bad]) == 2
            assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["generate", str(tmp_path / "nope.pt"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["generate", str(released), "--prompt", "x"]) == 2
    assert "needs --config" in capsys.readouterr().err
    assert main(["generate", str(config_path), "--config", str(config_path), "--prompt", "x"]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_cli_generate_rejects_files_that_are_not_pretrain_checkpoints(tmp_path, capsys):
    from sandbox.cli import main
    from sandbox.config import ModelConfig, RunConfig
    from sandbox.io import save_checkpoint
    from sandbox.model import LanguageModel

    text = tmp_path / "notes.safetensors"
    text.write_text("not a checkpoint")
    synthetic = (
        tmp_path / "synthetic.safetensors"
    )  # a `sandbox train` checkpoint: no pretrain config
    model = LanguageModel(ModelConfig(d_model=8, mixer="attention"), vocab_size=10, max_seq_len=8)
    save_checkpoint(synthetic, model, info={"config": RunConfig().model_dump(mode="json")})
    for path, message in [
        (text, "is not a sandbox checkpoint"),
        (synthetic, "not a `sandbox pretrain`"),
    ]:
        before = path.read_bytes()
        assert main(["generate", str(path), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
        assert path.read_bytes() == before
    # A seed a torch.Generator cannot take: named, not torch's "Overflow when unpacking long".
    for seed in ("-5", str(2**64)):
        with pytest.raises(SystemExit) as e:
            main(["generate", str(text), "--prompt", "hi", "--seed", seed])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2
        assert "argument --seed: expected an integer in [0, 2^64 - 1]" in err and "\n" not in err
