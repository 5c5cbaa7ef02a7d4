"""The DARTS architecture gradient: first order, or second order through one unrolled weight step.

Second order (DARTS eq. 7-8): with w' = w - xi * (momentum * buf + grad_w L_train(w, a) + wd * w),

    grad_a L_val(w', a) - xi * (grad_a L_train(w+, a) - grad_a L_train(w-, a)) / (2 eps),
    w+- = w +- eps * grad_w' L_val(w', a),  eps = 0.01 / ||grad_w' L_val(w', a)||.

The unrolled step reuses the network through ``torch.func.functional_call`` (no model copy), and the two
finite-difference passes ask autograd for alpha's gradient only.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

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
    grads = torch.autograd.grad(_loss(model, *train), list(named.values()), create_graph=create_graph,
                                **_UNUSED_OK)
    out = {}
    for (name, w), g in zip(named.items(), grads):
        buf = momentum_buffers.get(name)
        step = g + weight_decay * w
        if buf is not None:
            step = step + momentum * buf
        out[name] = w - xi * step if create_graph else (w - xi * step).detach()
    return out


def second_order_alpha_grads(model: SearchNetwork, train: Batch, valid: Batch, xi: float, momentum: float,
                             weight_decay: float, momentum_buffers: dict[str, torch.Tensor | None],
                             autocast: Callable[[], ContextManager] | None = None) -> list[torch.Tensor]:
    """DARTS' second-order approximation of d L_val(w*(a), a) / d a."""
    alphas = model.arch_parameters()
    with _context(autocast):
        w_prime = unrolled_weights(model, train, xi, momentum, weight_decay, momentum_buffers)
        for t in w_prime.values():
            t.requires_grad_(True)
        grads = torch.autograd.grad(_loss(model, *valid, w_prime), alphas + list(w_prime.values()), **_UNUSED_OK)
    d_alpha, v = grads[:len(alphas)], grads[len(alphas):]
    eps = 0.01 / torch.cat([g.reshape(-1) for g in v]).norm()
    named = model.named_weights()
    with torch.no_grad():
        w_plus = {n: w + eps * g for (n, w), g in zip(named.items(), v)}
        w_minus = {n: w - eps * g for (n, w), g in zip(named.items(), v)}
    with _context(autocast):
        g_plus = torch.autograd.grad(_loss(model, *train, w_plus), alphas, **_UNUSED_OK)
        g_minus = torch.autograd.grad(_loss(model, *train, w_minus), alphas, **_UNUSED_OK)
    return [da - xi * (gp - gm) / (2 * eps) for da, gp, gm in zip(d_alpha, g_plus, g_minus)]


def first_order_alpha_grads(model: SearchNetwork, valid: Batch,
                            autocast: Callable[[], ContextManager] | None = None) -> list[torch.Tensor]:
    """grad_a L_val(w, a): DARTS' first-order approximation (xi = 0)."""
    with _context(autocast):
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
