"""The DARTS architecture gradient: first order, or second order through one unrolled weight step.

Second order (DARTS eq. 7-8): with w' = w - xi * (momentum * buf + grad_w L_train(w, a) + wd * w),

    grad_a L_val(w', a) - xi * (grad_a L_train(w+, a) - grad_a L_train(w-, a)) / (2 eps),
    w+- = w +- eps * grad_w' L_val(w', a),  eps = 0.01 / ||grad_w' L_val(w', a)||.

The unrolled and finite-difference passes run the network itself with the other weight values written into
its parameters (no model copy, and none of ``functional_call``'s per-call reparametrisation: about 90 ms a
pass on CPU), and the originals are restored exactly afterwards. The two finite-difference passes ask
autograd for alpha's gradient only.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call

from nas.search_network import SearchNetwork

Batch = tuple[torch.Tensor, torch.Tensor]
# alpha_normal is unused when every cell reduces (fewer than 3 layers): its gradient is zero, not an error
_UNUSED_OK = {"allow_unused": True, "materialize_grads": True}


def _loss(model: SearchNetwork, x: torch.Tensor, y: torch.Tensor,
          weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    logits = model(x) if weights is None else functional_call(model, weights, (x,), strict=False)
    return F.cross_entropy(logits.float(), y)


def unrolled_weights(model: SearchNetwork, train: Batch, xi: float, momentum: float, weight_decay: float,
                     momentum_buffers: dict[str, torch.Tensor | None], *,
                     create_graph: bool = False) -> dict[str, torch.Tensor]:
    """w' = w - xi * (momentum * buf + grad_w L_train + wd * w): one SGD step as the weight optimiser takes it."""
    named = model.named_weights()
    weights = list(named.values())
    # w' depends on alpha only through the exact hypergradient's graph (create_graph)
    with contextlib.nullcontext() if create_graph else without_grad(model.arch_parameters()):
        grads = torch.autograd.grad(_loss(model, *train), weights, create_graph=create_graph, **_UNUSED_OK)
    if not create_graph:  # the same arithmetic over all weights at once (foreach kernels), in place, detached
        with torch.no_grad():
            steps = torch._foreach_add(grads, weights, alpha=weight_decay)
            buffered = [(s, momentum_buffers[n]) for n, s in zip(named, steps) if momentum_buffers.get(n) is not None]
            if buffered:
                torch._foreach_add_([s for s, _ in buffered], [b for _, b in buffered], alpha=momentum)
            torch._foreach_mul_(steps, -xi)
            torch._foreach_add_(steps, weights)
        return dict(zip(named, steps))
    out = {}
    for (name, w), g in zip(named.items(), grads):
        buf = momentum_buffers.get(name)
        step = g + weight_decay * w
        if buf is not None:
            step = step + momentum * buf
        out[name] = w - xi * step
    return out


def second_order_alpha_grads(model: SearchNetwork, train: Batch, valid: Batch, xi: float, momentum: float,
                             weight_decay: float, momentum_buffers: dict[str, torch.Tensor | None],
                             autocast: Callable[[], ContextManager] | None = None) -> list[torch.Tensor]:
    """DARTS' second-order approximation of d L_val(w*(a), a) / d a."""
    alphas = model.arch_parameters()
    params = model.weights()
    with _context(autocast):
        w_prime = unrolled_weights(model, train, xi, momentum, weight_decay, momentum_buffers)
    with _weights_restored(params) as w:
        _load(params, w_prime.values())
        with _context(autocast):
            grads = torch.autograd.grad(_loss(model, *valid), alphas + params, **_UNUSED_OK)
        d_alpha, v = grads[:len(alphas)], grads[len(alphas):]
        eps = 0.01 / torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v)))
        eps_v = torch._foreach_mul(v, eps)
        del grads, v
        finite_difference = []
        with without_grad(params):
            for sign in (1.0, -1.0):
                _load(params, w)
                with torch.no_grad():  # w +- eps * v
                    torch._foreach_add_(params, eps_v, alpha=sign)
                with _context(autocast):
                    finite_difference.append(torch.autograd.grad(_loss(model, *train), alphas, **_UNUSED_OK))
    g_plus, g_minus = finite_difference
    return [da - xi * (gp - gm) / (2 * eps) for da, gp, gm in zip(d_alpha, g_plus, g_minus)]


@contextlib.contextmanager
def _weights_restored(params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Yields a copy of ``params``' values and writes it back, bit for bit, when the block ends."""
    with torch.no_grad():  # one foreach copy, not a clone (a kernel launch on CUDA) per parameter
        saved = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(saved, params)
    try:
        yield saved
    finally:
        _load(params, saved)


@contextlib.contextmanager
def without_grad(params: list[torch.Tensor]) -> Iterator[None]:
    """``params`` do not require grad for the block (each gets its own flag back after it).

    For passes that need no gradient of them: autograd Functions decide what to compute from
    ``requires_grad``, not from what ``autograd.grad``/``backward(inputs=)`` asks for, so the custom
    convs (``nas.ops``) would compute weight gradients, and the mixed ops alpha's dot products, for nothing.
    """
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _load(params: list[torch.Tensor], values: Iterable[torch.Tensor]) -> None:
    values = list(values)
    if len(values) != len(params):
        raise ValueError(f"{len(values)} values for {len(params)} parameters")
    with torch.no_grad():
        torch._foreach_copy_(params, values)


def first_order_alpha_grads(model: SearchNetwork, valid: Batch,
                            autocast: Callable[[], ContextManager] | None = None) -> list[torch.Tensor]:
    """grad_a L_val(w, a): DARTS' first-order approximation (xi = 0)."""
    with _context(autocast), without_grad(model.weights()):
        return list(torch.autograd.grad(_loss(model, *valid), model.arch_parameters(), **_UNUSED_OK))


def exact_unrolled_alpha_grads(model: SearchNetwork, train: Batch, valid: Batch, xi: float, momentum: float,
                               weight_decay: float,
                               momentum_buffers: dict[str, torch.Tensor | None]) -> list[torch.Tensor]:
    """The exact hypergradient through the unrolled step (double backward); a reference for tests."""
    w_prime = unrolled_weights(model, train, xi, momentum, weight_decay, momentum_buffers, create_graph=True)
    return list(torch.autograd.grad(_loss(model, *valid, w_prime), model.arch_parameters(), **_UNUSED_OK))


def momentum_buffers(optimizer: torch.optim.Optimizer, model: SearchNetwork) -> dict[str, torch.Tensor | None]:
    """The SGD momentum buffer of each weight, by name (None before the first step)."""
    return {n: optimizer.state.get(p, {}).get("momentum_buffer") for n, p in model.named_weights().items()}


def _context(factory: Callable[[], ContextManager] | None) -> ContextManager:
    return factory() if factory is not None else contextlib.nullcontext()
