import io
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nas import architect
from nas.config import EvalConfig, SearchConfig
from nas.data import cutout, random_crop, random_flip
from nas.errors import ConfigError, DivergenceError
from nas.opsets import OpSet
from nas.ops import OpOptions
from nas.search_network import SearchNetwork
from nas.train import run_eval, run_search

# GELU everywhere (activation_scope: all): a smooth network, so the finite-difference hypergradient is
# compared with the exact one where both are well defined (ReLU's kinks would make the difference noisy)
TINY_OPS = OpSet(("none", "skip_connect", "pib_conv_3x3", "dil_conv_3x3", "avg_pool_3x3"),
                 OpOptions("gelu", "bn", 2.0, activation_scope="all"))


def tiny_search_setup(dtype=torch.float64):
    torch.manual_seed(0)
    model = SearchNetwork(TINY_OPS, channels=4, layers=3, nodes=2, num_classes=3, in_channels=2).to(dtype)
    with torch.no_grad():  # alphas far from uniform so the hypergradient is not trivial
        for a in model.arch_parameters():
            a.normal_(0, 0.5)
    xt, yt = torch.randn(6, 2, 6, 6, dtype=dtype), torch.randint(0, 3, (6,))
    xv, yv = torch.randn(6, 2, 6, 6, dtype=dtype), torch.randint(0, 3, (6,))
    buffers = {n: torch.randn_like(p) * 0.1 for n, p in model.named_weights().items()}
    return model, (xt, yt), (xv, yv), buffers


def cosine(a, b):
    a = torch.cat([t.reshape(-1) for t in a])
    b = torch.cat([t.reshape(-1) for t in b])
    return float(a @ b / (a.norm() * b.norm()))


def test_second_order_matches_exact_hypergradient():
    model, train, valid, buffers = tiny_search_setup()
    xi, momentum, wd = 0.5, 0.9, 3e-4  # a large xi makes the implicit term matter
    approx = architect.second_order_alpha_grads(model, train, valid, xi, momentum, wd, buffers)
    exact = architect.exact_unrolled_alpha_grads(model, train, valid, xi, momentum, wd, buffers)
    first = architect.first_order_alpha_grads(model, valid)
    assert cosine(approx, exact) > 0.99
    # the implicit term matters here: dropping it (or its xi factor) is measurably worse
    assert cosine(first, exact) < cosine(approx, exact)
    d_alpha_only = architect.second_order_alpha_grads(model, train, valid, xi, momentum, wd, buffers)
    assert all(torch.allclose(a, b) for a, b in zip(approx, d_alpha_only))


def test_unrolled_step_matches_sgd_step():
    model, train, _, _ = tiny_search_setup()
    opt = torch.optim.SGD(model.weights(), lr=0.1, momentum=0.9, weight_decay=3e-4)
    for _ in range(2):  # fill momentum buffers
        opt.zero_grad()
        F.cross_entropy(model(train[0]), train[1]).backward()
        opt.step()
    predicted = architect.unrolled_weights(model, train, 0.1, 0.9, 3e-4, architect.momentum_buffers(opt, model))
    opt.zero_grad()
    F.cross_entropy(model(train[0]), train[1]).backward()
    opt.step()
    for name, p in model.named_weights().items():
        torch.testing.assert_close(predicted[name], p.detach())


def test_augmentation_ops():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    crop = random_crop(x, 2, gen)
    assert crop.shape == x.shape
    flipped = random_flip(x, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    ones = torch.ones(64, 1, 32, 32)
    cut = cutout(ones, 16, gen)
    zeros = (cut == 0).sum(dim=(1, 2, 3))
    assert zeros.max() == 256 and zeros.min() > 0  # full square inside, clipped at borders


SEARCH = dict(op_set={"primitives": list(TINY_OPS.primitives), "activation": "gelu"}, dataset="digits",
              channels=4, layers=2, nodes=2, batch_size=16, max_steps_per_epoch=3, epochs=3)


@pytest.mark.parametrize("order", [1, 2])
def test_search_resume_equals_uninterrupted(digits, order):
    cfg = SearchConfig(**SEARCH, order=order)
    full = run_search(cfg, data=digits)
    saved = {}
    with pytest.raises(KeyboardInterrupt):
        def stop_after_one(metrics, make_checkpoint):
            saved["ckpt"] = make_checkpoint()
            raise KeyboardInterrupt
        run_search(cfg, data=digits, on_epoch=stop_after_one)
    # through a real file, loaded with weights_only=True
    buf = io.BytesIO()
    torch.save(saved["ckpt"], buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = run_search(cfg, data=digits, resume=state)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(full.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        torch.testing.assert_close(torch.tensor(a["alpha_normal"]), torch.tensor(b["alpha_normal"]))
    assert resumed.genotype == full.genotype
    assert set(full.history[0]) >= {"train_loss", "train_acc", "valid_loss", "valid_acc", "genotype",
                                   "alpha_normal", "alpha_reduce"}


def test_eval_resume_equals_uninterrupted(digits):
    cfg = EvalConfig(genotype="PIBCONV", dataset="digits", channels=4, layers=2, epochs=3, batch_size=32,
                     max_steps_per_epoch=4)
    full = run_eval(cfg, data=digits)
    states = []

    def keep_epoch_2(metrics, make_checkpoint):  # a checkpoint is serialised as soon as it is made
        if metrics["epoch"] == 2:
            buf = io.BytesIO()
            torch.save(make_checkpoint(), buf)
            states.append(buf.getvalue())

    run_eval(cfg, data=digits, on_epoch=keep_epoch_2)
    resumed = run_eval(cfg, data=digits, resume=torch.load(io.BytesIO(states[0]), weights_only=True))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["train_loss"] == pytest.approx(full.history[-1]["train_loss"], rel=1e-6)
    assert resumed.test_acc == pytest.approx(full.test_acc)


def test_resume_rejects_other_config(digits):
    cfg = EvalConfig(genotype="DARTS_V2", dataset="digits", channels=4, layers=1, epochs=1, max_steps_per_epoch=1)
    states = []
    run_eval(cfg, data=digits, on_epoch=lambda m, mk: states.append(mk()))
    other = EvalConfig(**{**cfg.to_dict(), "layers": 2})
    with pytest.raises(ConfigError, match="different config"):
        run_eval(other, data=digits, resume=states[0])


def test_eval_training_learns_digits(digits):
    cfg = EvalConfig(genotype="PIBCONV", dataset="digits", channels=12, layers=3, epochs=4, batch_size=64,
                     lr=0.05)
    result = run_eval(cfg, data=digits)
    assert result.history[-1]["test_acc"] > 60  # chance is 10 %
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_divergence_is_reported(digits):
    cfg = EvalConfig(genotype="DARTS_V2", dataset="digits", channels=4, layers=1, epochs=2, lr=1e30,
                     max_steps_per_epoch=20, grad_clip=1e30)
    with pytest.raises(DivergenceError, match="loss became"):
        run_eval(cfg, data=digits)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nas.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args,message", [
    (["search", "--op-set", "nope"], "unknown op set 'nope'"),
    (["search", "--F", "0"], "bottleneck ratio F must be a positive number"),
    (["search", "--primitives", "none,sep_conv_9x9"], "unknown primitive 'sep_conv_9x9'"),
    (["train", "--genotype", "DARTS_V2", "--layers", "0"], "layers must be"),
    (["complexity", "--genotype", "NOPE", "--layers", "3"], "neither a built-in"),
    (["train", "--genotype", "DARTS_V2", "--layers", "2", "--data-dir", "{tmp}/empty"], "cifar10 not found in"),
])
def test_cli_errors_are_one_line_exit_2(args, message, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = run_cli(*args, "--out", str(tmp_path / "out")) if args[0] != "complexity" else run_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_cli_malformed_genotype_json(tmp_path):
    path = tmp_path / "g.json"
    path.write_text('{"normal": ')
    proc = run_cli("complexity", "--genotype", str(path), "--layers", "2")
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr


def test_cli_complexity_json_and_search_then_train(tmp_path):
    proc = run_cli("complexity", "--genotype", "PIBCONV", "--layers", "5", "--json")
    out = json.loads(proc.stdout)
    assert out["params_m"] == pytest.approx(1.30, rel=0.025) and out["gmac"] == pytest.approx(0.218, rel=0.04)

    search_out = tmp_path / "search"
    proc = run_cli("search", "--dataset", "digits", "--primitives", "none,skip_connect,pib_conv_3x3,max_pool_3x3",
                   "--channels", "4", "--layers", "2", "--nodes", "2", "--epochs", "2", "--batch-size", "16",
                   "--max-steps-per-epoch", "2", "--order", "1", "--out", str(search_out))
    assert proc.returncode == 0, proc.stderr
    assert "epoch 2/2" in proc.stderr
    assert len((search_out / "metrics.jsonl").read_text().splitlines()) == 2
    geno = json.loads((search_out / "genotype.json").read_text())
    assert len(geno["normal"]) == 4
    # the searched genotype trains from its JSON file
    proc = run_cli("train", "--genotype", str(search_out / "genotype.json"), "--layers", "2", "--dataset", "digits",
                   "--channels", "4", "--epochs", "1", "--max-steps-per-epoch", "2", "--out", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr
    assert 0 <= json.loads(proc.stdout)["test_acc"] <= 100
    # an existing run is never overwritten; --resume of a finished run is a no-op that keeps its results
    again = run_cli("search", "--dataset", "digits", "--out", str(search_out))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert len((search_out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("phase", ["search", "eval"])
def test_amp_on_cpu_trains_like_float32(digits, phase):
    """``amp: true`` on CPU (bf16 autocast): the CPU conv rewrites are custom autograd Functions, and
    autocast casts in their forward but not in their backward, where the weight step's bf16 gradients met
    float32 weights; under autocast the native convs run. PIBConv's 5x5/7x7 and grouped convs included."""
    losses = {}
    for amp in (False, True):
        if phase == "search":
            cfg = SearchConfig(op_set="pibconv", dataset="digits", channels=4, layers=2, nodes=2, batch_size=16,
                               max_steps_per_epoch=2, epochs=1, order=2, amp=amp)
            history = run_search(cfg, data=digits).history
        else:
            cfg = EvalConfig(genotype="PIBCONV", dataset="digits", channels=4, layers=2, epochs=1, batch_size=32,
                             max_steps_per_epoch=3, amp=amp)
            history = run_eval(cfg, data=digits).history
        losses[amp] = history[-1]["train_loss"]
    assert math.isfinite(losses[True])
    assert losses[True] == pytest.approx(losses[False], rel=0.01)  # 1e-4 apart here


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_config(phase, **kw):
    if phase == "search":
        return SearchConfig(**{"op_set": "pibconv", "dataset": "digits", "channels": 4, "layers": 3, "nodes": 2,
                               "batch_size": 16, "epochs": 2, "max_steps_per_epoch": 6, **kw})
    return EvalConfig(**{"genotype": "PIBCONV", "dataset": "digits", "channels": 8, "layers": 3, "epochs": 2,
                         "batch_size": 32, "max_steps_per_epoch": 6, **kw})


@needs_cuda
@pytest.mark.parametrize("phase", ["search", "eval"])
def test_cuda_resume_equals_uninterrupted(digits, phase, monkeypatch):
    """On CUDA with its defaults (bf16 autocast, channels_last, data and augmentation on the GPU, a CUDA
    generator whose state the checkpoint carries)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    run = run_search if phase == "search" else run_eval
    cfg = _cuda_config(phase)
    full = run(cfg, data=digits, device="cuda")
    saved = io.BytesIO()

    def keep_epoch_1(metrics, make_checkpoint):
        if metrics["epoch"] == 1:
            torch.save(make_checkpoint(), saved)

    run(cfg, data=digits, device="cuda", on_epoch=keep_epoch_1)
    saved.seek(0)
    resumed = run(cfg, data=digits, device="cuda", resume=torch.load(saved, weights_only=True))
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for key in ("train_loss", "train_acc"):
        assert math.isfinite(full.history[-1][key])
        assert resumed.history[-1][key] == pytest.approx(full.history[-1][key], rel=1e-5)


@needs_cuda
@pytest.mark.parametrize("phase", ["search", "eval"])
@pytest.mark.parametrize("order", [1, 2])
def test_cuda_training_steps_never_wait_on_the_gpu(digits, phase, order):
    """No host-device sync inside an epoch's steps (a ``.item()`` per step idles the GPU while the next step
    is launched): steps 2 to 5 run under CUDA's sync debug mode set to raise."""
    if phase == "eval" and order == 2:
        pytest.skip("order is a search setting")
    cfg = _cuda_config(phase, epochs=1, **({"order": order} if phase == "search" else {}))

    def on_step(step, steps):
        torch.cuda.set_sync_debug_mode("error" if 1 <= step < steps - 1 else "default")

    try:
        history = (run_search if phase == "search" else run_eval)(cfg, data=digits, device="cuda",
                                                                  on_step=on_step).history
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(history[-1]["train_loss"])


def test_divergence_names_the_steps_it_happened_in(digits):
    cfg = EvalConfig(genotype="DARTS_V2", dataset="digits", channels=4, layers=1, epochs=1, lr=1e30,
                     max_steps_per_epoch=7, grad_clip=1e30)
    with pytest.raises(DivergenceError, match=r"loss became nan at epoch 1 \(steps 1-7\)"):
        run_eval(cfg, data=digits)


def test_resume_accepts_a_checkpoint_from_before_a_new_setting(digits):
    """A checkpoint written before a config field existed (cost_weight, latency) resumes when the run uses
    that field's default, and is refused when it does not."""
    from nas.train import _check_resume

    config = SearchConfig(dataset="digits", epochs=1).to_dict()
    old = {k: v for k, v in config.items() if k not in ("cost_metric", "cost_weight")}
    _check_resume({"phase": "search", "config": old}, "search", config)
    with pytest.raises(ConfigError, match="cost_weight"):
        _check_resume({"phase": "search", "config": old}, "search", {**config, "cost_weight": 1.0})
    eval_config = EvalConfig(dataset="digits", epochs=1).to_dict()
    _check_resume({"phase": "eval", "config": {k: v for k, v in eval_config.items() if k != "latency"}}, "eval",
                  eval_config)


def test_weight_step_equals_backward_then_step():
    """``nas.train.weight_step`` hands autograd.grad's gradients to the optimiser instead of calling
    backward(): the same update, bit for bit, and a parameter the loss does not use is left alone."""
    from nas.train import weight_step

    updated = []
    for use_weight_step in (False, True):
        torch.manual_seed(0)
        model = SearchNetwork(OpSet(("none", "skip_connect", "pib_conv_3x3", "max_pool_3x3")), 4, 2, 2, 3, 1)
        unused = torch.nn.Parameter(torch.ones(3))
        params = model.weights() + [unused]
        opt = torch.optim.SGD(params, 0.1, momentum=0.9, weight_decay=3e-4, foreach=True)
        x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if use_weight_step:
                weight_step(opt, params, loss, 0.5)
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 0.5, foreach=True)
                opt.step()
        assert unused.grad is None and torch.equal(unused, torch.ones(3))
        updated.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*updated))
