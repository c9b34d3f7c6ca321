"""Causal multi-head softmax attention, the baseline mixer.

By default no positional information inside: the language model adds learned positions for
attention. With ``rotary=True`` queries and keys are rotated by their absolute position (RoPE,
Su et al. 2021), so scores depend on relative positions only; set the model's
``pos_emb: false`` then.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from layers.base import Mixer, State, check_float, factory_kwargs, register


@register("attention")
class Attention(Mixer):
    """Fused qkv projection, scaled_dot_product_attention (causal), output projection.

    Args:
        d_model: width D.
        num_heads: heads (must divide D); default the most heads of at least 64 channels that
            divide D (D // 64 where 64 divides D: head size 64).
        dropout: attention-probability dropout, applied in training mode only.
        rotary: rotary position embedding of q and k (head size must be even).
        rotary_base: the RoPE frequency base; pair i of a head turns by pos * base^(-2i / E).

    State for ``step``: the KV cache {"k", "v"}: [B, heads, T, D / heads] for the T positions
    seen so far (T = 0 after ``init_state``); each step appends one position (see
    :func:`_append`: in place into spare capacity when that is safe, so a decoded token does
    not copy the whole cache).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int | None = None,
        dropout: float = 0.0,
        rotary: bool = False,
        rotary_base: float = 10000.0,
    ):
        super().__init__(d_model)
        if num_heads is None:  # the most heads of >= 64 channels that divide d_model
            num_heads = max(1, self.d_model // 64)
            while self.d_model % num_heads:  # d_model = 200: 3 heads would not divide it
                num_heads -= 1
        self.num_heads = self._int("num_heads", num_heads)
        self._divides("num_heads", self.num_heads, "each head gets d_model / num_heads channels")
        self.dropout = check_float(self.name, "dropout", dropout, 0.0, 1.0)
        self.rotary = self._bool("rotary", rotary)
        self.rotary_base = check_float(self.name, "rotary_base", rotary_base, 1.0, math.inf)
        head_size = self.d_model // self.num_heads
        if self.rotary and head_size % 2:
            raise ValueError(f"{self.name}: rotary needs an even head size, got {head_size}")
        self.qkv = nn.Linear(self.d_model, 3 * self.d_model)
        self.out_proj = nn.Linear(self.d_model, self.d_model)

    def _qkv(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x [B, L, D] at positions start .. start + L - 1 -> q, k, v stacked:
        [3, B, heads, L, head size] (q and k rotated when ``rotary``)."""
        qkv = rearrange(self.qkv(x), "b l (three h e) -> three b h l e", three=3, h=self.num_heads)
        if not self.rotary:
            return qkv
        q, k, v = qkv
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        return torch.stack([*rotate(torch.stack([q, k]), positions, self.rotary_base), v])

    def _attend(self, q, k, v, causal: bool) -> torch.Tensor:
        """Attention over heads, merged back to [B, L, D]."""
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
        return self.out_proj(rearrange(y, "b h l e -> b l (h e)"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attend(*self._qkv(x), causal=True)

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        """``forward`` and the KV cache of x's positions, copied into buffers with room to
        grow (see :func:`_append`). Not views of the qkv projection: those kept q alive too,
        and the first step then copied the cache into a buffer twice its length, so a 1.3B
        Transformer's cache (batch 64, fp32) outgrew an 80 GB GPU at a prompt of 1024."""
        q, k, v = self._qkv(x)
        return self._attend(q, k, v, causal=True), {"k": _with_room(k), "v": _with_room(v)}

    def _zero_state(self, batch_size: int) -> State:
        empty = torch.zeros(
            batch_size, self.num_heads, 0, self.d_model // self.num_heads, **factory_kwargs(self)
        )
        return {"k": empty, "v": empty}

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        q, k, v = self._qkv(x_t[:, None], start=state["k"].shape[2])
        k, v = _append(state["k"], k), _append(state["v"], v)
        # The newest query may see every cached position, so no mask is needed.
        return self._attend(q, k, v, causal=False)[:, 0], {"k": k, "v": v}


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE: x [..., L, E] at ``positions`` [L]; channel pair (i, i + E/2) turns by the angle
    positions * base^(-2i / E). The angles are computed in fp32 (fp64 for fp64 x), then their
    cos and sin rounded to x's dtype: bf16 holds integers only up to 256 (positions 256 and 257
    would turn alike) and an angle of ~1000 radians to within ~4."""
    half = x.shape[-1] // 2
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    freq = base ** (-torch.arange(half, device=x.device, dtype=dtype) * 2 / x.shape[-1])
    angle = positions.to(dtype)[:, None] * freq  # [L, E/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _append(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """cache [B, heads, T, E] followed by new [B, heads, 1, E]: [B, heads, T + 1, E].

    The result is a prefix view of a buffer with spare positions. When ``cache`` is the longest
    prefix written into its buffer so far (no step has been taken from this state yet) and no
    gradient flows, position T is written in place: the T positions the given state sees stay
    untouched, so ``step`` still leaves its input state valid, and decoding costs O(1) copies per
    token instead of O(T). Otherwise (a second step from the same state, autograd, a cache
    that is not ours, a full buffer) the cache moves to a new buffer (_with_room).
    """
    T = cache.shape[2]
    buffer = getattr(cache, "_buffer", None)  # set by _prefix on the views it makes
    in_place = (
        buffer is not None
        and getattr(buffer, "_filled", None) == T
        and buffer.shape[2] > T
        # Exactly the buffer's prefix: a slice of its batch rows (beam pruning) starts at the
        # same address but would get every row's position T written and returned.
        and cache.data_ptr() == buffer.data_ptr()
        and cache.shape[:2] == buffer.shape[:2]
        and cache.stride() == buffer.stride()
        and not (torch.is_grad_enabled() and (cache.requires_grad or new.requires_grad))
        # A buffer made in inference mode (a prefill under it) is read-only outside it.
        and (torch.is_inference_mode_enabled() or not buffer.is_inference())
    )
    if not in_place:
        buffer = _with_room(cache, T + 1)._buffer
    buffer[:, :, T] = new[:, :, 0]
    buffer._filled = T + 1  # positions written so far, shared by every view of the buffer
    return _prefix(buffer, T + 1)


def _with_room(cache: torch.Tensor, need: int | None = None) -> torch.Tensor:
    """cache [B, heads, T, E] copied into the prefix of a new buffer of room for at least
    ``need`` (default T) positions and a quarter more (16 at least), returned as that prefix
    view. A quarter, not a doubling: regrowing copies the cache once every T / 4 steps, little
    beside the step's own read of the whole cache, and the buffer wastes at most a fifth."""
    B, heads, T, E = cache.shape
    need = T if need is None else need
    buffer = cache.new_empty(B, heads, need + max(16, need // 4), E)
    buffer[:, :, :T] = cache
    buffer._filled = T
    return _prefix(buffer, T)


def _prefix(buffer: torch.Tensor, T: int) -> torch.Tensor:
    """buffer's first T positions, as a view that names its buffer (``_buffer``). Not the
    view's ``_base``: inference mode records none, and every step under it crashed. A view
    cut from this one (a slice of batch rows) has no ``_buffer`` and is copied by _append."""
    view = buffer[:, :, :T]
    view._buffer = buffer
    return view
