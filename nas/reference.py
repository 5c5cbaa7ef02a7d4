"""The plain research-code form of the networks and of DARTS' architect: the baseline the benchmark times
and the reference the tests compare the fast paths with.

``reference_modules`` swaps every kernel rewrite (``nas.kernels``) back for the module it computes, as
research code and ptflops see the network; ``PlainMixedOp`` / ``plain_network`` are DARTS' MixedOp and
search network; ``PlainArchitect`` is quark0/darts' ``architect.py``, transcribed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nas.kernels import DepthwiseConv2d, GlobalAvgPool2d, GroupedConv2d, LeanBatchNorm2d, PointwiseConv2d
from nas.ops import FactorizedReduce, build_op, is_pooling
from nas.opsets import OpSet
from nas.search_network import SearchNetwork

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

class ReferenceFactorizedReduce(FactorizedReduce):
    """FactorizedReduce as DARTS runs it: the activation and two stride-2 1x1 convs over the whole map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.darts_forward(x)


def reference_modules(model: nn.Module) -> nn.Module:
    """``model`` with every CPU rewrite swapped back, in place, for the module it computes: ``nn.Conv2d``,
    ``nn.BatchNorm2d``, DARTS' FactorizedReduce and ``nn.AdaptiveAvgPool2d`` (same parameters and buffers).
    This is the network as research code runs it (the bench's baseline) and as ptflops must see it (every
    conv a module call)."""
    for module in model.modules():
        if isinstance(module, (DepthwiseConv2d, GroupedConv2d, PointwiseConv2d)):
            module.__class__ = nn.Conv2d
        elif isinstance(module, LeanBatchNorm2d):
            module.__class__ = nn.BatchNorm2d
        elif type(module) is FactorizedReduce:
            module.__class__ = ReferenceFactorizedReduce
        elif type(module) is GlobalAvgPool2d:
            module.__class__ = nn.AdaptiveAvgPool2d
    return model


class PlainMixedOp(nn.Module):
    """DARTS' MixedOp: ``sum(w * op(x) for w, op in zip(weights, ops))`` over every op, ``none`` included
    (pooling followed by an affine-free BN where the op set says so)."""

    def __init__(self, op_set: OpSet, channels: int, stride: int) -> None:
        super().__init__()
        ops = []
        for name in op_set.primitives:
            op = build_op(name, channels, stride, False, op_set.options)
            if is_pooling(name) and op_set.pooling_bn:
                op = nn.Sequential(op, nn.BatchNorm2d(channels, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        mixed = sum(w * op(x) for w, op in zip(weights, self.ops))
        return mixed if out is None else out + mixed  # the cell's sum over edges, as DARTS writes it


def plain_network(op_set: OpSet, channels: int, layers: int, num_classes: int = 10, in_channels: int = 3,
                  nodes: int = 4) -> SearchNetwork:
    return reference_modules(SearchNetwork(op_set, channels, layers, nodes, num_classes, in_channels,
                                        mixed_op=PlainMixedOp))


class PlainArchitect:
    """DARTS' Architect (quark0/darts ``architect.py``), transcribed: flat parameter vectors, a new model
    constructed and loaded for every unrolled step, in-place +-R perturbations for the HVP."""

    def __init__(self, model: SearchNetwork, make_model, momentum: float, weight_decay: float) -> None:
        self.model, self.make_model = model, make_model
        self.momentum, self.weight_decay = momentum, weight_decay

    def _loss(self, model: SearchNetwork, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def alpha_grads(self, train, valid, eta: float, optimizer: torch.optim.Optimizer, unrolled: bool):
        if not unrolled:
            return list(torch.autograd.grad(self._loss(self.model, *valid), self.model.arch_parameters(),
                                            allow_unused=True, materialize_grads=True))
        unrolled_model = self._unrolled_model(train, eta, optimizer)
        loss = self._loss(unrolled_model, *valid)
        loss.backward()
        dalpha = [a.grad if a.grad is not None else torch.zeros_like(a) for a in unrolled_model.arch_parameters()]
        vector = [w.grad if w.grad is not None else torch.zeros_like(w) for w in unrolled_model.weights()]
        implicit = self._hessian_vector_product(vector, train)
        return [g - eta * ig for g, ig in zip(dalpha, implicit)]

    def _unrolled_model(self, train, eta: float, optimizer: torch.optim.Optimizer) -> SearchNetwork:
        weights = self.model.weights()
        loss = self._loss(self.model, *train)
        theta = torch.cat([w.reshape(-1) for w in weights]).detach()
        try:
            moment = torch.cat([optimizer.state[w]["momentum_buffer"].reshape(-1) for w in weights]) * self.momentum
        except KeyError:
            moment = torch.zeros_like(theta)
        grads = torch.autograd.grad(loss, weights, allow_unused=True, materialize_grads=True)
        dtheta = torch.cat([g.reshape(-1) for g in grads]) + self.weight_decay * theta
        new_theta = theta - eta * (moment + dtheta)
        model = self.make_model()
        state, offset = self.model.state_dict(), 0
        for name, w in self.model.named_weights().items():
            state[name] = new_theta[offset:offset + w.numel()].view_as(w)
            offset += w.numel()
        model.load_state_dict(state)
        return model

    def _hessian_vector_product(self, vector, train, r: float = 1e-2):
        weights = self.model.weights()
        R = r / torch.cat([v.reshape(-1) for v in vector]).norm()
        with torch.no_grad():
            for w, v in zip(weights, vector):
                w.add_(v, alpha=R)
        grads_p = torch.autograd.grad(self._loss(self.model, *train), self.model.arch_parameters(),
                                      allow_unused=True, materialize_grads=True)
        with torch.no_grad():
            for w, v in zip(weights, vector):
                w.sub_(v, alpha=2 * R)
        grads_n = torch.autograd.grad(self._loss(self.model, *train), self.model.arch_parameters(),
                                      allow_unused=True, materialize_grads=True)
        with torch.no_grad():
            for w, v in zip(weights, vector):
                w.add_(v, alpha=R)
        return [(p - n) / (2 * R) for p, n in zip(grads_p, grads_n)]


def plain_loader(images: np.ndarray, labels: np.ndarray, batch: int, cutout: int = 0):
    """Per-image PIL transforms through a torch DataLoader (as the research scripts do)."""
    import torchvision.transforms as T
    from PIL import Image

    class Cutout:
        def __init__(self, length: int) -> None:
            self.length = length

        def __call__(self, img: torch.Tensor) -> torch.Tensor:
            h, w = img.shape[1:]
            y, x = np.random.randint(h), np.random.randint(w)
            mask = torch.ones(h, w)
            mask[max(0, y - self.length // 2):min(h, y + self.length // 2),
                 max(0, x - self.length // 2):min(w, x + self.length // 2)] = 0
            return img * mask

    tf = [T.RandomCrop(images.shape[1], padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
          T.Normalize(CIFAR_MEAN, CIFAR_STD)] + ([Cutout(cutout)] if cutout else [])
    transform = T.Compose(tf)

    class DS(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int):
            return transform(Image.fromarray(images[i])), int(labels[i])

    return torch.utils.data.DataLoader(DS(), batch_size=batch, shuffle=True, num_workers=0, drop_last=True)
