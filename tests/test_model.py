"""The language model: shapes, causality, and recurrent stepping equal to the forward pass."""

import pytest
import torch

from sandbox.config import ModelConfig
from sandbox.model import LanguageModel

CASES = [
    {"mixer": "h3", "mixer_params": {"d_state": 8}},
    {"mixer": "attention"},
    {"mixer": "s4d", "mixer_params": {"d_state": 8}},
    {"mixer": "gss", "mixer_params": {"d_state": 8}},
    {"mixer": "hyena", "mixer_params": {"max_len": 16}},
    {"mixer": "h3", "mixer_params": {"d_state": 8}, "attn_layers": [1]},  # hybrid
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["mixer"] + str(c.get("attn_layers", "")))
def test_step_equals_forward(case):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(d_model=16, **case), vocab_size=11, max_seq_len=9).double()
    model.eval()
    ids = torch.randint(0, 11, (3, 9))
    logits = model(ids)
    assert logits.shape == (3, 9, 11)
    state = model.init_state(3)
    for t in range(9):
        step_logits, state = model.step(ids[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-9, atol=1e-9)
    # Causality: changing the last token leaves every earlier logit unchanged.
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 11
    # (FFT rounding moves every output by ~1e-16, so "unchanged" is up to 1e-12.)
    changed = model(ids2)
    torch.testing.assert_close(changed[:, :-1], logits[:, :-1], rtol=0, atol=1e-12)
    assert (changed[:, -1] - logits[:, -1]).abs().max() > 1e-6


@pytest.mark.parametrize(
    "case, limit, what",
    [
        ({"mixer": "attention"}, 9, "the model's max_seq_len 9"),
        ({"mixer": "hyena", "mixer_params": {"max_len": 12}}, 12, "a mixer's max_len 12"),
    ],
)
def test_step_past_the_length_limit_is_a_value_error(case, limit, what):
    """As forward's: stepping learned positions past max_seq_len was an IndexError inside the
    embedding (a device-side assert on a GPU)."""
    model = LanguageModel(ModelConfig(d_model=16, **case), vocab_size=11, max_seq_len=9).eval()
    ids = torch.randint(0, 11, (2, limit))
    with torch.no_grad():
        _, state = model.prefill(ids)
        with pytest.raises(ValueError, match=f"step at position {limit}: past {what}"):
            model.step(ids[:, 0], state)


def test_positions_only_with_attention():
    assert LanguageModel(ModelConfig(mixer="h3"), 10, 20).pos_embedding is None
    assert LanguageModel(ModelConfig(mixer="attention"), 10, 20).pos_embedding is not None
    hybrid = ModelConfig(mixer="h3", attn_layers=[0])
    assert LanguageModel(hybrid, 10, 20).pos_embedding is not None


def test_tied_head_and_bad_attn_layers():
    model = LanguageModel(ModelConfig(mixer="attention", d_model=16), 10, 20)
    assert model.head.weight is model.embedding.weight
    with pytest.raises(ValueError, match="attn_layers"):
        LanguageModel(ModelConfig(mixer="h3", attn_layers=[5]), 10, 20)
    short = ModelConfig(mixer="hyena", mixer_params={"max_len": 16})
    with pytest.raises(ValueError, match=r"mixer_params: max_len=16 is shorter .* 20 positions"):
        LanguageModel(short, 10, 20)
    with pytest.raises(ValueError, match=r"^model.mixer: unknown mixer 'h4'"):
        LanguageModel(ModelConfig(mixer="h4"), 10, 20)
    with pytest.raises(ValueError, match=r"^model.mixer_params.d_model: set by model.d_model"):
        LanguageModel(ModelConfig(mixer="h3", mixer_params={"d_model": 32}), 10, 20)
    hybrid = ModelConfig(mixer="h3", attn_layers=[1], attn_params={"d_model": 32})
    with pytest.raises(ValueError, match=r"^model.attn_params.d_model: set by model.d_model"):
        LanguageModel(hybrid, 10, 20)
