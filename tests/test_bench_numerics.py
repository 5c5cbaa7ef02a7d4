"""The fast step computes the same thing as the plain research-code step (gradients of weights and alpha)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from nas import architect
from nas.bench import busy_cores, contended_rounds, contention_warning, sampled_gpu_busy
from nas.reference import PlainArchitect, plain_network
from nas.ops import OpOptions
from nas.opsets import OpSet
from nas.search_network import SearchNetwork
from nas.train import autocast_factory

# two ops that open with the activation (they share act(x) in the fast MixedOp) and PIBConv's grouped conv;
# GELU everywhere (activation_scope: all) keeps the network smooth, so the second-order finite differences
# of the two implementations agree to rounding (a ReLU kink between w + eps v and w - eps v would not)
OPS = OpSet(("none", "skip_connect", "pib_conv_3x3", "dil_conv_3x3", "conv_7x1_1x7", "avg_pool_3x3", "max_pool_3x3"),
            OpOptions("gelu", "bn", 2.0, activation_scope="all"))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def twins(checkpoint_cells=False):
    """A fast network (channels_last, 'none' skipped) and a plain one (NCHW, every op) with equal weights."""
    torch.manual_seed(0)
    plain = plain_network(OPS, 4, 3, num_classes=3, in_channels=3, nodes=2).double()
    fast = SearchNetwork(OPS, 4, 3, 2, 3, 3, checkpoint_cells=checkpoint_cells).double()
    state = {}
    for name, value in plain.state_dict().items():
        parts = name.split(".")
        if "ops" in parts:  # plain ops are indexed over every primitive, fast ones skip 'none'
            i = parts.index("ops")
            edge = fast.get_submodule(".".join(parts[:i]))
            j = int(parts[i + 1])
            if j not in edge.index:
                continue
            parts[i + 1] = str(edge.index.index(j))
        state[".".join(parts)] = value
    fast.load_state_dict(state)
    with torch.no_grad():
        for a, b in zip(fast.arch_parameters(), plain.arch_parameters()):
            a.normal_(0, 0.3)
            b.copy_(a)
    fast = fast.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    batches = [(x[:4], torch.tensor([0, 1, 2, 0])), (x[4:], torch.tensor([2, 1, 0, 1]))]
    return fast, plain, batches


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("checkpoint_cells", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_weight_gradients_match(checkpoint_cells, device):
    fast, plain, ((x, y), _) = twins(checkpoint_cells)
    fast, plain, x, y = fast.to(device), plain.to(device), x.to(device), y.to(device)
    F.cross_entropy(fast(x.contiguous(memory_format=torch.channels_last)), y).backward()
    F.cross_entropy(plain(x), y).backward()
    fw = {n: p.grad for n, p in fast.named_weights().items()}
    for n, p in plain.named_weights().items():
        parts = n.split(".")
        if "ops" in parts:
            i = parts.index("ops")
            edge = fast.get_submodule(".".join(parts[:i]))
            parts[i + 1] = str(edge.index.index(int(parts[i + 1])))
        torch.testing.assert_close(fw[".".join(parts)], p.grad)
    torch.testing.assert_close(flat([a.grad for a in fast.arch_parameters()]),
                               flat([a.grad for a in plain.arch_parameters()]))


def test_weight_step_without_alpha_in_the_graph_gives_the_same_weight_gradients():
    fast, _, ((x, y), _) = twins()
    x = x.contiguous(memory_format=torch.channels_last)
    alphas = fast.arch_parameters()
    F.cross_entropy(fast(x), y).backward(inputs=fast.weights())  # alpha in the graph
    with_alpha = flat([w.grad for w in fast.weights()])
    fast.zero_grad(set_to_none=True)
    alphas[1].requires_grad_(False)  # a frozen alpha stays frozen afterwards
    with architect.without_grad(alphas):
        assert not any(a.requires_grad for a in alphas)
        loss = F.cross_entropy(fast(x), y)
    loss.backward()
    assert [a.requires_grad for a in alphas] == [True, False] and all(a.grad is None for a in alphas)
    torch.testing.assert_close(flat([w.grad for w in fast.weights()]), with_alpha)


def test_plain_network_has_only_research_code_modules():
    """The bench's baseline runs nn.Conv2d / nn.BatchNorm2d / DARTS' FactorizedReduce, never a CPU rewrite."""
    from nas.kernels import DepthwiseConv2d, GroupedConv2d, LeanBatchNorm2d, PointwiseConv2d
    from nas.ops import FactorizedReduce
    from nas.reference import ReferenceFactorizedReduce

    rewrites = {DepthwiseConv2d, GroupedConv2d, PointwiseConv2d, LeanBatchNorm2d, FactorizedReduce}
    fast, plain, _ = twins()
    assert rewrites <= {type(m) for m in fast.modules()}
    plain_kinds = {type(m) for m in plain.modules()}
    assert not rewrites & plain_kinds
    assert ReferenceFactorizedReduce in plain_kinds


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", [1, 2])
def test_alpha_gradients_match_plain_darts(order, device):
    """On CUDA the fast network runs the native kernels (no CPU rewrites): it must agree just the same."""
    fast, plain, (train, valid) = twins()
    fast, plain = fast.to(device), plain.to(device)
    train, valid = [(x.to(device), y.to(device)) for x, y in (train, valid)]
    opt_f = torch.optim.SGD(fast.weights(), 0.1, momentum=0.9, weight_decay=3e-4)
    opt_p = torch.optim.SGD(plain.weights(), 0.1, momentum=0.9, weight_decay=3e-4)
    for model, opt in ((fast, opt_f), (plain, opt_p)):  # one weight step: momentum buffers in play
        opt.zero_grad()
        F.cross_entropy(model(train[0]), train[1]).backward()
        opt.step()
    if order == 2:
        before = [w.detach().clone() for w in fast.weights()]
        g_fast = architect.second_order_alpha_grads(fast, train, valid, 0.1, 0.9, 3e-4,
                                                    architect.momentum_buffers(opt_f, fast))
        # the unrolled and finite-difference weights were written into the network: the originals are back,
        # bit for bit and in their memory layout
        assert all(torch.equal(w, b) and w.stride() == b.stride() for w, b in zip(fast.weights(), before))
    else:
        g_fast = architect.first_order_alpha_grads(fast, valid)
    ref = PlainArchitect(plain, lambda: plain_network(OPS, 4, 3, 3, 3, 2).double().to(device), 0.9, 3e-4)
    g_plain = ref.alpha_grads(train, valid, 0.1, opt_p, unrolled=order == 2)
    torch.testing.assert_close(flat(g_fast), flat(g_plain), rtol=1e-5, atol=1e-8)


def test_second_order_unchanged_by_cell_checkpointing():
    grads = []
    for checkpoint_cells in (False, True):
        fast, _, (train, valid) = twins(checkpoint_cells)
        buffers = {n: torch.full_like(p, 0.01) for n, p in fast.named_weights().items()}
        grads.append(flat(architect.second_order_alpha_grads(fast, train, valid, 0.1, 0.9, 3e-4, buffers)))
    torch.testing.assert_close(grads[0], grads[1])


def test_cell_checkpointing_updates_bn_statistics_once():
    stats = []
    for checkpoint_cells in (False, True):
        fast, _, (train, valid) = twins(checkpoint_cells)
        buffers = {n: torch.full_like(p, 0.01) for n, p in fast.named_weights().items()}
        architect.second_order_alpha_grads(fast, train, valid, 0.1, 0.9, 3e-4, buffers)
        F.cross_entropy(fast(train[0]), train[1]).backward()
        stats.append({n: b.clone() for n, b in fast.named_buffers()})
    assert stats[0].keys() == stats[1].keys()
    for name in stats[0]:
        torch.testing.assert_close(stats[1][name], stats[0][name], msg=name)


def test_keep_freed_memory_stops_page_faults_on_reallocation():
    code = """
import resource, torch
from nas.train import keep_freed_memory
def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        t = torch.ones(24 << 20); del t  # 96 MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
before = faults()
assert keep_freed_memory() is True
faults()
print(before, faults())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert before > 4 * 20000  # glibc's default: every 96 MB block is mmapped and faulted in again
    assert after < 1000


def test_mixed_precision_is_a_switch_on_only_for_cuda():
    import contextlib

    assert autocast_factory(None, torch.device("cpu")) is contextlib.nullcontext
    assert autocast_factory(False, torch.device("cuda")) is contextlib.nullcontext
    ctx = autocast_factory(True, torch.device("cpu"))()
    assert isinstance(ctx, torch.autocast)


@needs_cuda
def test_cuda_step_runs_with_bf16_and_channels_last():
    fast, _, ((x, y), _) = twins()
    fast = fast.float().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(fast(x.float().cuda().contiguous(memory_format=torch.channels_last)).float(), y.cuda())
    loss.backward()
    assert torch.isfinite(loss)


def bench_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``dartsweep bench ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "nas.cli", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_bench_cli_json_smoke():
    proc = bench_cli("search", "--order", "1", "--C", "4", "--layers", "2", "--size", "8", "--batch", "4", "--steps",
                     "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"fast", "plain", "speedup", "memory_ratio"}
    assert out["fast"]["images_per_s"] > 0 and out["plain"]["images_per_s"] > 0
    assert out["speedup"] == pytest.approx(out["fast"]["images_per_s"] / out["plain"]["images_per_s"])
    for side in ("fast", "plain"):  # CPU seconds per wall second of the timed steps: within the threads' share
        assert 0 < out[side]["cpu_busy"] <= out["config"]["threads"] + 0.1


def test_bench_repeats_alternate_sides_and_report_medians():
    proc = bench_cli("data", "--batch", "8", "--repeats", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    rounds = out["rounds"]
    assert len(rounds) == 3
    for r in rounds:
        assert r["speedup"] == pytest.approx(r["fast"]["images_per_s"] / r["plain"]["images_per_s"])
    assert out["speedup"] == pytest.approx(sorted(r["speedup"] for r in rounds)[1])
    assert out["fast"]["images_per_s"] == pytest.approx(sorted(r["fast"]["images_per_s"] for r in rounds)[1])
    bad = bench_cli("data", "--repeats", "0", timeout=120)
    assert bad.returncode == 2 and "--repeats must be at least 1" in bad.stderr


def test_contention_warning_names_the_busy_cores_and_the_thread_count_that_fits():
    line = contention_warning(1.0, 2, 2)
    assert line is not None and "1.0 of the 2 cores" in line and "--threads 1" in line
    assert contention_warning(1.0, 2, 1) is None  # one thread fits beside the other process
    assert contention_warning(0.1, 2, 2) is None  # an idle machine
    assert contention_warning(None, 2, 2) is None  # no /proc/stat
    assert "--threads 13" in contention_warning(2.5, 16, 16)


def test_contended_rounds_flags_each_side_whose_threads_lost_their_cores():
    result = {"rounds": [{"fast": {"cpu_busy": 1.96}, "plain": {"cpu_busy": 1.97}},
                         {"fast": {"cpu_busy": 1.31}, "plain": {"cpu_busy": 1.95}},
                         {"fast": {"images_per_s": 1.0}, "plain": {"images_per_s": 1.0}}]}  # data bench: no figure
    lines = contended_rounds(result, 2)
    assert len(lines) == 1 and "round 2, fast" in lines[0] and "1.31 cores" in lines[0]
    assert contended_rounds(result, 1) == []


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_busy_cores_sees_a_spinning_process():
    cores = set(sorted(os.sched_getaffinity(0))[:1])
    spinner = subprocess.Popen([sys.executable, "-c", "import os, time\n"
                                f"os.sched_setaffinity(0, {cores!r})\n"
                                "t = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.5)
        busy = busy_cores(cores, 0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and 0.7 <= busy <= 1.0


def test_gpu_busy_is_only_sampled_on_cuda():
    with sampled_gpu_busy(torch.device("cpu"), every_s=0.01) as samples:
        time.sleep(0.05)
    assert samples == []


@needs_cuda
def test_gpu_busy_sees_a_busy_gpu_and_an_idle_one():
    try:
        torch.cuda.utilization()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no NVML: {exc}")
    a = torch.randn(4096, 4096, device="cuda")
    with sampled_gpu_busy(torch.device("cuda"), every_s=0.05) as busy:
        end = time.perf_counter() + 3
        while time.perf_counter() < end:
            for _ in range(20):
                a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()
    with sampled_gpu_busy(torch.device("cuda"), every_s=0.05) as idle:
        time.sleep(3)
    assert len(busy) > 10 and sum(busy) / len(busy) > 0.8
    assert len(idle) > 10 and sum(idle) / len(idle) < 0.2


def test_bench_pack_runs_trials_side_by_side():
    proc = bench_cli("pack", "--trials", "2,1", "--seconds", "1", "--C", "4", "--layers", "1", "--batch", "8", "--size",
                     "8", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    rows = out["rows"]
    assert [r["trials"] for r in rows] == [1, 2]
    assert rows[0]["gain"] == pytest.approx(1.0)
    assert rows[1]["gain"] == pytest.approx(rows[1]["images_per_s"] / rows[0]["images_per_s"])
    assert rows[1]["per_trial_images_per_s"] == pytest.approx(rows[1]["images_per_s"] / 2)
    assert all(r["images_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    best = max(r["images_per_s"] for r in rows)
    assert out["recommended_trials"] == min(r["trials"] for r in rows if r["images_per_s"] >= 0.9 * best)
    bad = bench_cli("pack", "--trials", "0")
    assert bad.returncode == 2 and "--trials" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_bench_pack_search_trials_train_the_search_step():
    """Search trials share a device too (--phase search): each runs the fast alpha + weight step."""
    proc = bench_cli("pack", "--phase", "search", "--order", "1", "--trials", "1,2", "--seconds", "1", "--C", "4",
                     "--layers", "2", "--batch", "4", "--size", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["config"]["phase"] == "search" and out["config"]["order"] == 1 and out["config"]["layers"] == 2
    assert [r["trials"] for r in out["rows"]] == [1, 2] and all(r["images_per_s"] > 0 for r in out["rows"])
    assert "2 search trial(s) at once" in proc.stderr
    bad = bench_cli("pack", "--phase", "weights")
    assert bad.returncode == 2 and "--phase" in bad.stderr


def test_count_ops_is_deterministic_and_follows_the_code_path():
    """ATen ops per step, the yardstick that needs no GPU: the same count every time; the CUDA path (native
    kernels, bf16 autocast) dispatches other ops than the CPU rewrites do."""
    def count(*extra):
        out = subprocess.run([sys.executable, "-m", "nas.cli", "bench", "search", "--order", "1", "--C", "4",
                              "--layers", "2", "--batch", "2", "--size", "8", "--count-ops", "--json", *extra],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["ops_per_step"]

    cuda, again, cpu = count(), count(), count("--path", "cpu")
    assert cuda == again and all(v > 1000 for v in cuda.values())
    assert cuda["plain"] == cpu["plain"] and cuda["fast"] != cpu["fast"]
