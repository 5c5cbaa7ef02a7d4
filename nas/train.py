"""Search and evaluation training as library functions.

``run_search`` / ``run_eval`` take a frozen config, optionally a checkpoint state to continue from, and an
``on_epoch(metrics, make_checkpoint)`` hook called after every epoch; ``make_checkpoint()`` returns a
state dict holding everything needed to continue exactly (model, optimisers, schedulers, alpha and its
optimiser, epoch, RNG states). Resuming from epoch k's checkpoint gives the same result as never stopping.
Nothing here touches a terminal, argparse or globals: the CLI and the Ray trainables drive these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas import architect
from nas.config import EvalConfig, SearchConfig
from nas.cost import CostTerm, cost_term
from nas.data import ImageData, batch_indices, load_dataset, make_batch
from nas.errors import ConfigError, DivergenceError
from nas.eval_network import EvalNetwork
from nas.genotypes import Genotype
from nas.graphs import GraphedStep
from nas.search_network import SearchNetwork, alpha_entropy

Metrics = dict[str, Any]
EpochHook = Callable[[Metrics, Callable[[], dict[str, Any]]], None]
StepHook = Callable[[int, int], None]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return dev


def autocast_factory(amp: bool | None, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast when ``amp`` (None: on for CUDA only), else a no-op context."""
    enabled = device.type == "cuda" if amp is None else amp
    if not enabled:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the OS at once.

    A CPU training step allocates and frees gigabytes of activations. With glibc's defaults the big blocks
    are mmapped and unmapped every time, so each step faults (and zeroes) every page in again: about 20 %
    of a CPU search step (``dartsweep bench search --no-keep-memory``). Peak RSS is unchanged; RSS just
    no longer drops after the peak. Returns False (and does nothing) where glibc is not the allocator.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, 1 << 30) or mallopt(m_mmap_threshold, 32 << 20)  # glibc caps it on some builds
    return bool(ok and mallopt(m_trim_threshold, (1 << 31) - 1))


@dataclass
class _RunState:
    epoch: int = 0  # epochs completed
    history: list[Metrics] = field(default_factory=list)


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "data": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    gen.set_state(state["data"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# Steps between reads of the running loss (a host-device sync; see _EpochTotals).
CHECK_EVERY = 50


class _EpochTotals:
    """An epoch's running loss sum and correct count, kept on the device.

    Reading a loss back every step (``loss.item()``) makes the host wait for the GPU to drain, so the GPU
    then idles while the next step's kernels are launched; that is most of a small network's step. The
    totals are read, and checked for divergence, every :data:`CHECK_EVERY` steps and at the epoch's end.
    """

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = self.checked = 0  # images so far; steps whose losses were checked

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, epoch: int, step: int,
            last: bool) -> None:
        n = len(targets)
        self.loss_sum += loss.detach() * n
        self.correct += (logits.detach().argmax(1) == targets).sum()
        self.seen += n
        if last or (step + 1) % CHECK_EVERY == 0:
            total = self.loss_sum.item()
            if not math.isfinite(total):
                raise DivergenceError(f"loss became {total} at epoch {epoch + 1} (steps {self.checked + 1}-"
                                      f"{step + 1}); lower the learning rate or check the data")
            self.checked = step + 1

    def means(self) -> tuple[float, float]:
        """(mean loss, top-1 accuracy in %) over the images seen."""
        seen = max(self.seen, 1)
        return self.loss_sum.item() / seen, 100.0 * self.correct.item() / seen


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             autocast: Callable[[], contextlib.AbstractContextManager],
             memory_format: torch.memory_format = torch.contiguous_format) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy in %) of ``model`` in eval mode on (x, y)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for idx in batch_indices(len(y), batch_size, None, x.device, drop_last=False):
        inputs = make_batch(data, x[idx], augment=False, generator=None, memory_format=memory_format)
        with autocast():
            out = model(inputs)
        logits = (out[0] if isinstance(out, tuple) else out).float()
        loss_sum += F.cross_entropy(logits, y[idx], reduction="sum")  # read back once, at the end
        correct += (logits.argmax(1) == y[idx]).sum()
    model.train(was_training)
    n = max(1, len(y))
    return loss_sum.item() / n, 100.0 * correct.item() / n


def _seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


# ------------------------------------------------------------------------------------------------ search

@dataclass
class SearchResult:
    genotype: Genotype
    history: list[Metrics]


def build_search(config: SearchConfig, data: ImageData, device: torch.device):
    """(model, weight optimiser, scheduler, alpha optimiser) for ``config``; seeds the global RNG."""
    torch.manual_seed(config.seed)
    model = SearchNetwork(config.resolved_op_set(), config.channels, config.layers, config.nodes,
                          data.num_classes, data.in_channels, checkpoint_cells=config.checkpoint_cells).to(device)
    model = model.to(memory_format=_memory_format(config.channels_last))
    optimizer = torch.optim.SGD(model.weights(), config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs, eta_min=config.lr_min)
    arch_optimizer = torch.optim.Adam(model.arch_parameters(), config.arch_lr,
                                      betas=(config.arch_beta1, config.arch_beta2),
                                      weight_decay=config.arch_weight_decay, foreach=True,
                                      capturable=config.cuda_graphs and device.type == "cuda")
    return model, optimizer, scheduler, arch_optimizer


def search_split(n: int, train_portion: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed split of the training set into the weight half and the alpha half (independent of the seed)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    cut = int(round(n * train_portion))
    return order[:cut], order[cut:]


def search_step(model: SearchNetwork, optimizer: torch.optim.Optimizer, arch_optimizer: torch.optim.Optimizer,
                train: tuple[torch.Tensor, torch.Tensor], valid: tuple[torch.Tensor, torch.Tensor], lr: float, *,
                order: int, momentum: float, weight_decay: float, grad_clip: float,
                autocast: Callable[[], contextlib.AbstractContextManager],
                cost: CostTerm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DARTS step, as ``run_search`` and ``dartsweep bench search`` run it: the architecture step on
    (train, valid), first order or second order (unrolled at the weight learning rate ``lr``), plus the
    expected-cost term's gradient when ``cost`` is given (``nas.cost``), then the weight step on
    ``train``. Returns the weight step's (loss, logits)."""
    arch_optimizer.zero_grad(set_to_none=True)
    if order == 2:
        grads = architect.second_order_alpha_grads(model, train, valid, lr, momentum, weight_decay,
                                                   architect.momentum_buffers(optimizer, model), autocast)
    else:
        grads = architect.first_order_alpha_grads(model, valid, autocast)
    if cost is not None:
        grads = cost.add_gradients(model.arch_parameters(), list(grads))
    for a, g in zip(model.arch_parameters(), grads):
        a.grad = g
    arch_optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with autocast(), architect.without_grad(model.arch_parameters()):  # alpha's gradient is not needed
        logits = model(train[0]).float()
    loss = F.cross_entropy(logits, train[1])
    weight_step(optimizer, model.weights(), loss, grad_clip)
    return loss, logits


def weight_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor,
                grad_clip: float) -> None:
    """Clip and apply ``loss``'s gradients. They come from ``autograd.grad`` and are handed to the optimiser
    as they are, rather than accumulated into ``.grad`` by ``backward()``: the same values without a
    dispatch (a host-side launch on CUDA) per parameter, of which the search network has over a thousand."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = g  # None for a parameter the loss does not use: the optimiser skips it, as after backward()
    nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    optimizer.step()


def run_search(config: SearchConfig, *, data: ImageData | None = None, device: str | torch.device | None = None,
               resume: dict[str, Any] | None = None, on_epoch: EpochHook | None = None,
               on_step: StepHook | None = None) -> SearchResult:
    """Run (or continue) a DARTS search; returns the final derived genotype and per-epoch metrics."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_memory()
    data = (data or load_dataset(config.dataset, config.data_dir)).to(dev)
    model, optimizer, scheduler, arch_optimizer = build_search(config, data, dev)
    gen = _seeded_generator(config.seed, dev)
    state = _RunState()
    if resume is not None:
        _check_resume(resume, "search", config.to_dict())
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        arch_optimizer.load_state_dict(resume["arch_optimizer"])
        _set_rng_state(resume["rng"], gen)
        state = _RunState(resume["epoch"], list(resume["history"]))
    autocast = autocast_factory(config.amp, dev)
    fmt = _memory_format(config.channels_last)
    w_idx, a_idx = (t.to(dev) for t in search_split(len(data.train_y), config.train_portion))
    cost = cost_term(model, config.cost_metric, config.cost_weight,
                     (data.in_channels, data.image_size, data.image_size), config.cost_lut, dev.type)
    x_w, y_w, x_a, y_a = data.train_x[w_idx], data.train_y[w_idx], data.train_x[a_idx], data.train_y[a_idx]

    def make_checkpoint() -> dict[str, Any]:
        return {"phase": "search", "epoch": state.epoch, "config": config.to_dict(),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "arch_optimizer": arch_optimizer.state_dict(),
                "rng": _rng_state(gen), "history": list(state.history)}

    def one_step(x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor,
                 y_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return search_step(model, optimizer, arch_optimizer, (x_train, y_train), (x_valid, y_valid), lr,
                           order=config.order, momentum=config.momentum, weight_decay=config.weight_decay,
                           grad_clip=config.grad_clip, autocast=autocast, cost=cost)

    step_fn = GraphedStep(one_step, dev, config.cuda_graphs, name="search step")  # keyed by the epoch's lr

    while state.epoch < config.epochs:
        epoch, start = state.epoch, time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        model.train()
        w_batches = list(batch_indices(len(y_w), config.batch_size, gen, dev, drop_last=True))
        a_batches = list(batch_indices(len(y_a), config.batch_size, gen, dev, drop_last=True))
        steps = len(w_batches) if config.max_steps_per_epoch is None else min(len(w_batches),
                                                                              config.max_steps_per_epoch)
        totals = _EpochTotals(dev)
        for step in range(steps):
            bw, ba = w_batches[step], a_batches[step % len(a_batches)]
            train = (make_batch(data, x_w[bw], augment=True, generator=gen, memory_format=fmt), y_w[bw])
            valid = (make_batch(data, x_a[ba], augment=True, generator=gen, memory_format=fmt), y_a[ba])
            loss, logits = step_fn(lr, *train, *valid)
            totals.add(loss, logits, train[1], epoch, step, last=step + 1 == steps)
            if on_step is not None:
                on_step(step + 1, steps)
        scheduler.step()
        valid_loss, valid_acc = evaluate(model, data, x_a, y_a, max(config.batch_size, 256), autocast, fmt)
        if not math.isfinite(valid_loss):
            raise DivergenceError(f"validation loss became {valid_loss} at epoch {epoch + 1}")
        w_normal = F.softmax(model.alpha_normal.detach().float(), -1)
        w_reduce = F.softmax(model.alpha_reduce.detach().float(), -1)
        elapsed = time.perf_counter() - start
        state.epoch += 1
        train_loss, train_acc = totals.means()
        metrics = {
            "epoch": state.epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc, "valid_loss": valid_loss, "valid_acc": valid_acc,
            "alpha_entropy_normal": alpha_entropy(w_normal), "alpha_entropy_reduce": alpha_entropy(w_reduce),
            **({"expected_cost": float(cost.expected(model.alpha_normal.detach(), model.alpha_reduce.detach()))}
               if cost is not None else {}),
            "genotype": model.genotype().to_dict(), "alpha_normal": w_normal.tolist(),
            "alpha_reduce": w_reduce.tolist(), "primitives": list(model.op_set.primitives),
            "epoch_time_s": elapsed, "images_per_s": totals.seen / elapsed if elapsed > 0 else 0.0,
        }
        reason = search_stop_reason(config, [*state.history, metrics])
        if reason is not None:
            metrics.update(stop_reason=reason, collapsed=reason.startswith("collapsed"))
        state.history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics, make_checkpoint)
        if reason is not None:
            break
    return SearchResult(model.genotype(), state.history)


def search_stop_reason(config: SearchConfig, history: list[Metrics]) -> str | None:
    """Why the search should stop after the last epoch of ``history``, or None to go on. From
    ``stop_min_epochs`` on: more than ``max_skip_connects`` skip_connects in the derived normal cell (the
    DARTS+ collapse criterion: the search has started to prefer parameter-free ops), or a derived genotype
    unchanged for ``stop_when_stable`` epochs (the search has settled; more epochs only sharpen alpha)."""
    epoch = history[-1]["epoch"]
    if epoch < config.stop_min_epochs or epoch >= config.epochs:
        return None
    genotype = history[-1]["genotype"]
    if config.max_skip_connects is not None:
        skips = sum(op == "skip_connect" for op, _ in genotype["normal"])
        if skips > config.max_skip_connects:
            return f"collapsed: {skips} skip_connects in the normal cell at epoch {epoch} (more than " \
                   f"{config.max_skip_connects})"
    k = config.stop_when_stable
    if k is not None and len(history) > k:
        recent = history[-(k + 1):]
        contiguous = [h["epoch"] for h in recent] == list(range(epoch - k, epoch + 1))
        if contiguous and all(h["genotype"] == genotype for h in recent):
            return f"settled: genotype unchanged for {k} epochs at epoch {epoch}"
    return None


# -------------------------------------------------------------------------------------------------- eval

@dataclass
class EvalResult:
    test_acc: float
    best_test_acc: float
    history: list[Metrics]


def build_eval(config: EvalConfig, data: ImageData, device: torch.device):
    """(model, optimiser, scheduler) for ``config``; seeds the global RNG."""
    torch.manual_seed(config.seed)
    model = EvalNetwork(config.resolved_genotype(), config.channels, config.layers, data.num_classes,
                        data.in_channels, auxiliary=config.auxiliary).to(device)
    model = model.to(memory_format=_memory_format(config.channels_last))
    optimizer = torch.optim.SGD(model.parameters(), config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs, eta_min=config.lr_min)
    return model, optimizer, scheduler


def eval_loss(model: EvalNetwork, inputs: torch.Tensor, targets: torch.Tensor, aux_weight: float,
              autocast: Callable[[], contextlib.AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss including the weighted auxiliary loss, logits) for one training batch."""
    with autocast():
        logits, logits_aux = model(inputs)
    logits = logits.float()
    loss = F.cross_entropy(logits, targets)
    if logits_aux is not None:
        loss = loss + aux_weight * F.cross_entropy(logits_aux.float(), targets)
    return loss, logits


def eval_step(model: EvalNetwork, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor, *,
              aux_weight: float, grad_clip: float,
              autocast: Callable[[], contextlib.AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """One evaluation training step, as ``run_eval`` and ``dartsweep bench eval`` run it; (loss, logits)."""
    optimizer.zero_grad(set_to_none=True)
    loss, logits = eval_loss(model, inputs, targets, aux_weight, autocast)
    weight_step(optimizer, [p for p in model.parameters() if p.requires_grad], loss, grad_clip)
    return loss, logits


def run_eval(config: EvalConfig, *, data: ImageData | None = None, device: str | torch.device | None = None,
             resume: dict[str, Any] | None = None, on_epoch: EpochHook | None = None,
             on_step: StepHook | None = None) -> EvalResult:
    """Train ``config.genotype`` at ``config.layers`` cells from scratch (or continue); reports test top-1."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_memory()
    data = (data or load_dataset(config.dataset, config.data_dir)).to(dev)
    model, optimizer, scheduler = build_eval(config, data, dev)
    gen = _seeded_generator(config.seed, dev)
    state = _RunState()
    if resume is not None:
        _check_resume(resume, "eval", config.to_dict())
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        _set_rng_state(resume["rng"], gen)
        state = _RunState(resume["epoch"], list(resume["history"]))
    autocast = autocast_factory(config.amp, dev)
    fmt = _memory_format(config.channels_last)
    cutout_length = (data.cutout_length if config.cutout_length is None else config.cutout_length) \
        if config.cutout else 0

    def make_checkpoint() -> dict[str, Any]:
        return {"phase": "eval", "epoch": state.epoch, "config": config.to_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(gen), "history": list(state.history)}

    def one_step(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return eval_step(model, optimizer, inputs, targets, aux_weight=config.auxiliary_weight,
                         grad_clip=config.grad_clip, autocast=autocast)

    # the learning rate and drop-path probability are baked into a captured step: keyed by both
    step_fn = GraphedStep(one_step, dev, config.cuda_graphs, name="eval training step")

    while state.epoch < config.epochs:
        epoch, start = state.epoch, time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        model.drop_path_prob = config.drop_path * epoch / config.epochs
        model.train()
        batches = list(batch_indices(len(data.train_y), config.batch_size, gen, dev, drop_last=True))
        if config.max_steps_per_epoch is not None:
            batches = batches[:config.max_steps_per_epoch]
        totals = _EpochTotals(dev)
        for step, idx in enumerate(batches):
            inputs = make_batch(data, data.train_x[idx], augment=True, generator=gen, cutout_length=cutout_length,
                                memory_format=fmt)
            targets = data.train_y[idx]
            loss, logits = step_fn((lr, model.drop_path_prob), inputs, targets)
            totals.add(loss, logits, targets, epoch, step, last=step + 1 == len(batches))
            if on_step is not None:
                on_step(step + 1, len(batches))
        scheduler.step()
        test_loss, test_acc = evaluate(model, data, data.test_x, data.test_y, max(config.batch_size, 256),
                                       autocast, fmt)
        elapsed = time.perf_counter() - start
        state.epoch += 1
        best = max([h["test_acc"] for h in state.history] + [test_acc])
        train_loss, train_acc = totals.means()
        metrics = {"epoch": state.epoch, "lr": lr, "drop_path_prob": model.drop_path_prob,
                   "train_loss": train_loss, "train_acc": train_acc,
                   "test_loss": test_loss, "test_acc": test_acc, "best_test_acc": best,
                   "epoch_time_s": elapsed, "images_per_s": totals.seen / elapsed if elapsed > 0 else 0.0}
        state.history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics, make_checkpoint)
    final = state.history[-1]["test_acc"] if state.history else float("nan")
    best = max((h["test_acc"] for h in state.history), default=float("nan"))
    return EvalResult(final, best, state.history)


def _same_setting(key: str, saved: Any, current: Any) -> bool:
    """Whether a checkpoint's config value builds what ``current`` builds. Op sets and genotypes are compared
    as networks: a first-release checkpoint's mapping lacks the form keys that today's spell out."""
    if saved == current or key not in ("op_set", "genotype"):
        return saved == current
    from nas.genotypes import load_genotype
    from nas.opsets import resolve_op_set

    try:
        if key == "op_set":
            return resolve_op_set(saved, first_release=True) == resolve_op_set(current)
        return load_genotype(saved, first_release=True) == load_genotype(current)
    except ConfigError:
        return False


def _check_resume(resume: dict[str, Any], phase: str, config: dict[str, Any]) -> None:
    if resume.get("phase") != phase:
        raise ConfigError(f"checkpoint is from the {resume.get('phase')!r} phase, not {phase!r}")
    saved = dict(resume.get("config", {}))
    op_set = saved.get("op_set")
    if isinstance(op_set, dict) and op_set.get("stem") == "patchify" and "stem.0.bias" in resume.get("model", {}):
        # the third release called its biased patchify stem "patchify": the weights say which one it was
        saved["op_set"] = {**op_set, "stem": "patchify_bias"}
    # a field added since the checkpoint was written (cost_weight, latency, ...) has its default there
    defaults = {f.name: f.default for f in dataclasses.fields(SearchConfig if phase == "search" else EvalConfig)}
    changed = sorted(k for k in config if k not in ("data_dir", "cuda_graphs")  # where, and how fast: not what
                     and not _same_setting(k, saved.get(k, defaults.get(k)), config[k]))
    if changed:
        raise ConfigError(f"checkpoint was written with a different config ({', '.join(changed)}); "
                          "resume with the same settings or start a new run")
