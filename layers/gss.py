"""Gated State Space layer (Mehta et al. 2022).

u = GELU(x W1) (width F = expansion * E), v = GELU(x W2) (width H = E / ssm_reduction),
y = SSM(v), out = (u * (y W3)) W4. The paper's SSM is DSS; here it is the shared S4D-style
DiagonalSSM (same diagonal family, S4D parameterisation), so GSS differs from the other
mixers in its gating and widths only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from layers.base import Mixer, State, register
from layers.ssm import DiagonalSSM


@register("gss")
class GSS(Mixer):
    """Args: d_model E; expansion (F = expansion * E); ssm_reduction (H = E / ssm_reduction,
    must divide E); d_state, init, discretization, dt_min, dt_max as for the s4d mixer.

    State for ``step``: {"ssm": complex [B, H, N/2]}.
    """

    def __init__(
        self,
        d_model: int,
        expansion: int = 4,
        ssm_reduction: int = 4,
        d_state: int = 64,
        init: str = "lin",
        discretization: str = "zoh",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ):
        super().__init__(d_model)
        width = self.d_model * self._int("expansion", expansion)
        reduction = self._int("ssm_reduction", ssm_reduction)
        self._divides("ssm_reduction", reduction, "the SSM branch has d_model / ssm_reduction")
        ssm_width = self.d_model // reduction
        self.gate_proj = nn.Linear(self.d_model, width)
        self.ssm_proj = nn.Linear(self.d_model, ssm_width)
        self.ssm = DiagonalSSM(
            ssm_width, d_state, init, discretization, dt_min, dt_max, owner=self.name
        )
        self.ssm_out_proj = nn.Linear(ssm_width, width)
        self.output_linear = nn.Linear(width, self.d_model)

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., E] -> gate u [..., F], SSM input v [..., H]."""
        return F.gelu(self.gate_proj(x)), F.gelu(self.ssm_proj(x))

    def _output(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gate u [..., F] and SSM output y [..., H] -> [..., E]."""
        return self.output_linear(u * self.ssm_out_proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self._branches(x)
        y = self.ssm(rearrange(v, "b l h -> b h l"))
        return self._output(u, rearrange(y, "b h l -> b l h"))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        u, v = self._branches(x)
        y, ssm_state = self.ssm.prefill(rearrange(v, "b l h -> b h l"))
        return self._output(u, rearrange(y, "b h l -> b l h")), {"ssm": ssm_state}

    def _zero_state(self, batch_size: int) -> State:
        return {"ssm": self.ssm.init_state(batch_size)}

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        u, v = self._branches(x_t)
        y_t, ssm_state = self.ssm.step(v, state["ssm"])
        return self._output(u, y_t), {"ssm": ssm_state}
