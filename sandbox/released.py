"""The H3 release's checkpoints (its SSMLMHeadModel state dicts) in and out of our LanguageModel.

    load_released(model, torch.load("model.pt", weights_only=True))   # into a built model
    state = to_released(model)                                        # the inverse

The model must be built to match: d_model, n_layers, attn_layers, vocabulary (GPT-2's padded
to 50264), mixer "h3" with learn_shift_b=True (released H3: shift SSM with a learned B, then
a bilinear diagonal SSM, both gates, d_state 64), attention layers' num_heads, mlp_ratio 4,
pos_emb false - as configs/pretrain/h3-*.yaml build them (h3-125m: the released 126,387,456
parameters). A key that is missing, unexpected or of the wrong shape raises
:class:`ReleasedCheckpointError` naming it.

Key map, layer i (theirs <- ours):
    backbone.embeddings.word_embeddings.weight   embedding.weight (lm_head.weight: tied copy)
    backbone.layers.i.norm1 / norm2 / mlp.fc1 / mlp.fc2  the same names under blocks.i
    backbone.ln_f                                 norm_f
    H3 layers, under .mixer:
        q_proj, k_proj, v_proj, output_linear     the same names
        ssm_k_kernel.kernel.B [D, 64]             k_ssm.B
        ssm_k_kernel.kernel.C [1, D, 64]          k_ssm.C [D, 64]
        ssm_k_D [D]                               k_ssm.D
        kernel.kernel.log_dt [H]                  kv_ssm.log_dt
        kernel.kernel.inv_A_real [H, 32]          kv_ssm.log_A_real
        kernel.kernel.A_imag [H, 32]              kv_ssm.A_imag
        kernel.kernel.B [H, 32, 2]                kv_ssm.B
        kernel.kernel.C [1, H, 32, 2]             kv_ssm.C [H, 32, 2]
        D [H]                                     kv_ssm.D
    attention layers: mixer.Wqkv, mixer.out_proj  mixer.qkv, mixer.out_proj
Checkpoints of the release's older code (s4seq.encoder. / embedding. / backbone.norm names,
and backbone.ln_0 with every layer norm one slot later) are renamed as the release's own
SSMLMHeadModel.load_state_dict renames them.

Conventions, checked against the release's src/models/ssm/ (h3.py, ss_kernel.py,
ss_kernel_diag.py, ss_kernel_shift.py, and src/ops/vandermonde.py); loaded weights compute
the same function:
- Shift SSM: kernel irfft(conj(rfft(B)) rfft(C)) at n = 2N, i.e. K[l] = sum_j C[j + l] B[j]
  (kernels.shift_kernel); step x <- shift right(x) + B u, y = C . x; plus ssm_k_D k.
- Diagonal SSM: dt = exp(log_dt); A = -exp(inv_A_real) + i A_imag (real_type "exp");
  bilinear dA = (1 + dt A/2) / (1 - dt A/2), dB = dt B / (1 - dt A/2); kernel and step output
  2 Re(sum_n C_n dB_n dA_n^l), with C [1, H, N/2] (one output channel) and B [H, N/2] stored
  as real views [..., 2] of complex tensors, exactly like ours; plus D kv.
- H3: q, k, v biased Linears; k' = shift(k) + D_k k; y = q * (diag(k' v) + D k' v);
  output_linear. Blocks: pre-norm LayerNorm, tanh-GELU MLP, tied head - ours.
- Attention: flash-attn MHA's Wqkv rows are (three, heads, head size), as our qkv; scale
  1/sqrt(head size), no rotary embedding.
Remaining differences:
- head_dim > 1 (no released model uses it): the release orders the outputs of a head as
  channel j * H + h where we use h * hd + j; output_linear's columns are permuted on the way
  in and out, so the function is the same.
- The release can truncate the diagonal kernel at l_max when its config sets one; ours is
  never truncated (neither step is).
- LayerNorm eps, dropout and num_heads are not in a state dict: the model config must match.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange

from layers import H3, Attention, DiagonalSSM, ShiftSSM
from sandbox.model import LanguageModel

TIED_HEAD = "lm_head.weight"


class ReleasedCheckpointError(ValueError):
    """A released state dict that does not fit the model; one line naming the key."""


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _add_channel_axis(t: torch.Tensor) -> torch.Tensor:
    return t[None]


def _drop_channel_axis(t: torch.Tensor) -> torch.Tensor:
    return t[0]


@dataclass(frozen=True)
class _Key:
    ours: str
    theirs: str
    to_theirs: Callable[[torch.Tensor], torch.Tensor] = _same
    to_ours: Callable[[torch.Tensor], torch.Tensor] = _same


def _linear(ours: str, theirs: str) -> list[_Key]:
    """weight and bias of a Linear or LayerNorm."""
    return [_Key(f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]


def _h3_keys(ours: str, theirs: str, mixer: H3) -> list[_Key]:
    hd = mixer.head_dim
    keys = [
        k for name in ("q_proj", "k_proj", "v_proj") for k in _linear(ours + name, theirs + name)
    ]
    keys += [
        _Key(
            f"{ours}output_linear.weight",
            f"{theirs}output_linear.weight",
            lambda w: rearrange(w, "o (h j) -> o (j h)", j=hd),
            lambda w: rearrange(w, "o (j h) -> o (h j)", j=hd),
        ),
        _Key(f"{ours}output_linear.bias", f"{theirs}output_linear.bias"),
        _Key(f"{ours}k_ssm.B", f"{theirs}ssm_k_kernel.kernel.B"),
        _Key(
            f"{ours}k_ssm.C",
            f"{theirs}ssm_k_kernel.kernel.C",
            _add_channel_axis,
            _drop_channel_axis,
        ),
        _Key(f"{ours}k_ssm.D", f"{theirs}ssm_k_D"),
        _Key(f"{ours}kv_ssm.log_dt", f"{theirs}kernel.kernel.log_dt"),
        _Key(f"{ours}kv_ssm.log_A_real", f"{theirs}kernel.kernel.inv_A_real"),
        _Key(f"{ours}kv_ssm.A_imag", f"{theirs}kernel.kernel.A_imag"),
        _Key(f"{ours}kv_ssm.B", f"{theirs}kernel.kernel.B"),
        _Key(f"{ours}kv_ssm.C", f"{theirs}kernel.kernel.C", _add_channel_axis, _drop_channel_axis),
        _Key(f"{ours}kv_ssm.D", f"{theirs}D"),
    ]
    return keys


def _is_released_h3(mixer) -> bool:
    return (
        isinstance(mixer, H3)
        and isinstance(mixer.k_ssm, ShiftSSM)
        and mixer.k_ssm.B is not None
        and isinstance(mixer.kv_ssm, DiagonalSSM)
        and mixer.kv_ssm.discretization == "bilinear"
        and mixer.kv_gate
        and mixer.q_gate
    )


def _keys(model: LanguageModel) -> list[_Key]:
    """Every parameter of ``model`` with its released name and the conversions both ways."""
    keys = [_Key("embedding.weight", "backbone.embeddings.word_embeddings.weight")]
    if model.pos_embedding is not None:
        keys.append(_Key("pos_embedding.weight", "backbone.embeddings.position_embeddings.weight"))
    for i, block in enumerate(model.blocks):
        ours, theirs = f"blocks.{i}.", f"backbone.layers.{i}."
        if block.mlp is None:
            raise ReleasedCheckpointError(f"released layout: layer {i} has no MLP (mlp_ratio 0)")
        for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += _linear(ours + name, theirs + name)
        mixer = block.mixer
        if isinstance(mixer, Attention):
            keys += _linear(f"{ours}mixer.qkv", f"{theirs}mixer.Wqkv")
            keys += _linear(f"{ours}mixer.out_proj", f"{theirs}mixer.out_proj")
        elif _is_released_h3(mixer):
            keys += _h3_keys(f"{ours}mixer.", f"{theirs}mixer.", mixer)
        else:
            raise ReleasedCheckpointError(
                f"released layout: layer {i}'s mixer {mixer.name!r} has no released counterpart "
                "(h3 with learn_shift_b=True, bilinear, both gates; or attention)"
            )
    return keys + _linear("norm_f", "backbone.ln_f")


_LEGACY_PREFIXES = [
    (r"^s4seq\.encoder\.", "backbone."),
    (r"^embedding\.", "backbone.embeddings.word_embeddings."),
    # The old stem's norm: the release renames it ln_0, which starts the slot shift below.
    (r"^backbone\.norm\.", "backbone.ln_0."),
]


def _rename_legacy(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Names of the release's older checkpoints -> current ones (see the module docstring)."""
    for pattern, replacement in _LEGACY_PREFIXES:
        state = {re.sub(pattern, replacement, k): v for k, v in state.items()}
    if "backbone.ln_0.weight" not in state:
        return state
    # Older blocks applied their norms after the residual add, so each norm moves one slot
    # later: ln_0 -> layer 0 norm1, layer i norm1 -> layer i norm2, layer i norm2 -> layer
    # i + 1 norm1, the last norm2 -> ln_f.
    moved = {"backbone.ln_0.": "backbone.layers.0.norm1."}
    for i in range(n_layers):
        moved[f"backbone.layers.{i}.norm1."] = f"backbone.layers.{i}.norm2."
        after = f"backbone.layers.{i + 1}.norm1." if i + 1 < n_layers else "backbone.ln_f."
        moved[f"backbone.layers.{i}.norm2."] = after
    renamed = {}
    for key, value in state.items():
        prefix, _, param = key.rpartition(".")
        renamed[moved.get(prefix + ".", prefix + ".") + param] = value
    return renamed


def load_released(model: LanguageModel, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a released-layout state dict into ``model``'s parameters (cast to their dtype)."""
    keys = _keys(model)
    state = _rename_legacy(dict(state_dict), len(model.blocks))
    params = dict(model.named_parameters())
    unexpected = sorted(set(state) - {k.theirs for k in keys} - {TIED_HEAD})
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ReleasedCheckpointError(
            f"released checkpoint: unexpected key {unexpected[0]!r}{more}"
        )
    values = {}
    for key in keys:
        if key.theirs not in state:
            raise ReleasedCheckpointError(f"released checkpoint: missing key {key.theirs!r}")
        value, want = state[key.theirs], key.to_theirs(params[key.ours].detach()).shape
        if value.shape != want:
            raise ReleasedCheckpointError(
                f"released checkpoint: {key.theirs!r} has shape {list(value.shape)}, "
                f"the model needs {list(want)}"
            )
        values[key.ours] = key.to_ours(value)
    embedding = state["backbone.embeddings.word_embeddings.weight"]
    if TIED_HEAD in state and not torch.equal(state[TIED_HEAD], embedding):
        raise ReleasedCheckpointError(
            f"released checkpoint: {TIED_HEAD!r} differs from the word embeddings (head is tied)"
        )
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


def to_released(model: LanguageModel) -> dict[str, torch.Tensor]:
    """``model``'s weights in the release's layout and names (the tied head included, as the
    release's own state dicts list it)."""
    params = dict(model.named_parameters())
    state = {k.theirs: k.to_theirs(params[k.ours].detach()).contiguous() for k in _keys(model)}
    state[TIED_HEAD] = state["backbone.embeddings.word_embeddings.weight"]
    return state
