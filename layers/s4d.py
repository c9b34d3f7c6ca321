"""The S4D block of the S4 codebase: diagonal SSM (with skip D), GELU, Linear(D, 2D) + GLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from layers.base import Mixer, State, register
from layers.ssm import DiagonalSSM


@register("s4d")
class S4D(Mixer):
    """One S4D layer over all D channels.

    Args:
        d_model: width D (= SSM channels).
        d_state: real state size N per channel (N/2 complex modes); must be even.
        init: "lin" (S4D-Lin) or "inv" (S4D-Inv) initialisation of A.
        discretization: "zoh" (S4D default) or "bilinear".
        dt_min, dt_max: range of the log-uniform initial step sizes.

    State for ``step``: {"ssm": complex [B, D, N/2]}.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        init: str = "lin",
        discretization: str = "zoh",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ):
        super().__init__(d_model)
        self.ssm = DiagonalSSM(
            self.d_model, d_state, init, discretization, dt_min, dt_max, owner=self.name
        )
        self.output_linear = nn.Linear(self.d_model, 2 * self.d_model)

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """SSM output [..., D] -> GLU(Linear(GELU(y))) [..., D]."""
        return F.glu(self.output_linear(F.gelu(y)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ssm(rearrange(x, "b l d -> b d l"))
        return self._output(rearrange(y, "b d l -> b l d"))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        y, ssm_state = self.ssm.prefill(rearrange(x, "b l d -> b d l"))
        return self._output(rearrange(y, "b d l -> b l d")), {"ssm": ssm_state}

    def _zero_state(self, batch_size: int) -> State:
        return {"ssm": self.ssm.init_state(batch_size)}

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        y_t, ssm_state = self.ssm.step(x_t, state["ssm"])
        return self._output(y_t), {"ssm": ssm_state}
