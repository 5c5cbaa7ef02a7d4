"""The networks compute what the released PIBConv code computes: where the activation sits, the stems,
BN after pooling, the released op list; and sweeps written by the first release keep their networks."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from nas.eval_network import EvalNetwork
from nas.genotypes import PIBCONV, Genotype
from nas.ops import FactorizedReduce, LayerNorm2d, OpOptions, build_op
from nas.opsets import OP_SETS, PIBCONV_RELEASED_OPS, OpSet, first_release_op_set_id, resolve_op_set
from nas.search_network import SearchNetwork

FIXTURE = Path(__file__).parent / "data" / "first_release_sweep"
DATA = Path(__file__).parent / "data"


def activations(module: nn.Module) -> list[str]:
    return [type(m).__name__ for m in module.modules() if isinstance(m, (nn.ReLU, nn.GELU))]


def released_pseudo_inv_bn(c: int, k: int, affine: bool) -> nn.Sequential:
    """cnn/operations.py ``PseudoInvBn`` of mahdihosseini/PIBConv, transcribed."""
    return nn.Sequential(
        nn.Conv2d(c, c, k, stride=1, padding=k // 2, groups=c, bias=False), nn.BatchNorm2d(c, affine=affine),
        nn.Conv2d(c, 2 * c, 1, bias=False), nn.Conv2d(2 * c, c, k, padding=k // 2, groups=c, bias=False),
        nn.GELU(), nn.Conv2d(c, c, 1, bias=False))


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("affine", [True, False])
def test_pib_block_computes_the_released_block(k, affine):
    torch.manual_seed(0)
    ours = build_op(f"pib_conv_{k}x{k}", 8, 1, affine, OP_SETS["pibconv"].options).double()
    released = released_pseudo_inv_bn(8, k, affine).double()
    released.load_state_dict(dict(zip(released.state_dict(), ours.state_dict().values())))
    x = torch.randn(4, 8, 7, 7, dtype=torch.float64)
    for train in (True, False):
        ours.train(train), released.train(train)
        torch.testing.assert_close(ours(x), released(x), rtol=1e-10, atol=1e-12)


def test_pibconv_eval_cell_has_gelu_only_inside_the_pib_blocks():
    net = EvalNetwork(PIBCONV, channels=8, layers=5, num_classes=10, auxiliary=True)
    pib_blocks = sum(op.startswith("pib_conv_") for op, _ in PIBCONV.normal) * 3 + \
        sum(op.startswith("pib_conv_") for op, _ in PIBCONV.reduce) * 2  # 3 normal and 2 reduction cells
    assert activations(net).count("GELU") == pib_blocks
    for cell in net.cells:
        assert activations(cell.pre0)[:1] == activations(cell.pre1)[:1] == ["ReLU"]  # ReLUConvBN / FactorizedReduce
    reduce_cell = next(c for c in net.cells if c.reduction)
    dil = [m for m in reduce_cell.modules() if isinstance(m, nn.Sequential) and len(m) == 4 and
           isinstance(m[1], nn.Conv2d) and m[1].dilation == (2, 2)]
    assert dil and all(isinstance(m[0], nn.ReLU) for m in dil)  # dil_conv_5x5 keeps ReLU
    # GELU everywhere (the first release's, and an explicit choice): preprocessing and dil_conv too
    everywhere = Genotype.from_dict({**PIBCONV.to_dict(), "options": {**PIBCONV.to_dict()["options"],
                                                                      "activation_scope": "all"}})
    assert "ReLU" not in activations(EvalNetwork(everywhere, 8, 5, 10, auxiliary=False).cells)
    assert everywhere.id == "PIBCONV-gelu_all" and PIBCONV.id == "PIBCONV"


def test_search_networks_stems_pooling_bn_and_op_lists():
    assert OP_SETS["pibconv_released"].primitives == ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
                                                      "pib_conv_3x3", "pib_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
    assert PIBCONV_RELEASED_OPS == OP_SETS["pibconv_released"].primitives and len(OP_SETS["pibconv"].primitives) == 10
    x = torch.randn(2, 3, 32, 32)
    for name, stem, pooling_bn in (("pibconv", "conv3x3", False), ("pibconv_released", "patchify", False),
                                   ("darts", "conv3x3", True)):
        op_set = OP_SETS[name]
        net = SearchNetwork(op_set, channels=4, layers=3, nodes=2)
        assert (op_set.stem, op_set.pooling_bn) == (stem, pooling_bn)
        first = net.stem[0]
        if stem == "patchify":  # 4x4 stride-4 conv, padding 1, then a channels-first LayerNorm: 32x32 -> 8x8
            assert (first.kernel_size, first.stride, first.padding) == ((4, 4), (4, 4), (1, 1))
            assert first.bias is None  # the released model_search.py: nn.Conv2d(3, C, 4, 4, 1, bias=False)
            assert isinstance(net.stem[1], LayerNorm2d) and net.stem(x).shape[-2:] == (8, 8)
            assert net.stem[1].norm.eps == 1e-6 and len(net.stem) == 2
            assert [n for n, _ in net.stem.named_parameters()] == ["0.weight", "1.norm.weight", "1.norm.bias"]
        else:
            assert first.kernel_size == (3, 3) and isinstance(net.stem[1], nn.BatchNorm2d)
            assert net.stem(x).shape[-2:] == (32, 32)
        for edge in net.cells[0].edges:
            pools = [op for op in edge.ops if isinstance(op, (nn.MaxPool2d, nn.AvgPool2d)) or
                     (isinstance(op, nn.Sequential) and isinstance(op[0], (nn.MaxPool2d, nn.AvgPool2d)))]
            assert len(pools) == 2
            assert all(isinstance(op, nn.Sequential) == pooling_bn for op in pools)
        cell = net.cells[0]
        assert activations(cell.pre0)[:1] == activations(cell.pre1)[:1] == ["ReLU"]
        assert net(x).shape == (2, 10)
    # in pibconv's mixed ops GELU sits only in the PIB blocks; every other activation is a ReLU
    edge = SearchNetwork(OP_SETS["pibconv"], 4, 3, 2).cells[0].edges[0]
    for op, name in zip(edge.ops, [p for p in OP_SETS["pibconv"].primitives if p != "none"]):
        assert set(activations(op)) <= ({"GELU"} if name.startswith("pib_conv_") else {"ReLU"}), name


def test_scope_all_and_darts_gelu_separable_convs():
    darts_gelu = OP_SETS["darts_gelu"].options
    assert activations(build_op("sep_conv_3x3", 4, 1, True, darts_gelu)) == ["GELU", "GELU"]  # a block
    assert activations(build_op("dil_conv_3x3", 4, 1, True, darts_gelu)) == ["ReLU"]
    everywhere = OpOptions("gelu", "bn", 2.0, activation_scope="all")
    for name in ("dil_conv_3x3", "conv_7x1_1x7"):
        assert activations(build_op(name, 4, 1, True, everywhere)) == ["GELU"]
    assert isinstance(build_op("skip_connect", 4, 2, True, everywhere).act, nn.GELU)
    reduce = build_op("skip_connect", 4, 2, True, OpOptions("gelu"))
    assert isinstance(reduce, FactorizedReduce) and isinstance(reduce.act, nn.ReLU)


def test_ids_name_the_form():
    assert [resolve_op_set(n).id for n in OP_SETS] == list(OP_SETS)
    first = {n: resolve_op_set(n, first_release=True) for n in OP_SETS if n != "pibconv_released"}
    assert {n: o.id for n, o in first.items()} == {
        "darts": "darts", "darts_gelu": "darts_gelu-gelu_all", "darts_gelu_ln": "darts_gelu_ln-gelu_all",
        "convnext": "convnext-gelu_all", "pibconv": "pibconv-gelu_all-pool_bn"}
    assert all(o.first_release_id == n for n, o in first.items())
    assert resolve_op_set("pibconv", 2.5, first_release=True).id == "pibconv-F2.5-gelu_all-gcd-pool_bn"
    assert first_release_op_set_id("pibconv-F2.5") == "pibconv-F2.5-gelu_all-gcd-pool_bn"
    assert first_release_op_set_id("darts") == "darts" and first_release_op_set_id("custom-12ab") == "custom-12ab"
    custom = OpSet(("none", "skip_connect", "pib_conv_3x3"), OpOptions("gelu"))
    old = OpSet.from_dict({"primitives": ["none", "skip_connect", "pib_conv_3x3"], "activation": "gelu"}, True)
    assert custom.id != old.id and old.id == old.first_release_id  # hashes: the first release's stay stable
    # a searched cell's hash changes with the form; a ReLU cell's does not (the scope changes nothing there)
    cell = {**PIBCONV.to_dict(), "name": None, "options": {"activation": "gelu", "norm": "bn", "bottleneck_ratio": 2.0}}
    new, old = Genotype.from_dict(cell), Genotype.from_dict(cell, first_release=True)
    assert new.id != old.first_release_id and old.id == old.first_release_id + "-gelu_all"
    relu = {**cell, "options": {"activation": "relu", "norm": "bn", "bottleneck_ratio": 2.0}}
    assert Genotype.from_dict(relu).id == Genotype.from_dict(relu, first_release=True).id


@pytest.mark.parametrize("field,value,message", [
    ("stem", "patchify4", "stem: must be one of conv3x3, patchify, patchify_bias, got 'patchify4'"),
    ("activation_scope", "some", "activation_scope: must be one of blocks, all, got 'some'"),
    ("pooling_bn", "no", "pooling_bn: must be true or false, got 'no'"),
])
def test_bad_form_options_are_one_line_exit_2(tmp_path, field, value, message):
    file = tmp_path / "s.yaml"
    file.write_text(yaml.safe_dump({"name": "bad", "dataset": "digits", "search": {
        "op_sets": [{"primitives": ["none", "skip_connect", "pib_conv_3x3"], field: value}]}}))
    proc = subprocess.run([sys.executable, "-m", "nas.cli", "sweep", "run", str(file), "--dry-run"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "results").exists()


def test_first_release_sweep_is_analysed_as_its_networks(tmp_path):
    """The fixture: a sweep written by the first release (see tests/data/README.md), its driver killed
    during the search stage. Its reports say 'pibconv-F2.5'; that network is today's
    pibconv-F2.5-gelu_all-gcd-pool_bn, and analysis says so."""
    from analysis.frames import load_frames
    from sweeps.driver import SweepDir

    sweep = tmp_path / "first_release"
    shutil.copytree(FIXTURE, sweep)
    spec = SweepDir.at(sweep).load_spec()
    assert spec.first_release and list(spec.search.axes["op_sets"]) == ["pibconv-F2.5"]  # the trials' key
    op_set = OpSet.from_dict(spec.search.axes["op_sets"]["pibconv-F2.5"])
    assert (op_set.options.activation_scope, op_set.options.pib_groups, op_set.pooling_bn) == ("all", "gcd", True)
    assert spec.eval.axes["genotypes"]["PIBCONV"]["options"]["activation_scope"] == "all"
    trials, history = load_frames(sweep)
    assert list(trials.op_set) == ["pibconv-F2.5-gelu_all-gcd-pool_bn"]
    assert set(history.op_set) == {"pibconv-F2.5-gelu_all-gcd-pool_bn"}
    assert trials.genotype_id[0].endswith("-gelu_all-gcd")


@pytest.mark.slow
def test_first_release_sweep_resumes_as_the_network_it_started_with(tmp_path):
    """Resume continues the search trial from its checkpoint (its state_dict has the first release's
    pooling BNs and gcd-grouped convs: today's pibconv-F2.5 would not load it), then evaluates the searched
    cell and PIBCONV in the first release's form, under ids that say so."""
    from analysis.frames import load_frames, trial_history

    sweep = tmp_path / "first_release"
    shutil.copytree(FIXTURE, sweep)
    proc = subprocess.run([sys.executable, "-m", "nas.cli", "sweep", "resume", str(sweep), "--verbose", "0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials, _ = load_frames(sweep)
    assert (trials.status == "finished").all(), trials[["trial_dir", "status", "error"]]
    search = trials[trials.stage == "search"].iloc[0]
    assert search.op_set == "pibconv-F2.5-gelu_all-gcd-pool_bn"
    epochs = [r["epoch"] for r in trial_history(search.trial_dir)]
    assert epochs == list(range(1, 13))
    reported = [json.loads(line) for line in (Path(search.trial_dir) / "result.json").read_text().splitlines()]
    assert [r["epoch"] for r in reported].count(1) == 1  # continued from its checkpoint, not restarted
    evals = trials[trials.stage == "eval"]
    assert set(evals.genotype_id) == {"PIBCONV-gelu_all", search.genotype_id}
    assert search.genotype_id.endswith("-gelu_all-gcd") and (evals.epochs_done == 2).all()
    assert set(evals.op_set) == {"pibconv-gelu_all", "pibconv-F2.5-gelu_all-gcd-pool_bn"}
    frozen = yaml.safe_load((sweep / "sweep.yaml").read_text())
    assert "format" not in frozen  # resume never rewrites what the first release froze


def test_complexity_of_search_networks_and_effective_F(capsys):
    from nas.cli import main

    def run(*args):
        capsys.readouterr()
        assert main(["complexity", *args, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    released, paper = run("--op-set", "pibconv_released"), run("--op-set", "pibconv")
    assert (released["layers"], released["channels"]) == (8, 16) and released["op_set"] == "pibconv_released"
    # 8 ops and 8x8 maps after the patchify stem against 10 ops at 32x32
    assert released["params_m"] < paper["params_m"] and released["gmac"] < paper["gmac"] / 10
    odd = run("--genotype", "PIBCONV", "--layers", "10", "--F", "1.3")
    assert odd["genotype"] == "PIBCONV-F1.3" and odd["effective_F"] == {"36": 47 / 36, "72": 94 / 72, "144": 187 / 144}
    assert run("--genotype", "PIBCONV", "--layers", "10")["effective_F"] == {}
    assert main(["complexity", "--genotype", "PIBCONV", "--layers", "100000"]) == 2  # refused, not allocated
    assert main(["complexity", "--genotype", "PIBCONV", "--op-set", "pibconv", "--layers", "2"]) == 2


def test_third_release_sweeps_keep_their_biased_patchify_stem(tmp_path):
    """A sweep frozen by the third release (format 2) built pibconv_released's stem with a conv bias: it
    resumes as that network, under its old trial key, reported with an id that says so; new sweeps get the
    released (bias-free) stem."""
    from sweeps.spec import parse_sweep

    raw = {"name": "s", "dataset": "digits", "search": {"op_sets": ["pibconv_released"], "F": [2.0], "seeds": [0],
                                                        "epochs": 1}}
    new = parse_sweep(raw)
    old = parse_sweep({**raw, "format": 2})
    assert list(new.search.axes["op_sets"]) == list(old.search.axes["op_sets"]) == ["pibconv_released"]
    new_set = OpSet.from_dict(new.search.axes["op_sets"]["pibconv_released"])
    old_set = OpSet.from_dict(old.search.axes["op_sets"]["pibconv_released"])
    assert (new_set.stem, new_set.id) == ("patchify", "pibconv_released")
    assert (old_set.stem, old_set.id) == ("patchify_bias", "pibconv_released-patchify_bias")
    assert old.raw["format"] == 2 and new.raw["format"] == 3
    biased = SearchNetwork(old_set, 4, 3, 2).stem[0]
    assert biased.bias is not None and biased.bias.shape == (12,)  # 3 x C stem channels


def test_a_third_release_checkpoint_resumes_as_the_network_it_trained(digits):
    """A real trial checkpoint written by the third release (bc58249: tests/data/README.md), epoch 2 of 3 of
    a pibconv_released search on digits, resumed with today's code from its frozen sweep file: the network
    the old sweep's trials build now takes its weights and optimiser states and trains epoch 3; today's
    bias-free stem would not."""
    from nas.config import SearchConfig
    from nas.io import load_checkpoint
    from nas.train import run_search
    from sweeps.spec import parse_sweep

    spec = parse_sweep(yaml.safe_load((DATA / "third_release_sweep.yaml").read_text()))
    assert spec.raw["format"] == 2
    mapping = spec.search.axes["op_sets"]["pibconv_released"]
    state = load_checkpoint(DATA / "third_release_checkpoint" / "state.pt")
    assert state["epoch"] == 2 and "stem.0.bias" in state["model"]
    cfg = SearchConfig(**{**spec.search.base, "op_set": mapping, "seed": 0})
    assert cfg.resolved_op_set().id == "pibconv_released-patchify_bias"
    result = run_search(cfg, data=digits, device="cpu", resume=state)
    assert [m["epoch"] for m in result.history] == [1, 2, 3]
    assert result.history[:2] == state["history"]  # the third release's epochs, kept as they were
    assert json.loads((DATA / "third_release_checkpoint" / "history.json").read_text())[-1]["epoch"] == 2
    today = parse_sweep({**yaml.safe_load((DATA / "third_release_sweep.yaml").read_text()), "format": 3})
    fresh = SearchConfig(**{**today.search.base, "op_set": today.search.axes["op_sets"]["pibconv_released"],
                            "seed": 0})
    with pytest.raises(RuntimeError, match="stem.0.bias"):
        SearchNetwork(fresh.resolved_op_set(), 4, 3, 2, 10, 1).load_state_dict(state["model"])
