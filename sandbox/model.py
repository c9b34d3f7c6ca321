"""The language model: embeddings, pre-norm blocks of (mixer, MLP), final norm, tied head.

Readable top to bottom, nanoGPT style. Any registered mixer plugs in; `attn_layers` makes a
hybrid (e.g. H3 with attention at a few depths, as in the H3 paper's pretrained models).
"""

from __future__ import annotations

import math

import torch
from torch import nn

import layers
from kernels import gelu_tanh
from sandbox.config import ModelConfig


class MLP(nn.Module):
    """Linear(d, r*d) -> tanh-GELU -> Linear(r*d, d)."""

    def __init__(self, d_model: int, ratio: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ratio * d_model)
        self.fc2 = nn.Linear(ratio * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(gelu_tanh(self.fc1(x))))


class Block(nn.Module):
    """x + mixer(norm1(x)), then + mlp(norm2(x)). Shapes [B, L, D] -> [B, L, D]."""

    def __init__(self, mixer: nn.Module, d_model: int, mlp_ratio: int, dropout: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.mixer = mixer
        self.dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model, eps=eps) if mlp_ratio else None
        self.mlp = MLP(d_model, mlp_ratio, dropout) if mlp_ratio else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_mlp(x + self.dropout(self.mixer(self.norm1(x))))

    def prefill(self, x: torch.Tensor):
        """``forward`` and the mixer's state after the last position: ([B, L, D], state)."""
        y, state = self.mixer.prefill(self.norm1(x))
        return self._add_mlp(x + self.dropout(y)), state

    def step(self, x: torch.Tensor, state):
        """One position: x [B, D] -> ([B, D], state)."""
        y, state = self.mixer.step(self.norm1(x), state)
        return self._add_mlp(x + y), state

    def _add_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mlp is None else x + self.mlp(self.norm2(x))


class LanguageModel(nn.Module):
    """Token ids [B, T] -> next-token logits [B, T, vocab_size]."""

    def __init__(self, config: ModelConfig, vocab_size: int, max_seq_len: int):
        super().__init__()
        self.config = config
        self.max_seq_len = max_seq_len
        d = config.d_model
        bad = [i for i in config.attn_layers if not 0 <= i < config.n_layers]
        if bad:
            raise ValueError(f"model.attn_layers: {bad} outside 0..{config.n_layers - 1}")
        kinds = [
            "attention" if i in config.attn_layers else config.mixer for i in range(config.n_layers)
        ]
        use_pos = config.pos_emb if config.pos_emb is not None else "attention" in kinds

        self.embedding = nn.Embedding(vocab_size, d)
        self.pos_embedding = nn.Embedding(max_seq_len, d) if use_pos else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(
                self._build_mixer(kind),
                d,
                config.mlp_ratio,
                config.dropout,
                config.norm_eps,
            )
            for kind in kinds
        )
        self.norm_f = nn.LayerNorm(d, eps=config.norm_eps)
        self.head = nn.Linear(d, vocab_size, bias=False)
        self.head.weight = self.embedding.weight  # tied
        self._init_weights()

    def _build_mixer(self, kind: str) -> nn.Module:
        c = self.config
        params = c.attn_params if kind == "attention" and kind != c.mixer else c.mixer_params
        field = "model.attn_params" if params is c.attn_params else "model.mixer_params"
        if kind not in layers.names():  # attention always is: so the mixer is the bad field
            raise ValueError(f"model.mixer: unknown mixer {kind!r}; registered: {layers.names()}")
        if "d_model" in params:
            raise ValueError(f"{field}.d_model: set by model.d_model, not here")
        try:
            mixer = layers.build(kind, d_model=c.d_model, **params)
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
        # A mixer with a length limit (Hyena's max_len) is checked now rather than at the first
        # forward pass, after a run has started writing its directory.
        limit = getattr(mixer, "max_len", None)
        if limit is not None and limit < self.max_seq_len:
            raise ValueError(
                f"{field}: max_len={limit} is shorter than the model's {self.max_seq_len} positions"
            )
        return mixer

    def _init_weights(self) -> None:
        # GPT-2 style: embeddings and MLPs N(0, 0.02); the MLP's residual output projection is
        # scaled by 1/sqrt(2 n_layer) so the residual stream's variance does not grow with
        # depth. Mixers keep their own initialisation (SSM parameters have specific inits).
        std = 0.02
        if self.config.init == "gpt2":
            self._init_gpt2(std)
            return
        nn.init.normal_(self.embedding.weight, std=std)
        if self.pos_embedding is not None:
            nn.init.normal_(self.pos_embedding.weight, std=std)
        for block in self.blocks:
            if block.mlp is not None:
                nn.init.normal_(block.mlp.fc1.weight, std=std)
                nn.init.normal_(block.mlp.fc2.weight, std=std / math.sqrt(2 * len(self.blocks)))
                nn.init.zeros_(block.mlp.fc1.bias)
                nn.init.zeros_(block.mlp.fc2.bias)

    def _init_gpt2(self, std: float) -> None:
        # The H3 release: every Linear (mixer projections included) and embedding N(0, std),
        # zero biases; residual output projections get std / sqrt(2 n_layer), picked by name as
        # the release does (attention's out_proj, the MLP's fc2). SSM parameters are not Linear
        # weights and keep their own init.
        residual_std = std / math.sqrt(2 * len(self.blocks))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.head:  # head = embedding
                scaled = name.rsplit(".", 1)[-1] in ("out_proj", "fc2")
                nn.init.normal_(module.weight, std=residual_std if scaled else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)

    def length_limit(self) -> tuple[float, str]:
        """The most positions the model can read, and what sets it: learned positions, a
        mixer's own max_len (Hyena's; never below max_seq_len, see _build_mixer), or nothing
        (inf): the SSMs and RoPE attention extrapolate."""
        if self.pos_embedding is not None:
            return (
                self.max_seq_len,
                f"the model's max_seq_len {self.max_seq_len} (learned positions)",
            )
        limit = min((getattr(b.mixer, "max_len", math.inf) for b in self.blocks), default=math.inf)
        return limit, f"a mixer's max_len {limit}"

    def num_params(self) -> int:
        """Parameter count, the tied head counted once."""
        return sum(p.numel() for p in self.parameters())

    def param_counts(self) -> dict[str, int]:
        """Parameters by part: "embeddings", "mixer <kind>" per mixer kind, "mlp", "norms"."""
        counts: dict[str, int] = {}
        for name, p in self.named_parameters():  # the tied head is the embedding: listed once
            parts = name.split(".")  # blocks.<i>.<norm1|mixer|norm2|mlp>... or a top-level module
            part = parts[2] if parts[0] == "blocks" else parts[0]
            if part == "mixer":
                part = f"mixer {self.blocks[int(parts[1])].mixer.name}"
            elif part.endswith("embedding"):
                part = "embeddings"
            elif part.startswith("norm"):
                part = "norms"
            counts[part] = counts.get(part, 0) + p.numel()
        return counts

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embedding(input_ids)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding(positions)
        return self.dropout(x)

    def _embed_sequence(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] (checked) -> embedded positions 0 .. T-1 [B, T, D]."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if self.pos_embedding is not None and T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.max_seq_len}")
        return self._embed(input_ids, torch.arange(T, device=input_ids.device))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self._embed_sequence(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_f(x))

    def prefill(
        self, input_ids: torch.Tensor, last_only: bool = False
    ) -> tuple[torch.Tensor, dict]:
        """Read a prompt in parallel: ids [B, T] -> (``forward``'s logits [B, T, vocab_size],
        the :meth:`step` state after position T-1, every mixer's computed in parallel).

        ``last_only``: logits of position T-1 only, [B, 1, vocab_size] - all generation needs,
        where the full logits of a long prompt can outweigh the model.
        """
        x = self._embed_sequence(input_ids)
        states = []
        for block in self.blocks:
            x, layer_state = block.prefill(x)
            states.append(layer_state)
        if last_only:
            x = x[:, -1:]
        return self.head(self.norm_f(x)), {"pos": input_ids.shape[1], "layers": states}

    def init_state(self, batch_size: int) -> dict:
        """Recurrent state for :meth:`step`: each mixer's state plus the position."""
        return {"pos": 0, "layers": [b.mixer.init_state(batch_size) for b in self.blocks]}

    def step(self, input_ids: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """One token per sequence: ids [B] -> logits [B, vocab_size]; equals forward's row.
        A position past length_limit() is a ValueError (as in forward), not an index error
        deep in an embedding or a filter."""
        limit, what = self.length_limit()
        if state["pos"] >= limit:
            raise ValueError(f"step at position {state['pos']}: past {what}")
        pos = torch.full_like(input_ids, state["pos"])
        x = self._embed(input_ids, pos)
        new_layers = []
        for block, layer_state in zip(self.blocks, state["layers"]):
            x, layer_state = block.step(x, layer_state)
            new_layers.append(layer_state)
        return self.head(self.norm_f(x)), {"pos": state["pos"] + 1, "layers": new_layers}
