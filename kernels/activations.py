"""Activations written for the CPU, where torch's own are slow.

tanh-GELU, gelu(x) = x (1 + tanh(z)) / 2 with z = sqrt(2 / pi) (x + 0.044715 x^3), is the
activation of GPT-2's and H3's MLPs. Since (1 + tanh(z)) / 2 = sigmoid(2 z), it is also
x sigmoid(2 z), and on x86 CPUs torch's sigmoid is much cheaper than its tanh (Sleef's tanh
to 1 ulp). At the tasks' MLP shape, [32, 30, 256] fp32 on one AMD EPYC core:
F.gelu(approximate="tanh") took 1.82 ms forward and 1.97 ms backward, tanh alone 1.20 ms,
sigmoid 0.57 ms; this form takes 0.77 ms forward and 0.56 ms backward
(benchmarks/train_step.py times it within a training step). CUDA has fused kernels for the
torch op, so tensors there keep it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.double_backward import reference_grads

# 2 z = x (_C1 + _C2 x^2)
_C1 = 2 * math.sqrt(2 / math.pi)
_C2 = _C1 * 0.044715


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh-GELU of x (any shape), as F.gelu(x, approximate="tanh"); on CPU for float32 and
    float64 through the sigmoid form with a hand-written backward, elsewhere torch's op."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return _GeluTanh.apply(x)
    return F.gelu(x, approximate="tanh")


class _GeluTanh(torch.autograd.Function):
    """y = x s with s = sigmoid(x (_C1 + _C2 x^2)). dy/dx = s + (_C1 + 3 _C2 x^2) s (1 - s) x.

    Saves x and s (one more activation than torch's op, which recomputes tanh in backward: a
    sigmoid costs as much as the whole backward here). Few passes, mostly in place: each pass
    over a [32, 30, 256] tensor streams 1 MB, more than this host's L2.
    """

    @staticmethod
    def forward(ctx, x):
        s = torch.addcmul(x.new_tensor(_C1), x, x, value=_C2)  # _C1 + _C2 x^2
        s.mul_(x).sigmoid_()
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: s here is a constant to autograd
            return reference_grads(_reference, (x,), ctx.needs_input_grad, g)
        d = torch.addcmul(x.new_tensor(_C1), x, x, value=3 * _C2)  # dz2/dx / x
        d.mul_(s)
        d.addcmul_(d, s, value=-1)  # times (1 - s)
        # x last: s (1 - s) is exactly 0 where |x| is huge, and x dz2/dx first overflowed to
        # inf in fp32 from |x| ~ 1.5e13 on, so inf * 0 made the gradient NaN (torch's: 0 or 1).
        return d.mul_(x).add_(s).mul_(g)


def _reference(x: torch.Tensor) -> torch.Tensor:
    """torch's tanh-GELU, which a double backward differentiates (kernels.double_backward)."""
    return F.gelu(x, approximate="tanh")
