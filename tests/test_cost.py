"""Cost-aware search: the expected-cost term's tables, its gradient, lambda = 0 as plain DARTS, and cells
that get cheaper as lambda grows (digits, fixed seed)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nas.complexity import complexity
from nas.config import SearchConfig
from nas.cost import cost_term, op_costs
from nas.errors import ConfigError
from nas.opsets import OP_SETS
from nas.search_network import SearchNetwork
from nas.train import run_search


def test_cost_tables_follow_the_ops():
    model = SearchNetwork(OP_SETS["pibconv"], 4, 3, 2, 10, 3)
    prims = OP_SETS["pibconv"].primitives
    for metric in ("gmac", "params"):
        normal, reduce = op_costs(model, metric, (3, 16, 16))
        assert normal.shape == reduce.shape == (5, len(prims)) and (normal >= 0).all()
        col = {p: i for i, p in enumerate(prims)}
        for table in (normal, reduce):
            assert (table[:, col["none"]] == 0).all() and (table[:, col["max_pool_3x3"]] == 0).all()
            assert (table[:, col["pib_conv_7x7"]] > table[:, col["pib_conv_3x3"]]).all()
            assert (table[:, col["pib_conv_3x3"]] > table[:, col["dil_conv_3x3"]]).all()
    # GMACs: the reduction cell's stride-2 edges (0, 1, 2, 3 read the cell's inputs) cost a quarter per channel
    normal, _ = op_costs(model, "gmac", (3, 16, 16))
    assert normal.sum() > 0


def test_cost_gradient_is_added_exactly():
    torch.manual_seed(0)
    model = SearchNetwork(OP_SETS["pibconv"], 4, 3, 2, 10, 1)
    term = cost_term(model, "gmac", 2.5, (1, 8, 8))
    assert cost_term(model, "gmac", 0.0, (1, 8, 8)) is None  # lambda 0: plain DARTS, no term at all
    alphas = model.arch_parameters()
    assert term.expected(torch.zeros_like(alphas[0]), torch.zeros_like(alphas[1])).item() == pytest.approx(1.0)
    zeros = [torch.zeros_like(a) for a in alphas]
    grads = term.add_gradients(alphas, zeros)
    leaves = [a.detach().double().requires_grad_() for a in alphas]
    ref = torch.autograd.grad(2.5 * term.expected(*leaves), leaves)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-8)
    assert all(g.abs().sum() > 0 for g in grads)


def test_config_checks():
    with pytest.raises(ConfigError, match="cost_metric: latency needs cost_lut: a table from `dartsweep lut build"):
        SearchConfig(dataset="digits", cost_metric="latency", cost_weight=1.0)
    with pytest.raises(ConfigError, match="cost_metric: must be one of gmac, params, latency"):
        SearchConfig(dataset="digits", cost_metric="flops")
    with pytest.raises(ConfigError, match="cost_weight"):
        SearchConfig(dataset="digits", cost_weight=-1.0)


@pytest.mark.slow
def test_raising_lambda_gives_cheaper_cells(digits):
    """Lambda 0, 1, 10 on digits with one seed: the derived cells' GMACs never increase, and the largest
    lambda's cell is strictly cheaper than plain DARTS'. Lambda 0 with another metric is plain DARTS, bit
    for bit."""
    base = dict(op_set="pibconv", dataset="digits", epochs=2, batch_size=32, channels=4, layers=3, nodes=2,
                order=1, arch_lr=0.03, max_steps_per_epoch=8, seed=0)
    runs = {w: run_search(SearchConfig(**base, cost_weight=w), data=digits, device="cpu") for w in (0.0, 1.0, 10.0)}
    plain = run_search(SearchConfig(**base, cost_metric="params"), data=digits, device="cpu")
    assert plain.genotype == runs[0.0].genotype
    assert [h["alpha_normal"] for h in plain.history] == [h["alpha_normal"] for h in runs[0.0].history]
    gmacs = [complexity(runs[w].genotype, 3, 8, 10, 1, 8).gmac for w in (0.0, 1.0, 10.0)]
    assert gmacs[0] >= gmacs[1] >= gmacs[2] and gmacs[2] < gmacs[0], gmacs
    assert runs[10.0].history[-1]["expected_cost"] < runs[1.0].history[-1]["expected_cost"] < 1.0


def test_cost_aware_sweep_file_sweeps_lambda():
    from sweeps.driver import plan_summary, trial_table
    from sweeps.spec import load_sweep

    spec = load_sweep("cost_aware")
    rows = [r for r in trial_table(spec) if r["stage"] == "search"]
    assert [r["cost_weight"] for r in rows] == [0.0, 0.1, 0.5, 2.0]
    assert plan_summary(spec, trial_table(spec)).startswith("4 search trial(s)")


@pytest.mark.slow
def test_lambda_axis_in_a_sweep(tmp_path):
    ray = pytest.importorskip("ray")
    from analysis.frames import load_frames
    from sweeps.driver import run_sweep
    from sweeps.spec import parse_sweep
    from tests.ray_helpers import sweep_file

    if ray.is_initialized():
        ray.shutdown()
    raw = sweep_file(tmp_path, "lam", search={"op_sets": ["pibconv"], "cost_weight": [0.0, 10.0], "epochs": 2,
                                              "arch_lr": 0.03},
                     evaluation={"genotypes": ["searched"], "layers": [1], "epochs": 1})
    path = run_sweep(parse_sweep(raw), storage=str(tmp_path), verbose=0)
    trials, _ = load_frames(path)
    search = trials[trials.stage == "search"].sort_values("cost_weight")
    assert list(search.cost_weight) == [0.0, 10.0] and (trials.status == "finished").all()
    assert all(Path(d).name.startswith(("search_pibconv_lam0_", "search_pibconv_lam10_")) for d in search.trial_dir)
    evals = trials[trials.stage == "eval"]
    assert set(evals.cost_weight) <= {0.0, 10.0} and evals.cell.str.contains("lambda").all()


# ---------------------------------------------------------------------------------------- latency as the cost

SEARCH = dict(op_set="pibconv", dataset="digits", channels=4, layers=3, nodes=2)


@pytest.fixture(scope="module")
def search_lut(tmp_path_factory):
    """A real table (timed on this CPU, few repeats) for the digits search network: C 4, 3 layers, 8x8."""
    from nas import lut as lut_lib
    from nas.io import write_json_atomic

    table = lut_lib.build_lut(OP_SETS["pibconv"], 4, 3, "cpu", repeats=3, image_size=8)
    path = tmp_path_factory.mktemp("lut") / "lut.json"
    write_json_atomic(path, table)
    return path, table


def test_latency_costs_are_the_tables_ops_at_each_edge(search_lut):
    from nas.lut import KEY_SEP

    path, table = search_lut
    model = SearchNetwork(OP_SETS["pibconv"], 4, 3, 2, 10, 1)
    term = cost_term(model, "latency", 1.0, (1, 8, 8), str(path), "cpu")
    prims = OP_SETS["pibconv"].primitives
    assert term.normal.shape == term.reduce.shape == (5, len(prims))
    assert (term.normal[:, prims.index("none")] == 0).all() and (term.normal >= 0).all()

    def ms(op, c, stride, h):
        net = table["ops"][KEY_SEP.join(map(str, (op, c, stride, h)))]
        return max(0.0, net - table["ops"][KEY_SEP.join(map(str, ("none", c, stride, h)))])

    # layers 3: cells 0 (normal, C 4, 8x8), 1 (reduce, C 8, 8x8 in), 2 (reduce, C 16, 4x4 in)
    p = prims.index("pib_conv_5x5")
    assert term.normal[0, p].item() == pytest.approx(ms("pib_conv_5x5", 4, 1, 8))
    assert term.reduce[0, p].item() == pytest.approx(ms("pib_conv_5x5", 8, 2, 8) + ms("pib_conv_5x5", 16, 2, 4))
    assert term.reduce[4, p].item() == pytest.approx(ms("pib_conv_5x5", 8, 1, 4) + ms("pib_conv_5x5", 16, 1, 2))


def test_latency_cost_search_runs_and_reports_its_expected_cost(search_lut, digits):
    path, _ = search_lut
    result = run_search(SearchConfig(**SEARCH, epochs=1, batch_size=32, max_steps_per_epoch=2, cost_metric="latency",
                                     cost_weight=1.0, cost_lut=str(path)), data=digits, device="cpu")
    assert 0 < result.history[-1]["expected_cost"] < 2


def test_a_lut_for_another_network_is_refused_naming_the_mismatch(search_lut, tmp_path):
    from nas.io import write_json_atomic

    path, table = search_lut
    with pytest.raises(ConfigError, match="LUT was built for channels 4, but the search runs at channels 8"):
        SearchConfig(**{**SEARCH, "channels": 8}, cost_metric="latency", cost_lut=str(path))
    with pytest.raises(ConfigError, match="LUT was built for layers 3, but the search runs at layers 5"):
        SearchConfig(**{**SEARCH, "layers": 5}, cost_metric="latency", cost_lut=str(path))
    with pytest.raises(ConfigError, match="LUT was built for op set pibconv, which lacks sep_conv_3x3"):
        SearchConfig(**{**SEARCH, "op_set": "darts"}, cost_metric="latency", cost_lut=str(path))
    with pytest.raises(ConfigError, match="LUT was built for op set pibconv, which has options"):
        SearchConfig(**SEARCH, bottleneck_ratio=3.0, cost_metric="latency", cost_lut=str(path))
    with pytest.raises(ConfigError, match="cost_lut: is read only with cost_metric: latency"):
        SearchConfig(**SEARCH, cost_lut=str(path))
    with pytest.raises(ConfigError, match="not a readable LUT file"):
        SearchConfig(**SEARCH, cost_metric="latency", cost_lut=str(tmp_path / "missing.json"))
    model = SearchNetwork(OP_SETS["pibconv"], 4, 3, 2, 10, 1)
    with pytest.raises(ConfigError, match="built for device cpu, but the search runs at device cuda"):
        cost_term(model, "latency", 1.0, (1, 8, 8), str(path), "cuda")
    with pytest.raises(ConfigError, match="built for image size 8, but the search runs at image size 32"):
        cost_term(model, "latency", 1.0, (1, 32, 32), str(path), "cpu")
    gpu_lut = tmp_path / "gpu.json"
    write_json_atomic(gpu_lut, {**table, "device_type": "cuda"})
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\ndataset: digits\nsearch:\n  op_sets: [pibconv]\n  channels: 4\n  layers: 3\n"
                     "  nodes: 2\n  cost_metric: latency\n  cost_weight: [0.0, 1.0]\n  cost_lut: gpu.json\n"
                     "  resources: {cpu: 1, gpu: 0}\n")
    out = subprocess.run([sys.executable, "-m", "nas.cli", "sweep", "run", str(sweep), "--storage",
                          str(tmp_path / "results"), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "search.cost_lut" in out.stderr and "built for device cuda, but the trials run on cpu" in out.stderr
    cli = subprocess.run([sys.executable, "-m", "nas.cli", "search", "--dataset", "digits", "--channels", "4",
                          "--layers", "3", "--nodes", "2", "--cost-metric", "latency", "--cost-weight", "1",
                          "--cost-lut", str(gpu_lut), "--device", "cpu", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "built for device cuda" in cli.stderr
    assert not (tmp_path / "run").exists()


def test_a_sweep_file_resolves_its_lut_against_its_folder(search_lut, tmp_path):
    import shutil

    from sweeps.spec import load_sweep

    path, _ = search_lut
    (tmp_path / "tables").mkdir()
    shutil.copy(path, tmp_path / "tables" / "cpu.json")
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\ndataset: digits\nsearch:\n  op_sets: [pibconv]\n  channels: 4\n  layers: 3\n"
                     "  nodes: 2\n  cost_metric: latency\n  cost_weight: [0.0, 1.0]\n  cost_lut: tables/cpu.json\n")
    spec = load_sweep(sweep)
    assert spec.search.base["cost_lut"] == str(tmp_path / "tables" / "cpu.json")
    assert spec.raw["search"]["cost_lut"] == str(tmp_path / "tables" / "cpu.json")  # frozen absolute


def test_a_sweep_file_may_spell_the_cost_as_one_mapping(tmp_path):
    """``search.cost: {metric, weight, lut}``: the same search settings as the flat keys; the frozen file
    holds the flat ones; bad shapes and a key given both ways are one-line errors."""
    from sweeps.spec import load_sweep

    body = "name: s\ndataset: digits\nsearch:\n  op_sets: [pibconv]\n  channels: 4\n  layers: 3\n  nodes: 2\n"
    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yaml"
    nested.write_text(body + "  cost: {metric: params, weight: [0.0, 0.5]}\n")
    flat.write_text(body + "  cost_metric: params\n  cost_weight: [0.0, 0.5]\n")
    a, b = load_sweep(nested), load_sweep(flat)
    assert a.search.axes["cost_weight"] == b.search.axes["cost_weight"] == [0.0, 0.5]
    assert a.search.base == b.search.base and a.search.base["cost_metric"] == "params"
    assert "cost" not in a.raw["search"] and a.raw["search"]["cost_weight"] == [0.0, 0.5]
    assert a.raw == b.raw  # the frozen sweep.yaml holds one spelling
    for extra, message in (("  cost: 0.5\n", "search.cost: must be a mapping"),
                           ("  cost: {metric: gmac, lamda: 1}\n", "search.cost: unknown key(s) 'lamda'"),
                           ("  cost: {weight: 1}\n  cost_weight: [0, 1]\n", "also given as cost_weight"),
                           ("  cost: {metric: flops, weight: 1}\n", "cost_metric: must be one of gmac, params")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(body + extra)
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_sweep(bad)


def test_lut_build_cli_builds_for_the_search_networks_input_size(tmp_path):
    """``dartsweep lut build --image-size 8``: a table for a digits search network (8x8 inputs), which the
    latency cost then accepts."""
    import json

    out = subprocess.run([sys.executable, "-m", "nas.cli", "lut", "build", "--op-set", "pibconv", "--channels", "4",
                          "--layers", "3", "--image-size", "8", "--out", str(tmp_path / "lut.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    table = json.loads((tmp_path / "lut.json").read_text())
    assert table["image_size"] == 8 and {k.split("|")[3] for k in table["ops"]} == {"8", "4", "2"}
    model = SearchNetwork(OP_SETS["pibconv"], 4, 3, 2, 10, 1)
    assert cost_term(model, "latency", 1.0, (1, 8, 8), str(tmp_path / "lut.json"), "cpu").normal.sum() > 0
