import json

import pytest
import torch

from nas.complexity import complexity
from nas.errors import ConfigError
from nas.genotypes import DARTS_V2, GENOTYPES, PIBCONV, Genotype, load_genotype
from nas.opsets import OP_SETS
from nas.search_network import derive_genotype


@pytest.mark.parametrize("genotype,layers,params_m,gmac", [
    (DARTS_V2, 20, 3.30, 0.547),
    (DARTS_V2, 10, 1.6, 0.265),
    (PIBCONV, 10, 3.02, 0.470),
    (PIBCONV, 5, 1.30, 0.218),
])
def test_table1_rows(genotype, layers, params_m, gmac):
    c = complexity(genotype, layers)
    assert abs(c.params_m / params_m - 1) < 0.025
    assert abs(c.gmac / gmac - 1) < 0.04


@pytest.mark.parametrize("genotype", [DARTS_V2, PIBCONV])
def test_gmacs_count_every_conv_the_network_runs(genotype):
    """ptflops counts module calls; the CPU rewrites compute some convs functionally (FactorizedReduce on the
    even / odd pixels, PIBConv's grouped conv as depthwise + sum, 1x1 convs as matrix products), so
    complexity() counts the network with ``reference_modules``. Its conv and linear MACs must equal those
    torch's own FlopCounterMode sees (every aten conv and matmul, however it is called) in the network as
    it runs on CPU."""
    import contextlib
    import io

    from ptflops import get_model_complexity_info
    from torch.utils.flop_counter import FlopCounterMode

    from nas.eval_network import EvalNetwork
    from nas.reference import reference_modules

    torch.manual_seed(0)
    fast = EvalNetwork(genotype, 16, 5, 10, 3, auxiliary=False).eval().to(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fast(torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    not_convs = [torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.GELU, torch.nn.MaxPool2d, torch.nn.AvgPool2d,
                 torch.nn.AdaptiveAvgPool2d]
    with contextlib.redirect_stdout(io.StringIO()):
        conv_macs, _ = get_model_complexity_info(
            reference_modules(fast), (3, 32, 32), as_strings=False, print_per_layer_stat=False, backend="pytorch",
            ignore_modules=not_convs, backend_specific_config={"count_functional": False})
    assert conv_macs == pytest.approx(counter.get_total_flops() / 2, rel=1e-4)  # FLOPs of multiply-adds
    assert complexity(genotype, 5, channels=16).gmac > conv_macs / 1e9  # plus norms, activations, pooling


def test_complexity_grows_with_layers():
    values = [complexity(PIBCONV, n) for n in (2, 3, 5)]
    assert values[0].params_m < values[1].params_m < values[2].params_m
    assert values[0].gmac < values[1].gmac < values[2].gmac


@pytest.mark.parametrize("name", sorted(GENOTYPES))
def test_json_round_trip(name, tmp_path):
    g = GENOTYPES[name]
    path = tmp_path / "g.json"
    path.write_text(g.to_json())
    back = load_genotype(str(path))
    assert back == g and back.id == name
    anonymous = Genotype.from_dict({**g.to_dict(), "name": None})
    assert anonymous.id.startswith("g-") and anonymous.normal == g.normal


def test_malformed_genotype_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_genotype(str(bad))
    bad.write_text(json.dumps({"normal": [["sep_conv_3x3", 0]]}))
    with pytest.raises(ConfigError, match="missing key"):
        load_genotype(str(bad))
    d = PIBCONV.to_dict()
    d["normal"][0] = ["pib_conv_3x3", 7]
    with pytest.raises(ConfigError, match="can only take inputs"):
        Genotype.from_dict(d)


def test_derive_genotype_on_crafted_alpha():
    op_set = OP_SETS["darts"]  # none, max, avg, skip, sep3, sep5, dil3, dil5
    prims = op_set.primitives
    k = 14
    normal = torch.full((k, len(prims)), 0.01)
    reduce = torch.full((k, len(prims)), 0.01)
    # node 0 (edges 0,1): both inputs; sep_conv_3x3 on 0, dil_conv_5x5 on 1; 'none' is huge but excluded
    normal[0, prims.index("sep_conv_3x3")] = 0.9
    normal[1, prims.index("dil_conv_5x5")] = 0.8
    normal[0:14, prims.index("none")] = 5.0
    # node 1 (edges 2,3,4 = inputs 0,1,2): strongest inputs 2 (skip 0.7) and 0 (max 0.6); input 1 weaker
    normal[2, prims.index("max_pool_3x3")] = 0.6
    normal[3, prims.index("avg_pool_3x3")] = 0.3
    normal[4, prims.index("skip_connect")] = 0.7
    # node 2 (edges 5..8), node 3 (edges 9..13): pick inputs 3 and 1, then 4 and 0
    normal[8, prims.index("sep_conv_5x5")] = 0.5
    normal[6, prims.index("dil_conv_3x3")] = 0.4
    normal[13, prims.index("sep_conv_3x3")] = 0.55
    normal[9, prims.index("skip_connect")] = 0.45
    g = derive_genotype(normal, reduce, op_set)
    assert g.normal == (("sep_conv_3x3", 0), ("dil_conv_5x5", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
                        ("sep_conv_5x5", 3), ("dil_conv_3x3", 1), ("sep_conv_3x3", 4), ("skip_connect", 0))
    assert all(op != "none" for op, _ in g.reduce)
    assert g.normal_concat == (2, 3, 4, 5)


@pytest.mark.parametrize("layers", [1, 3, 7, 20])
def test_counting_by_parts_equals_counting_the_whole_network(layers):
    """complexity() adds up stem, cells and head (each distinct cell counted once, so a grid over depths
    is cheap); ptflops counts module by module, so the sum is the whole network's count exactly."""
    from nas.complexity import _measure, complexity
    from nas.eval_network import EvalNetwork
    from nas.genotypes import DARTS_V2, PIBCONV
    from sweeps.spec import genotype_for_trial

    for genotype in (DARTS_V2, genotype_for_trial(PIBCONV.to_dict(), 2.5)):
        for channels, classes, in_channels, size in ((36, 10, 3, 32), (8, 100, 1, 8)):
            parts = complexity(genotype, layers, channels, classes, in_channels, size)
            whole = _measure(EvalNetwork(genotype, channels, layers, classes, in_channels, auxiliary=False).eval(),
                             in_channels, size)
            assert parts == whole, (genotype.id, layers, channels)
