"""Higher-order gradients for the hand-written autograd Functions of this package.

Their backward passes are written for speed: they work on values the forward pass kept (filter
and input spectra, sigmoids, Vandermonde powers), outside autograd. That is right for a plain
backward, but a backward with ``create_graph=True`` (gradient penalties, Hessian-vector
products, ``gradgradcheck``) would return gradients cut off from the inputs they depend on,
so that the second derivative silently lost terms. And a Function that frees what it kept
after its backward (kernels.fft_torch) could not run a second backward through a retained
graph (``retain_graph=True``: ``torch.autograd.functional.jacobian``, ``gradcheck``).

In both cases the Functions call :func:`reference_grads` instead: autograd differentiates a
plain torch version of their forward pass (same math, unfused), built on aliases of the saved
inputs (views of them, so still part of the outer graph, under create_graph). It is slower,
and only runs in those cases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def reference_grads(
    reference: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor | None],
    needs: Sequence[bool],
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``reference(*inputs)`` against grad_output, for the inputs whose ``needs``
    entry is true (None for the others), as a Function's backward returns them.

    ``inputs`` are the Function's saved inputs, in its forward's order (None where it took
    None). The gradients are differentiable themselves when the backward runs with
    create_graph=True (torch then enables grad mode inside backward), plain otherwise.
    """
    create_graph = torch.is_grad_enabled()
    # Differentiate with respect to a fresh alias of each wanted input, not the input itself:
    # autograd.grad with respect to x would give x's total derivative, counting the paths
    # through every other slot that x also fills or feeds (fftconv(x, k, postgate=x), or
    # u = f(k)), which the outer backward then adds again. A view keeps the gradient
    # differentiable in x for create_graph; otherwise a detached leaf keeps the nested
    # backward out of (and from freeing) the outer graph.
    inputs = [
        (x.view_as(x) if create_graph else x.detach().requires_grad_()) if need else x
        for x, need in zip(inputs, needs)
    ]
    with torch.enable_grad():
        out = reference(*inputs)
    wanted = [x for x, need in zip(inputs, needs) if need]
    grads = iter(
        torch.autograd.grad(out, wanted, grad_output, create_graph=create_graph, allow_unused=True)
    )
    return tuple(next(grads) if need else None for need in needs)
