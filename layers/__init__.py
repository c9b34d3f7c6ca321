"""Sequence mixers (nn.Modules) and their registry.

    mixer = layers.build("h3", d_model=64, d_state=64, head_dim=1)
    y = mixer(x)                              # [B, L, D] -> [B, L, D], strictly causal
    state = mixer.init_state(batch_size=B)    # on the mixer's device and dtype
    y_t, state = mixer.step(x_t, state)       # x_t [B, D]; equals forward position by position
    y, state = mixer.prefill(x)               # forward(x) and, in parallel, the state step reaches
    layers.names()                            # ["attention", "gss", "h3", "hyena", "s4d"]
    layers.ssm_parameters(model)              # dt, A, B of SSM kernels: lr <= 1e-3, no decay

Importing a mixer module registers its mixer, so every mixer class is imported here.
"""

from layers.attention import Attention
from layers.base import (
    Mixer,
    State,
    build,
    mark_ssm,
    names,
    register,
    ssm_parameters,
)
from layers.gss import GSS
from layers.h3 import H3
from layers.hyena import Hyena
from layers.s4d import S4D
from layers.ssm import DiagonalSSM, ShiftSSM

__all__ = [
    "GSS",
    "H3",
    "Hyena",
    "S4D",
    "Attention",
    "DiagonalSSM",
    "Mixer",
    "ShiftSSM",
    "State",
    "build",
    "mark_ssm",
    "names",
    "register",
    "ssm_parameters",
]
