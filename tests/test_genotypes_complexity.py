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
